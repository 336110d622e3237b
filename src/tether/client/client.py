"""``tether.Client``: the Python twin of ``static/tether.js``, an object that survives reconnects.

.. code-block:: python

    async with tether.Client("ws://127.0.0.1:8000/chat", params=lambda: {"token": token()}) as client:
        client.on("said", lambda data: print(data))         # handlers survive reconnects
        client.send("say", {"text": "hi"})                   # queued while disconnected
        total = await client.request("add", {"a": 1, "b": 2}, timeout=5)

Behaviour (the same as the browser client; see docs/clients.md):

- the decisions (outbox, pending requests, when to reconnect) are the pure session core
  :mod:`tether.proto.session`, the same rules as tether.js, checked by shared vectors;
- reconnects after any unclean close with full-jitter exponential backoff (the schedule
  tether.js uses too), reset only once a connection stayed up ``stable_after``; never after
  :meth:`close` or a close code that means "do not retry" (1008, 4001, 4003), nor after the
  server refused the handshake with 401 or 403; honours a 1001 ``retry_after`` (at most
  ``max_retry_after`` seconds);
- ``params`` (a function, may be async) is called on every (re)connect, so a refreshed
  token is used; its result is added to the URL's query;
- keeps a bounded outbox (``outbox_size``) of messages sent while disconnected and flushes it
  in order on reconnect; on overflow the oldest is dropped (a dropped request fails with
  :class:`OutboxOverflow`);
- requests time out (``TimeoutError``); requests already written to a socket that dropped
  fail with :class:`ConnectionLost`;
- a dead server is detected with protocol pings (``ping_interval``/``ping_timeout``), which
  a Python client, unlike a browser, can send; server heartbeats are answered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from functools import partial
from types import EllipsisType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec

from ..auth import SUBPROTOCOL
from ..conn import OPEN, Conn
from ..errors import ClientClosed, ConnectionClosed, ConnectionLost, InvalidHandshake, OutboxOverflow, ReplyError
from ..proto.backoff import Backoff
from ..proto.envelope import Envelope, decode, encode_message
from ..proto.frames import OP_TEXT
from ..proto.session import Session, State
from .connect import connect

__all__ = ["Client", "ConnectionLost", "Drained", "OutboxOverflow", "ClientClosed", "reply_error"]

logger = logging.getLogger("tether.client")

Params = Callable[[], "Mapping[str, str] | Awaitable[Mapping[str, str]]"]


class Drained:
    """What :meth:`Client.send` returns: awaiting it waits until the connection the message
    went out on can take more (nothing to wait for if it was queued in the outbox)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Conn | None) -> None:
        self._conn = conn

    def __await__(self) -> Generator[Any, None, None]:
        return self._drain().__await__()

    async def _drain(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.drain()
            except ConnectionClosed:
                pass  # it dropped while we waited: nothing more to wait for


def _is_welcome(message: str | bytes) -> bool:
    """Cheaply: whether a message is the welcome (it comes once per connection)."""
    head = message[:24]
    return ('"welcome"' in head) if isinstance(head, str) else (b'"welcome"' in head)


def _takes_room(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` accepts ``(data, room)``."""
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: call them with data only
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def reply_error(data: Any) -> ReplyError:
    """The :class:`tether.ReplyError` of an ``error`` envelope's data."""
    data = data if isinstance(data, dict) else {}
    return ReplyError(str(data.get("code", "error")), str(data.get("message", "")), data.get("path"))


class Client:
    """A typed client that reconnects by itself. See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        params: Params | None = None,
        headers: Mapping[str, str] | None = None,
        outbox_size: int = 100,
        request_timeout: float | None = 10.0,
        backoff: Backoff | None = None,
        max_retry_after: float = 60.0,
        resume: bool = True,
        ack_delay: float = 1.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        **connect_kwargs: Any,
    ) -> None:
        self.url = url
        self._session = Session(outbox_size=outbox_size, backoff=backoff or Backoff(), max_retry_after=max_retry_after, resume=resume)
        self._ack_delay = ack_delay
        self._ack_timer: asyncio.TimerHandle | None = None
        self._params = params
        self._headers = headers
        self._connect_kwargs = dict(connect_kwargs, ping_interval=ping_interval, ping_timeout=ping_timeout)
        self._request_timeout = request_timeout
        self._handlers: dict[str, list[tuple[Callable[..., Any], bool]]] = {}
        self._running: set[asyncio.Task[Any]] = set()  # async handlers' tasks (kept referenced)
        #: Handlers (``on``) that raised so far; each is logged on ``tether.client``.
        self.handler_errors = 0
        self._errors = 0  # unexpected failures of connection attempts (wait_open raises them)
        self._last_error: BaseException | None = None
        self._listeners: dict[str, list[Callable[..., Any]]] = {}
        self._futures: dict[int, asyncio.Future[Any]] = {}  # pending requests' replies
        self._conn: Conn | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._not_before = 0.0  # monotonic time before which a 1001 retry_after forbids retrying
        self._latency: float | None = None

    @property
    def state(self) -> State:
        """``"connecting"`` (the first time), ``"open"``, ``"reconnecting"`` or ``"closed"``."""
        return self._session.state

    @property
    def backoff(self) -> Backoff:
        return self._session.backoff

    @property
    def latency(self) -> float | None:
        """Last measured ping round trip in seconds (kept across reconnects), or None."""
        if self._conn is not None and self._conn.latency is not None:
            self._latency = self._conn.latency
        return self._latency

    # -- public API ----------------------------------------------------------------------
    def on(self, type: str, handler: Callable[..., Any]) -> Callable[[], None]:
        """Call ``handler(data)`` for every message of ``type``; returns an unsubscribe function.

        A handler that takes two arguments gets ``handler(data, room)``: the room a broadcast
        went to (None for a message sent to this connection only). An async handler runs as
        a task; a handler that raises is logged on ``tether.client`` and counted in
        :attr:`handler_errors`, and the next message is handled as usual.
        """
        entry = (handler, _takes_room(handler))
        self._handlers.setdefault(type, []).append(entry)
        return lambda: self._handlers[type].remove(entry)

    def add_listener(self, event: str, fn: Callable[..., Any]) -> None:
        """Events: ``open`` (the welcome arrived: sending works), ``reconnected``,
        ``close(code, reason)``, ``reconnecting(attempt, delay)``, ``outboxoverflow()`` (the
        outbox dropped its oldest message), ``error(exc)`` (a connection attempt failed
        unexpectedly, e.g. ``params`` raised; the client retries), and with sessions
        ``resumed(resumed, lost_messages)`` after each reconnect (``False``: a new session;
        requests in flight failed with ConnectionLost and ``lost_messages`` one-way ones may
        not have arrived) and ``gap(room, first, last, reason)`` (messages that will never
        come; ``room`` None for the direct stream; reason ``session`` when a new session
        replaced the old one: join the room again)."""
        self._listeners.setdefault(event, []).append(fn)

    def send(self, type: str, data: Any = None) -> Drained:
        """Send a typed message now, or queue it in the outbox while disconnected.

        ``await client.send(...)`` also waits while the connection's write buffer is full
        (the server is not reading): backpressure for a producer that could outrun it. Not
        awaiting it is fine: the message is on its way (or in the bounded outbox) either way.
        """
        return Drained(self._push(encode_message(type, data), None))

    async def emit(self, type: str, data: Any = None) -> None:
        """Send a typed message, waiting for room instead of dropping anything: while
        disconnected, until the outbox has a free place; while connected, until the socket's
        buffer has drained. Use it (rather than :meth:`send`) where nothing may be lost."""
        await self._room()
        await self.send(type, data)

    async def _room(self) -> None:
        """Wait while disconnected with a full outbox (a reconnect empties it). A zero-size
        outbox never has room: there the message goes on to be dropped, as ``send`` does."""
        session = self._session
        while self.state in ("connecting", "reconnecting") and 0 < session.outbox_size <= len(session.outbox):
            await self._changed()

    # ASYNC109: the per-call timeout (default request_timeout) is the API, as in tether.js's request().
    async def request(self, type: str, data: Any = None, *, timeout: float | None | EllipsisType = ...) -> Any:  # noqa: ASYNC109
        """Send a request and wait for its reply's data.

        Raises :class:`tether.ReplyError` on an error reply, ``TimeoutError`` after
        ``timeout`` seconds (default ``request_timeout``), :class:`ConnectionLost` if the
        connection dropped after sending, :class:`ClientClosed` after :meth:`close`.
        """
        if self.state == "closed":
            raise ClientClosed("client is closed")
        id = self._session.request_id()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._futures[id] = future
        limit = self._request_timeout if isinstance(timeout, EllipsisType) else timeout
        try:
            async with asyncio.timeout(limit):
                await self._room()  # a request waits for room rather than push another out
                self._push(encode_message(type, data, id), id)
                return await future
        finally:
            self._futures.pop(id, None)
            self._session.forget(id)

    async def wait_open(self) -> None:
        """Wait until a connection is open.

        Raises :class:`ClientClosed` once the client is closed for good, and the exception
        of a connection attempt that failed for another reason than the network or a
        refusal (``params`` raised, say) while waiting; the client goes on retrying.
        """
        errors = self._errors
        while self.state != "open":
            if self.state == "closed":
                raise ClientClosed("client is closed")
            if self._errors != errors and self._last_error is not None:
                raise self._last_error
            await self._changed()

    async def close(self) -> None:
        """Close for good: no reconnect; pending requests fail with :class:`ClientClosed`."""
        # Before the socket closes: requests in flight fail as closed, not as lost.
        self._fail(self._session.close(), ClientClosed("client is closed"))
        self._wake.set()
        if self._conn is not None:
            await self._conn.close()
        if self._task is not None:
            await self._task
        self._notify()

    def wake(self) -> None:
        """Skip the remaining backoff and reconnect now (e.g. the network came back).

        A server's 1001 ``retry_after`` is still honoured, as in tether.js.
        """
        self._wake.set()

    async def __aenter__(self) -> Client:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start connecting in the background (``async with`` does this)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise())

    # -- the connection loop ---------------------------------------------------------------
    async def _supervise(self) -> None:
        while self.state != "closed":
            code, reason, status = await self._connect_once()
            by_user = self._closed()  # close() ran meanwhile
            lost, retry = self._session.ended(code, reason, time.monotonic(), random.random(), status=status)
            self._fail(lost, ConnectionLost("connection lost before the reply arrived"))
            if retry is None:
                if not by_user:
                    logger.warning("not reconnecting after close %s %s", status or code, reason)
                    self._fail(list(self._futures), ClientClosed(f"closed by the server: {status or code} {reason}"))
                self._notify()
                return
            self._not_before = time.monotonic() + retry.not_before
            self._emit("reconnecting", self.backoff.attempt, retry.delay)
            self._notify()
            self._wake.clear()
            try:
                async with asyncio.timeout(retry.delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            else:  # woken early: skip the backoff, never the server's retry_after
                self._wake.clear()
                try:
                    async with asyncio.timeout(max(0.0, self._not_before - time.monotonic())):
                        while not self._closed():  # close() wakes us again: return at once
                            await self._wake.wait()
                            self._wake.clear()
                except TimeoutError:
                    pass

    async def _connect_once(self) -> tuple[int | None, str, int | None]:
        """One connection, from opening to closing: ``(close code, reason, refusal status)``."""
        try:
            conn = await connect(await self._url(), headers=self._handshake_headers(), **self._connect_kwargs)
        except InvalidHandshake as exc:
            return None, str(exc), exc.status or None
        except (TimeoutError, OSError) as exc:
            logger.info("connect to %s failed: %s", self.url, exc)
            return None, "", None
        except Exception as exc:  # params() raised, a bad URL, ...: report it, retry later
            logger.warning("connection attempt to %s failed: %r", self.url, exc)
            self._errors += 1
            self._last_error = exc
            self._emit("error", exc)
            return None, "", None
        if self.state == "closed":
            await conn.close()
            return 1000, "", None
        self._conn = conn
        early: list[str | bytes] | None = []  # what came before the welcome, handled after it
        try:
            async for message in conn:
                if early is None:
                    self._dispatch(conn, message)
                elif _is_welcome(message):
                    self._dispatch(conn, message)
                    for previous in early:
                        self._dispatch(conn, previous)
                    early = None
                else:
                    early.append(message)
        except ConnectionClosed:
            pass
        self._conn = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._emit("close", conn.close_code, conn.close_reason)
        return conn.close_code, conn.close_reason, None

    def _handshake_headers(self) -> Mapping[str, str] | None:
        offer = self._session.offer(time.time_ns() // 1_000_000)
        if offer is None:
            return self._headers
        return {**(self._headers or {}), "Sec-WebSocket-Protocol": f"{SUBPROTOCOL}, {offer}"}

    def _welcome(self, conn: Conn, data: Any) -> None:
        """The server's welcome: resume the streams (or learn they are gone), then open."""
        session = self._session
        if conn.state is not OPEN:
            return  # closing already: the next connection gets its own welcome
        welcome = session.welcomed(data.get("session") if isinstance(data, dict) else None)
        try:
            if welcome.resumed:
                conn.write(OP_TEXT, encode_message("resume", {"rooms": session.positions()}))
                for payload in welcome.resend:
                    conn.write(OP_TEXT, payload)
            self._fail(welcome.lost, ConnectionLost("the session could not be resumed: the request may or may not have run"))
            for room in welcome.rooms_lost:
                self._emit("gap", room, 0, 0, "session")
            if session.opened and session.resume:
                self._emit("resumed", welcome.resumed, welcome.lost_messages)
            flush = session.connected(time.monotonic())
            for index, (payload, id) in enumerate(flush):
                try:
                    conn.write(OP_TEXT, session.wrote(id, payload))
                except ConnectionClosed:  # it closed under us: the rest waits for the next one
                    for entry in flush[index + 1 :]:
                        session.queue(*entry)
                    raise
        except ConnectionClosed:
            return
        self._emit("open")
        if session.opened > 1:
            self._emit("reconnected")
        self._notify()

    async def _url(self) -> str:
        if self._params is None:
            return self.url
        params = self._params()
        if inspect.isawaitable(params):
            params = await params
        parts = urlsplit(self.url)
        query = "&".join(q for q in (parts.query, urlencode(dict(params))) if q)
        return urlunsplit(parts._replace(query=query))

    # -- messages ------------------------------------------------------------------------
    def _dispatch(self, conn: Conn, message: str | bytes) -> None:
        try:
            incoming = decode(message)
        except msgspec.DecodeError:
            logger.warning("ignoring a message that is not a tether envelope")
            return
        session = self._session
        if incoming.seq is not None:
            if not session.received(incoming.seq):
                return  # replayed after a resume, and seen already
            self._ack_later()
        session.acked(incoming.ack)
        kind = incoming.type
        if incoming.room is not None and incoming.seq is None and not session.room_message(incoming.room, incoming.off):
            return  # a room message received already (a replay overlapping live traffic)
        if kind == "reply" or (kind == "error" and incoming.id is not None):
            self._settle(incoming)
        elif kind == "heartbeat":
            try:  # answered on this connection only: a late answer means nothing
                conn.write(OP_TEXT, encode_message("heartbeat", incoming.data))
            except ConnectionClosed:
                pass
        elif kind == "welcome":
            self._welcome(conn, incoming.data)
        elif kind == "joined" and incoming.room is not None and isinstance(incoming.data, dict):
            offset = incoming.data.get("offset")
            session.joined(incoming.room, incoming.data.get("epoch"), offset if isinstance(offset, int) else 0)
        elif kind == "left" and incoming.room is not None:
            session.left(incoming.room)
        elif kind == "gap" and isinstance(incoming.data, dict):
            data = incoming.data
            if incoming.room is not None:
                session.room_gap(incoming.room, int(data.get("last") or 0), data.get("epoch"))
            self._emit("gap", incoming.room, data.get("first"), data.get("last"), data.get("reason"))
        elif kind != "ack":
            for handler, takes_room in list(self._handlers.get(kind, ())):
                try:
                    result = handler(incoming.data, incoming.room) if takes_room else handler(incoming.data)
                    if inspect.isawaitable(result):
                        task = asyncio.ensure_future(result)
                        self._running.add(task)
                        task.add_done_callback(partial(self._handler_done, kind))
                except Exception:
                    self._handler_failed(kind)

    def _handler_done(self, kind: str, task: asyncio.Future[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._handler_failed(kind, task.exception())

    def _handler_failed(self, kind: str, exc: BaseException | None = None) -> None:
        self.handler_errors += 1
        logger.error("handler for %r failed", kind, exc_info=exc if exc is not None else True)

    def _settle(self, incoming: Envelope) -> None:
        if not self._session.settle(incoming.id):
            return
        assert isinstance(incoming.id, int)
        future = self._futures.get(incoming.id)
        if future is None or future.done():
            return
        if incoming.type == "reply":
            future.set_result(incoming.data)
        else:
            future.set_exception(reply_error(incoming.data))

    def _push(self, payload: bytes, id: int | None) -> Conn | None:
        """Write or queue one message; returns the connection it was written to, if any."""
        if self.state == "closed":
            raise ClientClosed("client is closed")
        write_now, dropped = self._session.send(payload, id)
        conn = self._conn
        if write_now:
            assert conn is not None
            if conn.state is OPEN:
                conn.write(OP_TEXT, self._session.wrote(id, payload))
                return conn
            dropped = self._session.queue(payload, id)  # going away: it waits for the next one
        if dropped is not None:
            if dropped[1] is not None:
                self._fail([dropped[1]], OutboxOverflow("dropped from the full outbox"))
            self._emit("outboxoverflow")
        return None

    def _ack_later(self) -> None:
        """A direct message arrived: ack it within ack_delay if nothing we send carries it."""
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(self._ack_delay, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_timer = None
        conn = self._conn
        ack = self._session.ack_due() if conn is not None and conn.state is OPEN else None
        if conn is not None and ack is not None:
            conn.write(OP_TEXT, encode_message("ack", None, ack=ack))

    # -- plumbing ------------------------------------------------------------------------
    def _fail(self, ids: list[int], exc: Exception) -> None:
        for id in ids:
            future = self._futures.get(id)
            if future is not None and not future.done():
                future.set_exception(exc)

    def _emit(self, event: str, *args: Any) -> None:
        for fn in list(self._listeners.get(event, ())):
            try:
                fn(*args)
            except Exception:
                logger.exception("listener for %r failed", event)

    def _closed(self) -> bool:
        # A method, not an inline comparison: close() changes the state while we await.
        return self.state == "closed"

    def _notify(self) -> None:
        """Wake everything waiting in :meth:`_changed` (the state changed)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _changed(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter
