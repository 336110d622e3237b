"""``Conn``: one WebSocket connection, the same class on the server and in the client.

``Conn`` knows nothing of picows or ASGI: it writes through a :class:`Wire` (the transport
seam) and is driven by the transport adapter calling its ``_on_*`` methods. Every outgoing
frame goes through :meth:`Conn._write`, the single write path, which checks the state and
applies backpressure.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import wheel
from .envelope import encode_message
from .errors import KEEPALIVE_REASON, ConnectionClosed, ConnectionClosedOK, closed_error
from .keepalive import Pinger, heartbeat_due
from .limits import TokenBucket
from .protocol import OP_BINARY, OP_TEXT

if TYPE_CHECKING:
    from .rooms import Hub
    from .stream import ByteStream

__all__ = ["Conn", "ConnState", "Request", "Wire", "Overflow", "SendStats"]

logger = logging.getLogger("tether")

Message = str | bytes
_now = time.monotonic
_RATE_LIMITED = encode_message("error", {"code": "rate_limited", "message": "too many messages: slow down"})


class ConnState(enum.Enum):
    """Where a connection is in its life. Transitions happen only in :class:`Conn`."""

    OPEN = 1
    CLOSING = 2
    CLOSED = 3


class Overflow(enum.StrEnum):
    """What a full send queue does with one more broadcast frame (docs/rooms.md)."""

    DROP_OLDEST = "drop_oldest"  # discard the oldest queued frame and count it in stats.dropped
    CLOSE = "close"  # close the slow consumer with 1013 "try again later"


@dataclass(frozen=True, slots=True)
class SendStats:
    """Broadcast statistics of one connection: frames ``queued`` now (waiting for the
    socket to drain), ``dropped`` so far by the overflow policy, ``sent`` to the socket."""

    queued: int
    dropped: int
    sent: int


class Wire(Protocol):
    """The transport seam: what ``Conn`` needs from picows or ASGI."""

    def write(self, opcode: int, payload: bytes) -> None: ...
    def write_close(self, code: int, reason: str) -> None: ...
    def ping(self, payload: bytes) -> None: ...
    def pong(self, payload: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def disconnect(self) -> None: ...


class Request:
    """What the client asked for when it opened the connection."""

    __slots__ = ("path", "headers", "query", "remote_address")

    def __init__(
        self,
        path: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        remote_address: tuple[str, int] | None,
    ) -> None:
        self.path = path
        self.headers = headers
        self.query = query
        self.remote_address = remote_address


class Conn:
    """A WebSocket connection.

    Receive whole messages with ``await conn.receive()`` or ``async for message in conn``
    (``str`` for text frames, ``bytes`` for binary ones); send with ``await conn.send(...)``.
    Sends from several tasks at once are safe. ``send`` waits while the peer is not reading
    (the socket's write buffer is full), so a slow reader cannot grow memory without bound.
    """

    # Slots: an idle connection should cost as little memory as possible (docs/benchmarks.md).
    __slots__ = (
        "_app_heartbeat",
        "_close_timeout",
        "_close_timer",
        "_closed",
        "_drain",
        "_dropped",
        "_heartbeat_sent",
        "_host",
        "_inbox",
        "_job",
        "_job_ready",
        "_last_write",
        "_max_queue",
        "_max_send_queue",
        "_on_message",
        "_overflow",
        "_pending_pong",
        "_pinger",
        "_pings",
        "_rate",
        "_read_paused",
        "_receiver",
        "_send_queue",
        "_sent",
        "_sent_close",
        "_typed",
        "_wire",
        "_write_frame",
        "_write_paused",
        "assigns",
        "close_code",
        "close_reason",
        "hub",
        "identity",
        "is_client",
        "keepalive",
        "latency",
        "request",
        "state",
    )

    def __init__(
        self,
        wire: Wire,
        request: Request,
        *,
        is_client: bool = False,
        max_queue: int = 32,
        close_timeout: float = 5.0,
        max_send_queue: int | None = 256,
        overflow: Overflow | str = Overflow.DROP_OLDEST,
    ) -> None:
        self._wire = wire
        self.request = request
        self.is_client = is_client
        self.state = ConnState.OPEN
        #: Close code and reason, set once the connection is closed.
        self.close_code: int | None = None
        self.close_reason = ""
        #: Per-connection data for the application (Phoenix calls these assigns).
        self.assigns: dict[str, Any] = {}
        #: Last measured round-trip time to the peer in seconds, or None.
        self.latency: float | None = None
        # A list, not a deque: it holds at most max_queue items and an empty deque costs 13x more.
        self._inbox: list[Message] = []
        self._max_queue = max_queue
        self._receiver: asyncio.Future[None] | None = None
        self._on_message: Callable[[Conn, Message], None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._close_timer: asyncio.TimerHandle | None = None
        self._close_timeout = close_timeout
        self._sent_close = False
        self._last_write = 0.0
        self._pinger: Pinger | None = None
        #: Heartbeat settings ``(interval, timeout)`` in seconds, announced to typed clients.
        self.keepalive: tuple[float | None, float | None] = (None, None)
        self._app_heartbeat = False
        self._pings = True
        self._pending_pong: bytes | None = None
        self._heartbeat_sent: float | None = None
        #: The rooms hub this connection joins rooms through (set by the server or App).
        self.hub: Hub | None = None
        # Broadcast path (rooms.py): optional Wire.write_frame, bounded queue while paused.
        self._write_frame: Callable[[bytes, int, bytes], None] | None = getattr(wire, "write_frame", None)
        self._send_queue: deque[tuple[bytes, int, bytes]] | None = None  # created on first use
        self._max_send_queue = max_send_queue
        self._overflow = Overflow(overflow)
        self._sent = 0
        self._dropped = 0
        #: Who the peer is, as returned by the server's ``auth`` hook (None without one).
        self.identity: Any = None
        self._rate: TokenBucket | None = None
        # A typed App's: the task serving this connection, and its next job (app.py).
        self._host: asyncio.Task[Any] | None = None
        self._job: Any = None
        self._job_ready: asyncio.Future[None] | None = None
        self._typed = False  # a typed App serves this connection: errors can be replies

    # -- request details ---------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.request.path

    @property
    def headers(self) -> Mapping[str, str]:
        return self.request.headers

    @property
    def query(self) -> Mapping[str, str]:
        return self.request.query

    @property
    def remote_address(self) -> tuple[str, int] | None:
        return self.request.remote_address

    def __repr__(self) -> str:
        return f"<Conn {self.path} {self.state.name} {self.remote_address}>"

    # -- receiving ---------------------------------------------------------------------
    async def receive(self) -> Message:
        """Wait for the next whole message.

        Raises :class:`ConnectionClosed` (``ConnectionClosedOK`` after a normal close)
        once the connection is closed and every message received before has been read.
        """
        while not self._inbox:
            if self.state is ConnState.CLOSED:
                raise self._closed_exception()
            self._receiver = asyncio.get_running_loop().create_future()
            try:
                await self._receiver
            finally:
                self._receiver = None
        message = self._take_pending()
        assert message is not None
        return message

    def _take_pending(self) -> Message | None:
        """Pop the oldest queued message; resume reading once the queue is half empty."""
        if not self._inbox:
            return None
        message = self._inbox.pop(0)
        if self._read_paused and len(self._inbox) <= self._max_queue // 2:
            self._update_reading()
        return message

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        """Yield messages until the connection closes; ends quietly on a normal close."""
        try:
            while True:
                yield await self.receive()
        except ConnectionClosedOK:
            return

    def stream(self, *, text: bool = False) -> ByteStream:
        """A byte-stream view of this connection, like ``ws.Read``/``ws.Write`` in Go."""
        from .stream import ByteStream

        return ByteStream(self, text=text)

    # -- sending -----------------------------------------------------------------------
    async def send(self, message: Message, *, text: bool | None = None) -> None:
        """Send ``message``: ``str`` as a text frame, ``bytes`` as a binary frame.

        ``text=True`` sends bytes that are already UTF-8 as a text frame (codecs use it to
        avoid a decode/encode round trip). Raises :class:`ConnectionClosed` if the
        connection is closing or closed. Waits while the transport's buffer is full.
        """
        if isinstance(message, str):
            self._write(OP_TEXT, message.encode())
        else:
            self._write(OP_TEXT if text else OP_BINARY, bytes(message))
        if self._write_paused:
            await self.drain()

    async def emit(self, type: str, data: Any = None) -> None:
        """Send a typed message ``{"type": type, "data": data}`` (see docs/protocol.md).

        ``data`` may be a msgspec Struct, a dataclass, a TypedDict or any JSON-able value.
        """
        self._write(OP_TEXT, encode_message(type, data))
        if self._write_paused:
            await self.drain()

    async def drain(self) -> None:
        """Wait until the transport's write buffer has room again."""
        while self._write_paused:
            if self.state is ConnState.CLOSED:
                raise self._closed_exception()
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain)

    def _write(self, opcode: int, payload: bytes) -> None:
        """The one write path: every data frame goes out here."""
        if self.state is not ConnState.OPEN:
            raise self._closed_exception()
        self._wire.write(opcode, payload)
        self._last_write = _now()

    # -- keepalive ---------------------------------------------------------------------
    def _start_keepalive(self, interval: float | None, timeout: float | None, *, pings: bool = True) -> None:
        """Ping every ``interval`` seconds; close with 1011 if a pong takes over ``timeout``.

        ``pings=False`` keeps only the heartbeat timing, for transports that ping by
        themselves (uvicorn under ASGI).
        """
        self.keepalive = (interval, timeout)
        self._pings = pings
        if interval is None:
            return
        now = _now()
        self._last_write = now
        self._pinger = Pinger(interval, timeout, now)
        self._schedule_keepalive()

    def _schedule_keepalive(self) -> None:
        assert self._pinger is not None
        now = _now()
        wake = self._pinger.next_wakeup()
        if wake <= now:
            # Waiting for a pong with no timeout: nothing to decide until it comes. Without
            # this the timer would fire again at once, forever (a busy loop).
            wake = now + self._pinger.interval
        if self._app_heartbeat:
            wake = min(wake, self._last_write + self._pinger.interval)
        wheel.schedule(wake, self)

    def _keepalive_tick(self) -> None:
        pinger = self._pinger
        if pinger is None or self.state is not ConnState.OPEN:
            return
        now = _now()
        action = pinger.tick(now)
        if action == "dead":
            self._on_keepalive_timeout()
            return
        if action == "ping":
            if self._pings:
                self._wire.ping(pinger.payload)
            else:
                pinger.pong(pinger.payload, now)
        if self._app_heartbeat and heartbeat_due(now, self._last_write, pinger.interval):
            # Browsers cannot see pings and some proxies only count data frames.
            self._heartbeat_sent = now
            self._write(OP_TEXT, encode_message("heartbeat", {"t": now}))
        self._schedule_keepalive()

    def _on_pong(self, payload: bytes) -> None:
        if self._pinger is not None and self._pinger.pong(payload, _now()) is not None:
            self.latency = self._pinger.latency

    def _on_keepalive_timeout(self) -> None:
        """The peer stopped answering: it will not complete a close handshake either."""
        logger.info("keepalive timeout on %r", self)
        self._on_fail(1011, KEEPALIVE_REASON)

    # -- closing -----------------------------------------------------------------------
    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Run the closing handshake and wait until the connection is closed.

        Idempotent. If the peer does not answer within ``close_timeout`` the TCP
        connection is dropped.
        """
        self._start_close(code, reason)
        await asyncio.shield(self._closed)

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side."""
        await asyncio.shield(self._closed)

    def _start_close(self, code: int, reason: str) -> None:
        if self.state is not ConnState.OPEN:
            return
        self.state = ConnState.CLOSING
        self.close_code, self.close_reason = code, reason
        self._send_close(code, reason)
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(self._close_timeout, self._wire.disconnect)

    def _send_close(self, code: int, reason: str) -> None:
        if not self._sent_close:
            self._sent_close = True
            self._wire.write_close(code, reason)

    def _closed_exception(self) -> ConnectionClosed:
        if self.close_code is None:
            return ConnectionClosedOK(1000, "") if self.state is ConnState.CLOSING else closed_error(1006, "")
        return closed_error(self.close_code, self.close_reason)

    # -- events from the transport adapter -----------------------------------------------
    def _on_data(self, message: Message) -> None:
        """A whole message arrived."""
        if self.state is not ConnState.OPEN:
            return
        if self._rate is not None and not self._rate.allow(_now()):
            self._rate_limited()
            return
        if self._on_message is not None and not self._write_paused:
            self._on_message(self, message)
            return
        # Queue it: for a handler's receive(), or for an App that cannot write right now
        # (its replies would pile up in memory); a full inbox stops reading from the peer.
        self._inbox.append(message)
        if self._receiver is not None and not self._receiver.done():
            self._receiver.set_result(None)
        if len(self._inbox) >= self._max_queue and not self._read_paused:
            self._update_reading()

    def _rate_limited(self) -> None:
        """A message over the rate limit: an error reply, then 1008 (see limits.py)."""
        assert self._rate is not None
        if self._typed and not self._rate.exhausted:
            self._write(OP_TEXT, _RATE_LIMITED)
        else:
            self._start_close(1008, "rate limit exceeded")

    def _on_close_frame(self, code: int, reason: str) -> None:
        """The peer sent a close frame (RFC 6455 section 5.5.1)."""
        if self.state is ConnState.OPEN:
            self.state = ConnState.CLOSING
            self.close_code, self.close_reason = code, reason
            # Echo the code back; 1005 (no status) cannot be sent, answer with 1000.
            self._send_close(1000 if code == 1005 else code, "")
        else:
            # We started the close: remember what the peer answered.
            self.close_code, self.close_reason = code, reason
        if self.is_client:
            # The server closes TCP first [7.1.1]; drop it ourselves if it doesn't.
            if self._close_timer is None:
                loop = asyncio.get_running_loop()
                self._close_timer = loop.call_later(self._close_timeout, self._wire.disconnect)
        else:
            self._wire.disconnect()

    def _on_fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: close with ``code`` and drop the connection."""
        if self.state is ConnState.CLOSED:
            return
        self.state = ConnState.CLOSING
        self.close_code, self.close_reason = code, reason
        self._send_close(code, reason)
        self._wire.disconnect()

    def _on_lost(self) -> None:
        """The TCP connection is gone."""
        if self.state is ConnState.CLOSED:
            return
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, ""
        self.state = ConnState.CLOSED
        if self._close_timer is not None:
            self._close_timer.cancel()
        for fut in (self._receiver, self._drain):
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._closed.set_result(None)

    def _on_pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def _on_resume_writing(self) -> None:
        self._write_paused = False
        if self._send_queue:
            self._flush_send_queue()
        if self._pending_pong is not None:
            self._wire.pong(self._pending_pong)
            self._pending_pong = None
        self._dispatch_pending()
        self._update_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def _dispatch_pending(self) -> None:
        """Hand queued messages to the App's callback, in order, while it can write."""
        while self._on_message is not None and not self._write_paused:
            message = self._take_pending()
            if message is None:
                return
            self._on_message(self, message)

    def _on_ping(self, payload: bytes) -> None:
        """Answer a ping; while the peer is not reading, keep only the latest [5.5.3]."""
        if self._write_paused:
            self._pending_pong = payload
        elif self.state is ConnState.OPEN:
            self._wire.pong(payload)

    def _update_reading(self) -> None:
        """Stop reading while the inbox is full; the peer then slows.

        Not while writes are paused: a peer that is itself blocked writing to us would then
        never read, and both sides would wait forever (a handler stuck in ``send`` stops
        draining the inbox anyway, so reading still pauses once it fills).
        """
        pause = len(self._inbox) >= self._max_queue
        if pause != self._read_paused and self.state is not ConnState.CLOSED:
            self._read_paused = pause
            (self._wire.pause_reading if pause else self._wire.resume_reading)()

    # -- rooms and broadcast (see tether.rooms) -------------------------------------------
    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this connection is in."""
        return self.hub.rooms_of(self) if self.hub is not None else frozenset()

    async def join(self, room: str, meta: Any = None, *, presence: bool = True) -> None:
        """Join ``room`` (see :meth:`tether.Hub.join`); left automatically on close."""
        await self._need_hub().join(self, room, meta, presence=presence)

    async def leave(self, room: str) -> None:
        """Leave ``room``; a no-op if this connection is not in it."""
        await self._need_hub().leave(self, room)

    def _need_hub(self) -> Hub:
        if self.hub is None:
            from .rooms import Hub

            self.hub = Hub()
        return self.hub

    @property
    def stats(self) -> SendStats:
        """Broadcast statistics: send queue depth, frames dropped, frames sent."""
        return SendStats(len(self._send_queue or ()), self._dropped, self._sent)

    def _write_shared(self, frame: bytes, opcode: int, payload: bytes) -> None:
        """Write a broadcast frame built once for many receivers; never waits, never raises.

        While the socket's buffer is full the frame waits in a bounded queue instead.
        """
        if self.state is not ConnState.OPEN:
            return
        if self._write_paused or self._send_queue:
            self._queue_shared(frame, opcode, payload)
            return
        self._put_shared(frame, opcode, payload)

    def _put_shared(self, frame: bytes, opcode: int, payload: bytes) -> None:
        if self._write_frame is not None:
            self._write_frame(frame, opcode, payload)
        else:
            self._wire.write(opcode, payload)
        self._sent += 1
        self._last_write = _now()

    def _queue_shared(self, frame: bytes, opcode: int, payload: bytes) -> None:
        queue = self._send_queue
        if queue is None:
            queue = self._send_queue = deque()
        limit = self._max_send_queue
        if limit is not None and len(queue) >= limit:
            if self._overflow is Overflow.CLOSE:
                self._send_queue = None
                self._start_close(1013, "try again later")
                return
            self._dropped += 1
            if not queue:  # max_send_queue=0: nothing is ever queued
                return
            queue.popleft()
        queue.append((frame, opcode, payload))

    def _flush_send_queue(self) -> None:
        """The socket drained: write queued broadcast frames until it is full again."""
        queue = self._send_queue
        while queue and not self._write_paused and self.state is ConnState.OPEN:
            self._put_shared(*queue.popleft())
