"""``Conn``: one WebSocket connection, the same class on the server and in the client.

``Conn`` knows nothing of picows, ASGI or memory pipes. Two named interfaces connect it to
the layers around it (docs/ARCHITECTURE.md):

- :class:`Transport`, *below* it: what ``Conn`` asks of the transport (write a frame, pause
  reading, end the connection). picows, ASGI and the in-memory testing pipes implement it.
- :class:`TransportEvents`, what the transport tells ``Conn`` (a message arrived, a close
  frame, a protocol failure, the connection is lost, writes must pause). ``Conn`` implements
  it with its ``on_*`` methods; only transports call them.
- :class:`Consumer`, *above* it: who takes the messages when not ``receive()`` - a typed
  :class:`tether.App` installs one per connection (``app/dispatch.py``).

Every outgoing data frame goes through :meth:`Conn.write`, the single write path, which
checks the state and stamps the time of the last write (the heartbeat needs it).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from . import wheel
from .errors import KEEPALIVE_REASON, ConcurrencyError, ConnectionClosed, ConnectionClosedOK, closed_error
from .proto.envelope import Envelope, encode
from .proto.frames import OP_BINARY, OP_TEXT
from .proto.keepalive import Pinger, heartbeat_due
from .proto.limits import TokenBucket
from .stream import ByteStream

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "CLOSED",
    "CLOSING",
    "OPEN",
    "Conn",
    "ConnSettings",
    "ConnState",
    "Consumer",
    "DirectStream",
    "Message",
    "Overflow",
    "Request",
    "Rooms",
    "SendStats",
    "Transport",
    "TransportEvents",
    "make_request",
]

logger = logging.getLogger("tether")

Message = str | bytes
_now = time.monotonic


class ConnState(enum.Enum):
    """Where a connection is in its life. Every transition happens in :class:`Conn`:

    ======== ==================================================== =========
    from     event                                                to
    ======== ==================================================== =========
    OPEN     we start closing (``close``, a handler's end, ...):  CLOSING
             our close frame goes out, a timer bounds the rest
    OPEN     the peer's close frame: we echo it                   CLOSING
    OPEN     the peer broke the protocol: our close frame, drop   CLOSING
    CLOSING  the peer's close frame (it answered ours)            CLOSING
    any      the TCP connection is gone                           CLOSED
    ======== ==================================================== =========

    A close frame goes out exactly once: on leaving ``OPEN``.
    """

    OPEN = 1
    CLOSING = 2
    CLOSED = 3


#: The members of :class:`ConnState` as plain names, for hot paths: an attribute of an Enum
#: class costs ~60 ns to read on Python 3.11, and every write tests the state.
OPEN, CLOSING, CLOSED = ConnState.OPEN, ConnState.CLOSING, ConnState.CLOSED


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


@dataclass(frozen=True, slots=True)
class ConnSettings:
    """Per-connection settings, the same for every transport.

    ``max_queue`` messages buffered before reading pauses; ``close_timeout`` seconds for the
    closing handshake; keepalive pings every ``ping_interval`` seconds, the peer is dead after
    ``ping_timeout`` without a pong (``None`` turns either off); a bounded broadcast send queue
    of ``max_send_queue`` frames with its ``send_overflow`` policy (docs/rooms.md).
    """

    max_queue: int = 32
    close_timeout: float = 5.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    max_send_queue: int | None = 256
    send_overflow: Overflow = Overflow.DROP_OLDEST


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


_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())  # read-only, so one serves all


def make_request(
    target: str,
    headers: Iterable[tuple[str, str]] | CIMultiDict[str] = (),
    remote_address: tuple[str, int] | None = None,
    *,
    query: Iterable[tuple[str, str]] = (),
) -> Request:
    """The :class:`Request` for a request target (``/path?query``), every transport's.

    Headers are case-insensitive and the query a read-only multi-dict; ``query`` pairs are
    added after those of the target.
    """
    path, _, qs = target.partition("?")
    pairs = parse_qsl(qs, keep_blank_values=True) if qs else []
    pairs.extend(query)
    proxy = _NO_QUERY if not pairs else MultiDictProxy(MultiDict(pairs))
    header_dict = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers)
    return Request(path or "/", CIMultiDictProxy(header_dict), proxy, remote_address)


class Transport(Protocol):
    """What :class:`Conn` needs from the transport under it. Only ``Conn`` calls these."""

    def write(self, opcode: int, payload: bytes) -> None:
        """Write one data frame now (never blocks; the transport buffers)."""

    def write_frame(self, frame: bytes, opcode: int, payload: bytes) -> None:
        """Write a frame built once for many receivers (a broadcast); ``opcode`` and
        ``payload`` are what it carries, for transports that cannot send raw frames."""

    def write_close(self, code: int, reason: str) -> None:
        """Write a close frame."""

    def ping(self, payload: bytes) -> None: ...
    def pong(self, payload: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def disconnect(self) -> None:
        """End the TCP connection once buffered data is written (graceful)."""

    def abort(self) -> None:
        """End the TCP connection now, discarding unwritten data."""


class TransportEvents(Protocol):
    """What a transport tells its :class:`Conn` (``Conn`` implements this)."""

    def on_message(self, message: Message) -> None: ...
    def on_close_frame(self, code: int, reason: str) -> None: ...
    def on_protocol_error(self, code: int, reason: str) -> None: ...
    def on_ping(self, payload: bytes) -> None: ...
    def on_pong(self, payload: bytes) -> None: ...
    def on_pause_writing(self) -> None: ...
    def on_resume_writing(self) -> None: ...
    def on_lost(self) -> None: ...


class Consumer(Protocol):
    """Takes a connection's messages instead of ``receive()`` (a typed App's dispatcher)."""

    def message(self, message: Message) -> bool | None:
        """Handle ``message``; return ``False`` to have it queued and the connection held."""

    def rate_limited(self, message: Message) -> None:
        """``message`` was over the rate limit (answer it; the connection stays open)."""

    def heartbeat(self, now: float) -> None:
        """Nothing was written for a keepalive interval: write something (browsers see no pings)."""

    def busy(self) -> list[asyncio.Future[Any]]:
        """What is running for the connection now (a graceful shutdown lets it finish)."""


class DirectStream(Protocol):
    """A session's direct stream (tether.sessions.Session): numbers and keeps what it sends."""

    def send(self, type: str, data: Any = None, id: int | str | None = None, room: str | None = None) -> None:
        """Send one direct message to the session's client (kept until it acks it)."""


class Rooms(Protocol):
    """The rooms hub a connection joins rooms through (:class:`tether.Hub`)."""

    max_rooms: int | None

    def rooms_of(self, conn: Conn) -> frozenset[str]: ...
    async def join(self, conn: Conn, room: str, meta: Any = None, *, presence: bool = True) -> None: ...
    async def leave(self, conn: Conn, room: str) -> None: ...


class _Rejected:
    """A message the rate limiter rejected, waiting in the inbox for its turn."""

    __slots__ = ("message", "exhausted")

    def __init__(self, message: Message, exhausted: bool) -> None:
        self.message, self.exhausted = message, exhausted


class Conn:
    """A WebSocket connection.

    Receive whole messages with ``await conn.receive()`` or ``async for message in conn``
    (``str`` for text frames, ``bytes`` for binary ones); send with ``await conn.send(...)``.
    Sends from several tasks at once are safe. ``send`` waits while the peer is not reading
    (the socket's write buffer is full), so a slow reader cannot grow memory without bound.
    """

    # Slots: an idle connection should cost as little memory as possible (docs/benchmarks.md).
    __slots__ = (
        "_assigns",
        "_close_callbacks",
        "_close_timer",
        "_closed",
        "_direct",
        "_drain",
        "_dropped",
        "_held",
        "_inbox",
        "_last_write",
        "_pending_pong",
        "_pinger",
        "_read_paused",
        "_reading_held",
        "_receiver",
        "_send_queue",
        "_sent",
        "_settings",
        "_transport",
        "_transport_pings",
        "_write_paused",
        "close_code",
        "close_reason",
        "consumer",
        "hub",
        "identity",
        "is_client",
        "latency",
        "limiter",
        "messages_in",
        "messages_out",
        "metrics",
        "request",
        "session",
        "state",
    )

    def __init__(
        self,
        transport: Transport,
        request: Request,
        settings: ConnSettings = ConnSettings(),
        *,
        is_client: bool = False,
        transport_pings: bool = True,
    ) -> None:
        self._transport = transport
        self.request = request
        self.is_client = is_client
        self.state = OPEN
        #: Close code and reason: ours once we start closing, the peer's once it answers.
        self.close_code: int | None = None
        self.close_reason = ""
        self._assigns: dict[str, Any] | None = None  # created on first use (idle connections are cheap)
        #: Last measured round-trip time to the peer in seconds, or None.
        self.latency: float | None = None
        #: Who the peer is, as returned by the ``auth`` hook (None without one).
        self.identity: Any = None
        #: The rooms hub this connection joins rooms through (set by its transport or App).
        self.hub: Rooms | None = None
        #: Takes messages instead of ``receive()`` (a typed App's dispatcher), or None.
        self.consumer: Consumer | None = None
        #: The session this connection carries (a typed App's, tether.sessions), or None.
        self.session: DirectStream | None = None
        #: Where this connection's hooks report (tether.metrics; set by the server), or None: off.
        self.metrics: Metrics | None = None
        #: Messages received and written so far (the server's close log line reads them).
        self.messages_in = 0
        self.messages_out = 0
        #: The message rate limit of this connection (set by the connection policy), or None.
        self.limiter: TokenBucket | None = None
        # Limits, timeouts and policies are read from the settings, shared by every connection.
        self._settings = settings
        # A list, not a deque (it holds at most max_queue items and an empty deque costs 13x
        # more), created when the first message has to wait.
        self._inbox: list[Message | _Rejected] | None = None
        self._held = False  # messages queue for the consumer until release()
        self._receiver: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False  # paused by us (inbox full)
        self._reading_held = False  # paused by pause_reading() (a server shutting down)
        self._drain: asyncio.Future[None] | None = None
        # What close() and wait_closed() wait for, created by the first of them (an idle
        # connection has none); on_close callbacks in a list (not a closure and a context each
        # on that future).
        self._closed: asyncio.Future[None] | None = None
        self._close_callbacks: list[Callable[[Conn], object]] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._last_write = 0.0
        self._pinger: Pinger | None = None
        self._transport_pings = transport_pings
        self._pending_pong: bytes | None = None
        # Broadcast path: a bounded queue while the socket is full, created on first use.
        self._send_queue: deque[tuple[bytes, int, bytes]] | None = None
        self._sent = 0
        self._dropped = 0
        # The transport's own send (C code), called instead of Transport.write while the
        # transport says it may be (write_directly): one Python call less per message.
        self._direct: Callable[[int, bytes], object] | None = None
        if settings.ping_interval is not None:
            self._start_keepalive(settings.ping_interval, settings.ping_timeout)

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

    @property
    def assigns(self) -> dict[str, Any]:
        """Per-connection data for the application (Phoenix calls these assigns)."""
        if self._assigns is None:
            self._assigns = {}
        return self._assigns

    @assigns.setter
    def assigns(self, value: dict[str, Any]) -> None:
        self._assigns = value

    @property
    def keepalive(self) -> tuple[float | None, float | None]:
        """Heartbeat settings ``(interval, timeout)`` in seconds, announced to typed clients."""
        return self._settings.ping_interval, self._settings.ping_timeout

    def __repr__(self) -> str:
        return f"<Conn {self.path} {self.state.name} {self.remote_address}>"

    # -- receiving ---------------------------------------------------------------------
    async def receive(self) -> Message:
        """Wait for the next whole message.

        Raises :class:`ConnectionClosed` (``ConnectionClosedOK`` after a normal close)
        once the connection is closed and every message received before has been read, and
        :class:`tether.ConcurrencyError` if another task is already waiting in ``receive``.
        """
        if self._receiver is not None:
            raise ConcurrencyError("another task is already waiting in receive() on this connection")
        while not self._inbox:
            if self.state is CLOSED:
                raise self.closed_error()
            self._receiver = asyncio.get_running_loop().create_future()
            try:
                await self._receiver
            finally:
                self._receiver = None
        message = self._take()
        if isinstance(message, _Rejected):  # queued for a consumer that has gone
            return await self.receive()
        assert message is not None
        if self.metrics is not None:
            self.metrics.received("_text" if isinstance(message, str) else "_binary", message)
        return message

    def _take(self) -> Message | _Rejected | None:
        """Pop the oldest queued message; resume reading once the queue is half empty."""
        inbox = self._inbox
        if not inbox:
            return None
        message = inbox.pop(0)
        if self._read_paused and len(inbox) <= self._settings.max_queue // 2:
            self._update_reading()
        return message

    def __aiter__(self) -> AsyncIterator[Message]:
        return _Messages(self)

    def stream(self, *, text: bool = False) -> ByteStream:
        """A byte-stream view of this connection, like ``ws.Read``/``ws.Write`` in Go."""
        return ByteStream(self, text=text)

    # -- the consumer (a typed App) ----------------------------------------------------
    def hold(self) -> None:
        """Queue messages instead of handing them to the consumer, until :meth:`release`.

        A consumer holds the connection while it is busy (a handler that suspended): later
        messages wait in the bounded inbox, and reading stops once it is full.
        """
        self._held = True

    def release(self) -> None:
        """Hand queued messages to the consumer, in order, then new ones as they come."""
        self._held = False
        self._deliver_queued()

    def _deliver_queued(self) -> None:
        consumer = self.consumer
        while consumer is not None and not self._held and not self._write_paused:
            message = self._take()
            if message is None:
                return
            if isinstance(message, _Rejected):
                self._reject(message)
            elif consumer.message(message) is False:
                assert self._inbox is not None  # it held the message just taken
                self._inbox.insert(0, message)
                self._held = True

    # -- sending -----------------------------------------------------------------------
    async def send(self, message: Message, *, text: bool | None = None) -> None:
        """Send ``message``: ``str`` as a text frame, ``bytes`` as a binary frame.

        ``text=True`` sends bytes that are already UTF-8 as a text frame (codecs use it to
        avoid a decode/encode round trip). Raises :class:`ConnectionClosed` if the
        connection is closing or closed. Waits while the transport's buffer is full.
        """
        if isinstance(message, str):
            self.write(OP_TEXT, message.encode())
        else:
            self.write(OP_TEXT if text else OP_BINARY, bytes(message))
        if self._write_paused:
            await self.drain()

    async def emit(self, type: str, data: Any = None) -> None:
        """Send a typed message ``{"type": type, "data": data}`` (see docs/protocol.md).

        ``data`` may be a msgspec Struct, a dataclass, a TypedDict or any JSON-able value.
        With a session (typed apps) it is part of the session's direct stream: it reaches the
        client even across a reconnect, until the session ends (then ``ConnectionClosed``).
        """
        session = self.session
        if session is None:
            # Not encode_message: its call and seven-field Envelope cost ~70 ns more per message.
            self.write(OP_TEXT, encode(Envelope(type, data)))
        else:
            session.send(type, data)
        if self._write_paused:
            await self.drain()

    async def drain(self) -> None:
        """Wait until the transport's write buffer has room again."""
        while self._write_paused:
            if self.state is CLOSED:
                raise self.closed_error()
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain)

    def write_directly(self, send: Callable[[int, bytes], object] | None) -> None:
        """For transports: from now on write data frames by calling ``send(opcode, payload)``
        (the transport's own, e.g. picows' ``WSTransport.send``) instead of
        :meth:`Transport.write`; None: through ``Transport.write`` again (while the transport
        holds frames back, so they keep their order)."""
        self._direct = send

    def write(self, opcode: int, payload: bytes) -> None:
        """Write one data frame now, without waiting for the buffer to drain: the one
        write path. Raises :class:`ConnectionClosed` unless the connection is open.

        For framework code (replies, heartbeats); applications use :meth:`send`/:meth:`emit`,
        which also wait while the peer is not reading.
        """
        if self.state is not OPEN:
            raise self.closed_error()
        direct = self._direct
        if direct is not None:
            direct(opcode, payload)
        else:
            self._transport.write(opcode, payload)
        self._last_write = _now()
        self.messages_out += 1
        if self.metrics is not None:
            self.metrics.sent(opcode, payload)

    # -- keepalive ---------------------------------------------------------------------
    def _start_keepalive(self, interval: float, timeout: float | None) -> None:
        """Ping every ``interval`` seconds; close with 1011 if a pong takes over ``timeout``.

        Without transport pings (ASGI: uvicorn pings by itself) only the timing runs, for
        a typed App's heartbeat messages.
        """
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
        if self.consumer is not None:
            wake = min(wake, self._last_write + self._pinger.interval)
        wheel.schedule(wake, self)

    def keepalive_tick(self) -> None:
        """The keepalive timer (tether.wheel) fired for this connection."""
        pinger = self._pinger
        if pinger is None or self.state is not OPEN:
            return
        now = _now()
        action = pinger.tick(now)
        if action == "dead":
            logger.info("keepalive timeout on %r", self)
            self.on_protocol_error(1011, KEEPALIVE_REASON)
            return
        if action == "ping":
            if self._transport_pings:
                self._transport.ping(pinger.payload)
            else:
                pinger.pong(pinger.payload, now)
        consumer = self.consumer
        if consumer is not None and heartbeat_due(now, self._last_write, pinger.interval):
            consumer.heartbeat(now)
        self._schedule_keepalive()

    # -- closing -----------------------------------------------------------------------
    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Run the closing handshake and wait until the connection is closed.

        Idempotent. If the peer does not answer within ``close_timeout`` the TCP
        connection is dropped.
        """
        self.start_close(code, reason)
        await asyncio.shield(self._closed_future())

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side."""
        await asyncio.shield(self._closed_future())

    def _closed_future(self) -> asyncio.Future[None]:
        closed = self._closed
        if closed is None:
            closed = self._closed = asyncio.get_running_loop().create_future()
            if self.state is CLOSED:
                closed.set_result(None)
        return closed

    def on_close(self, callback: Callable[[Conn], object]) -> None:
        """Call ``callback(conn)`` once the connection is closed (soon after, from the event
        loop, in the order the callbacks were added; at once if it is closed already)."""
        if self.state is CLOSED:
            asyncio.get_running_loop().call_soon(callback, self)
        elif self._close_callbacks is None:
            self._close_callbacks = [callback]
        else:
            self._close_callbacks.append(callback)

    def start_close(self, code: int, reason: str) -> None:
        """Start the closing handshake without waiting for it (no-op unless open)."""
        if self.state is not OPEN:
            return
        self._closing(code, reason)
        self._transport.write_close(code, reason)
        if self._reading_held:  # we must read the peer's close frame; data is ignored now
            self.resume_reading()

    def _closing(self, code: int, reason: str) -> None:
        """OPEN -> CLOSING: the only way out of OPEN short of losing the connection."""
        self.state = CLOSING
        self.close_code, self.close_reason = code, reason
        loop = asyncio.get_running_loop()
        # Bounds the handshake and the graceful end of TCP: a peer that neither answers nor
        # reads (its window closed) would otherwise keep the socket for ever.
        self._close_timer = loop.call_later(self._settings.close_timeout, self._transport.abort)

    def drop(self) -> None:
        """End the TCP connection now, discarding what is not written yet."""
        if self.state is not CLOSED:
            self._transport.abort()

    def closed_error(self) -> ConnectionClosed:
        """The :class:`ConnectionClosed` that ``send``/``receive`` raise now."""
        if self.close_code is None:
            return closed_error(1006, "")
        return closed_error(self.close_code, self.close_reason)

    def pause_reading(self) -> None:
        """Stop reading from the peer until :meth:`resume_reading` (or a close starts)."""
        self._reading_held = True
        if self.state is not CLOSED:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._reading_held = False
        if self.state is not CLOSED and not self._read_paused:
            self._transport.resume_reading()

    # -- TransportEvents: called by the transport ------------------------------------------
    def on_message(self, message: Message) -> None:
        """A whole message arrived.

        Over the rate limit (see proto/limits.py): without a consumer, close with 1008 at
        once; with one, in its turn after the messages queued before it, the consumer answers
        it, until the limiter gives up on the peer: then close with 1008.
        """
        if self.state is not OPEN:
            return
        self.messages_in += 1
        item: Message | _Rejected = message
        limiter = self.limiter
        if limiter is not None and not limiter.allow(_now()):
            if self.consumer is None:
                self.start_close(1008, "rate limit exceeded")
                return
            item = _Rejected(message, limiter.exhausted)
        consumer = self.consumer
        if consumer is not None and not self._held and not self._write_paused:
            if isinstance(item, _Rejected):
                self._reject(item)
                return
            if consumer.message(item) is not False:
                return
            self._held = True
        self._queue(item)

    def _queue(self, message: Message | _Rejected) -> None:
        """Queue a message: for a handler's receive(), or for a consumer that cannot take it
        now (its replies would pile up in memory); a full inbox stops reading from the peer."""
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = []
        inbox.append(message)
        receiver = self._receiver
        if receiver is not None and not receiver.done():
            receiver.set_result(None)
        if len(inbox) >= self._settings.max_queue and not self._read_paused:
            self._update_reading()

    def _reject(self, rejected: _Rejected) -> None:
        if rejected.exhausted or self.consumer is None:
            self.start_close(1008, "rate limit exceeded")
        else:
            self.consumer.rate_limited(rejected.message)

    def on_close_frame(self, code: int, reason: str) -> None:
        """The peer sent a close frame (RFC 6455 section 5.5.1)."""
        if self.state is OPEN:
            self._closing(code, reason)
            # Echo the code back; 1005 (no status) cannot be sent, answer with 1000.
            self._transport.write_close(1000 if code == 1005 else code, "")
        else:
            # We started the close: remember what the peer answered.
            self.close_code, self.close_reason = code, reason
        if not self.is_client:
            self._transport.disconnect()
        # A client waits for the server to close TCP first [7.1.1]; the close timer bounds it.

    def on_protocol_error(self, code: int, reason: str) -> None:
        """The peer broke the protocol (or stopped answering): close with ``code``, drop."""
        if self.state is CLOSED:
            return
        if self.state is OPEN:
            self._closing(code, reason)
            self._transport.write_close(code, reason)
        self._transport.disconnect()

    def on_lost(self) -> None:
        """The TCP connection is gone."""
        if self.state is CLOSED:
            return
        if self.close_code is None:
            self.close_code, self.close_reason = 1006, ""
        self.state = CLOSED
        if self._close_timer is not None:
            self._close_timer.cancel()
        for fut in (self._receiver, self._drain):
            if fut is not None and not fut.done():
                fut.set_result(None)
        if self._closed is not None:
            self._closed.set_result(None)
        callbacks, self._close_callbacks = self._close_callbacks, None
        if callbacks:
            loop = asyncio.get_running_loop()
            for callback in callbacks:
                loop.call_soon(callback, self)

    def on_pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def on_resume_writing(self) -> None:
        self._write_paused = False
        if self._send_queue:
            self._flush_send_queue()
        if self._pending_pong is not None:
            self._transport.pong(self._pending_pong)
            self._pending_pong = None
        self._deliver_queued()
        self._update_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def on_ping(self, payload: bytes) -> None:
        """Answer a ping; while the peer is not reading, keep only the latest [5.5.3]."""
        if self._write_paused:
            self._pending_pong = payload
        elif self.state is OPEN:
            self._transport.pong(payload)

    def on_pong(self, payload: bytes) -> None:
        if self._pinger is not None and self._pinger.pong(payload, _now()) is not None:
            self.latency = self._pinger.latency
            if self.metrics is not None and self.latency is not None:
                self.metrics.keepalive_rtt(self.latency)

    def _update_reading(self) -> None:
        """Stop reading while the inbox is full; the peer then slows.

        Not while writes are paused: a peer that is itself blocked writing to us would then
        never read, and both sides would wait forever (a handler stuck in ``send`` stops
        draining the inbox anyway, so reading still pauses once it fills).
        """
        pause = len(self._inbox or ()) >= self._settings.max_queue
        if pause != self._read_paused and self.state is not CLOSED:
            self._read_paused = pause
            if pause:
                self._transport.pause_reading()
            elif not self._reading_held:
                self._transport.resume_reading()

    # -- rooms and broadcast (see tether.rooms) -------------------------------------------
    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this connection is in."""
        return self.hub.rooms_of(self) if self.hub is not None else frozenset()

    async def join(self, room: str, meta: Any = None, *, presence: bool = True) -> None:
        """Join ``room`` (see :meth:`tether.Hub.join`); left automatically on close."""
        await self._rooms_hub().join(self, room, meta, presence=presence)

    async def leave(self, room: str) -> None:
        """Leave ``room``; a no-op if this connection is not in it."""
        await self._rooms_hub().leave(self, room)

    def _rooms_hub(self) -> Rooms:
        if self.hub is None:
            raise TypeError("this connection has no rooms hub (client connections cannot join rooms)")
        return self.hub

    @property
    def stats(self) -> SendStats:
        """Broadcast statistics: send queue depth, frames dropped, frames sent."""
        return SendStats(len(self._send_queue or ()), self._dropped, self._sent)

    def write_broadcast(self, frame: bytes, opcode: int, payload: bytes, now: float = 0.0) -> None:
        """Write a broadcast frame built once for many receivers; never waits, never raises.

        While the socket's buffer is full the frame waits in a bounded queue instead.
        ``now`` (``time.monotonic()``) is read once per broadcast by the caller, not once per
        receiver. The payload goes through the transport's direct send when it gave one
        (:meth:`write_directly`), else the frame through ``Transport.write_frame``.
        """
        if self.state is not OPEN:
            return
        if self._write_paused or self._send_queue:
            self._queue_shared(frame, opcode, payload)
            return
        # _put_shared, inlined: this runs once per receiver of every broadcast.
        direct = self._direct
        if direct is not None:
            direct(opcode, payload)
        else:
            self._transport.write_frame(frame, opcode, payload)
        self._sent += 1
        self.messages_out += 1
        self._last_write = now or _now()

    def _put_shared(self, frame: bytes, opcode: int, payload: bytes) -> None:
        direct = self._direct
        if direct is not None:
            direct(opcode, payload)
        else:
            self._transport.write_frame(frame, opcode, payload)
        self._sent += 1
        self.messages_out += 1
        self._last_write = _now()

    def _queue_shared(self, frame: bytes, opcode: int, payload: bytes) -> None:
        queue = self._send_queue
        if queue is None:
            queue = self._send_queue = deque()
        limit = self._settings.max_send_queue
        if limit is not None and len(queue) >= limit:
            # A connection with a session never drops a room message: its client resumes
            # from the last offset it got and the room's history replays the rest.
            if self._settings.send_overflow == Overflow.CLOSE or self.session is not None:
                self._send_queue = None
                self.start_close(1013, "try again later")
                if self.metrics is not None:
                    self.metrics.slow_consumer_closed()
                return
            self._dropped += 1
            if self.metrics is not None:
                self.metrics.send_queue_dropped()
            if not queue:  # max_send_queue=0: nothing is ever queued
                return
            queue.popleft()
        queue.append((frame, opcode, payload))

    def _flush_send_queue(self) -> None:
        """The socket drained: write queued broadcast frames until it is full again."""
        queue = self._send_queue
        while queue and not self._write_paused and self.state is OPEN:
            self._put_shared(*queue.popleft())


class _Messages:
    """``async for message in conn``: messages until the connection closes; ends quietly on a
    normal close. (A class, not an async generator: mypyc compiles this module, and does not
    compile async generators.)"""

    __slots__ = ("_conn",)

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self._conn.receive()
        except ConnectionClosedOK:
            raise StopAsyncIteration from None
