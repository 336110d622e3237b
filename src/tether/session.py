"""``tether.Client``: the Python twin of ``static/tether.js``, an object that survives reconnects.

.. code-block:: python

    async with tether.Client("ws://127.0.0.1:8000/chat", params=lambda: {"token": token()}) as client:
        client.on("said", lambda data: print(data))         # handlers survive reconnects
        client.send("say", {"text": "hi"})                   # queued while disconnected
        total = await client.request("add", {"a": 1, "b": 2}, timeout=5)

Behaviour (the same as the browser client; see docs/clients.md):

- reconnects after any unclean close with full-jitter exponential backoff (``backoff.py``,
  the schedule tether.js uses too), reset only once a connection stayed up ``stable_after``;
  never after :meth:`close` or a close code that means "do not retry" (1008, 4001, 4003),
  nor after the server refused the handshake with 401 or 403; honours a 1001 ``retry_after``;
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
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from types import EllipsisType
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec

from .backoff import Backoff, retry_after, should_reconnect
from .client import connect
from .conn import Conn
from .envelope import encode_message
from .errors import ConnectionClosed, InvalidHandshake, ReplyError, TetherError
from .protocol import OP_TEXT

__all__ = ["Client", "ConnectionLost", "OutboxOverflow", "ClientClosed"]

logger = logging.getLogger("tether.client")

State = Literal["connecting", "open", "reconnecting", "closed"]
Params = Callable[[], "Mapping[str, str] | Awaitable[Mapping[str, str]]"]


class ConnectionLost(TetherError):
    """The connection dropped after the request was sent; its reply will never come."""


class OutboxOverflow(TetherError):
    """The message was dropped from the full outbox before it could be sent."""


class ClientClosed(TetherError):
    """The client was closed with :meth:`Client.close`."""


class _Incoming(msgspec.Struct):
    type: str
    data: Any = None
    id: int | str | None = None


_decode = msgspec.json.Decoder(_Incoming).decode


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
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        **connect_kwargs: Any,
    ) -> None:
        self.url = url
        self.state: State = "connecting"
        self.backoff = backoff or Backoff()
        self._params = params
        self._headers = headers
        self._connect_kwargs = dict(connect_kwargs, ping_interval=ping_interval, ping_timeout=ping_timeout)
        self._outbox: deque[tuple[bytes, int | None]] = deque()
        self._outbox_size = outbox_size
        self._request_timeout = request_timeout
        self._handlers: dict[str, list[Callable[[Any], Any]]] = {}
        self._listeners: dict[str, list[Callable[..., Any]]] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._in_flight: set[int] = set()  # request ids written to the current socket
        self._ids = itertools.count(1)
        self._conn: Conn | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._opened = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._not_before = 0.0  # monotonic time before which a 1001 retry_after forbids retrying
        self._latency: float | None = None

    @property
    def latency(self) -> float | None:
        """Last measured ping round trip in seconds (kept across reconnects), or None."""
        if self._conn is not None and self._conn.latency is not None:
            self._latency = self._conn.latency
        return self._latency

    # -- public API ----------------------------------------------------------------------
    def on(self, type: str, handler: Callable[[Any], Any]) -> Callable[[], None]:
        """Call ``handler(data)`` for every message of ``type``; returns an unsubscribe function."""
        self._handlers.setdefault(type, []).append(handler)
        return lambda: self._handlers[type].remove(handler)

    def add_listener(self, event: str, fn: Callable[..., Any]) -> None:
        """Events: ``open``, ``reconnected``, ``close(code, reason)``, ``reconnecting(attempt, delay)``,
        ``outboxoverflow()`` (the outbox dropped its oldest message)."""
        self._listeners.setdefault(event, []).append(fn)

    def send(self, type: str, data: Any = None) -> None:
        """Send a typed message now, or queue it in the outbox while disconnected."""
        self._push(encode_message(type, data), None)

    # ASYNC109: the per-call timeout (default request_timeout) is the API, as in tether.js's request().
    async def request(self, type: str, data: Any = None, *, timeout: float | None | EllipsisType = ...) -> Any:  # noqa: ASYNC109
        """Send a request and wait for its reply's data.

        Raises :class:`tether.ReplyError` on an error reply, ``TimeoutError`` after
        ``timeout`` seconds (default ``request_timeout``), :class:`ConnectionLost` if the
        connection dropped after sending, :class:`ClientClosed` after :meth:`close`.
        """
        if self.state == "closed":
            raise ClientClosed("client is closed")
        id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[id] = future
        self._push(encode_message(type, data, id), id)
        limit = self._request_timeout if isinstance(timeout, EllipsisType) else timeout
        try:
            async with asyncio.timeout(limit):
                return await future
        finally:
            self._pending.pop(id, None)
            self._in_flight.discard(id)
            self._outbox = deque(item for item in self._outbox if item[1] != id)

    async def wait_open(self) -> None:
        """Wait until a connection is open."""
        while self.state != "open":
            if self.state == "closed":
                raise ClientClosed("client is closed")
            await self._changed()

    async def close(self) -> None:
        """Close for good: no reconnect; pending requests fail with :class:`ClientClosed`."""
        self.state = "closed"
        self._wake.set()
        # Before the socket closes: requests in flight fail as closed, not as lost.
        self._fail_pending(ClientClosed("client is closed"), self._pending)
        self._outbox.clear()
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
            code, reason = await self._connect_once()
            if self._closed_for_good():
                return
            if code in (401, 403) or not should_reconnect(code, deliberate=False):
                logger.warning("not reconnecting after close %s %s", code, reason)
                self.state = "closed"
                self._fail_pending(ClientClosed(f"closed by the server: {code} {reason}"), self._pending)
                self._notify()
                return
            self.backoff.maybe_reset(time.monotonic())
            not_before = retry_after(code, reason) or 0.0
            delay = not_before + self.backoff.next_delay(random.random())
            self._not_before = time.monotonic() + not_before
            self.state = "reconnecting"
            self._emit("reconnecting", self.backoff.attempt, delay)
            self._notify()
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            else:  # woken early: skip the backoff, never the server's retry_after
                await asyncio.sleep(max(0.0, self._not_before - time.monotonic()))

    async def _connect_once(self) -> tuple[int | None, str]:
        """One connection, from opening to closing; returns how it ended."""
        try:
            conn = await connect(await self._url(), headers=self._headers, **self._connect_kwargs)
        except InvalidHandshake as exc:
            return (exc.status or None), str(exc)
        except (TimeoutError, OSError) as exc:
            logger.info("connect to %s failed: %s", self.url, exc)
            return None, ""
        self._conn = conn
        if self.state == "closed":
            await conn.close()
            return 1000, ""
        self.state = "open"
        self.backoff.connected(time.monotonic())
        self._opened += 1
        self._flush(conn)
        self._emit("open")
        if self._opened > 1:
            self._emit("reconnected")
        self._notify()
        try:
            async for message in conn:
                self._dispatch(conn, message)
        except ConnectionClosed:
            pass
        self._conn = None
        lost = {id: self._pending[id] for id in self._in_flight if id in self._pending}
        self._in_flight.clear()
        self._fail_pending(ConnectionLost("connection lost before the reply arrived"), lost)
        self._emit("close", conn.close_code, conn.close_reason)
        return conn.close_code, conn.close_reason

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
            incoming = _decode(message)
        except msgspec.DecodeError:
            logger.warning("ignoring a message that is not a tether envelope")
            return
        kind = incoming.type
        if kind == "reply" or (kind == "error" and incoming.id is not None):
            self._settle(incoming)
        elif kind == "heartbeat":
            self._push(encode_message("heartbeat", incoming.data), None)
        elif kind != "welcome":
            for handler in list(self._handlers.get(kind, ())):
                try:
                    result = handler(incoming.data)
                    if inspect.isawaitable(result):
                        asyncio.ensure_future(result)
                except Exception:
                    logger.exception("handler for %r failed", kind)

    def _settle(self, incoming: _Incoming) -> None:
        future = self._pending.get(incoming.id) if isinstance(incoming.id, int) else None
        if future is None or future.done():
            return
        self._in_flight.discard(incoming.id)
        if incoming.type == "reply":
            future.set_result(incoming.data)
        else:
            data = incoming.data if isinstance(incoming.data, dict) else {}
            future.set_exception(ReplyError(str(data.get("code", "error")), str(data.get("message", "")), data.get("path")))

    def _push(self, payload: bytes, id: int | None) -> None:
        conn = self._conn
        if self.state == "open" and conn is not None:
            try:
                conn._write(OP_TEXT, payload)
            except ConnectionClosed:
                pass
            else:
                if id is not None:
                    self._in_flight.add(id)
                return
        if self.state == "closed":
            raise ClientClosed("client is closed")
        self._outbox.append((payload, id))
        if len(self._outbox) > self._outbox_size:  # full (or size 0): drop the oldest, as tether.js
            _, dropped = self._outbox.popleft()
            future = self._pending.get(dropped) if dropped is not None else None
            if future is not None and not future.done():
                future.set_exception(OutboxOverflow("dropped from the full outbox"))
            self._emit("outboxoverflow")

    def _flush(self, conn: Conn) -> None:
        while self._outbox and self._conn is conn:
            payload, id = self._outbox.popleft()
            conn._write(OP_TEXT, payload)
            if id is not None:
                self._in_flight.add(id)

    # -- plumbing ------------------------------------------------------------------------
    def _fail_pending(self, exc: Exception, futures: Mapping[int, asyncio.Future[Any]]) -> None:
        for future in list(futures.values()):
            if not future.done():
                future.set_exception(exc)

    def _emit(self, event: str, *args: Any) -> None:
        for fn in list(self._listeners.get(event, ())):
            try:
                fn(*args)
            except Exception:
                logger.exception("listener for %r failed", event)

    def _closed_for_good(self) -> bool:
        # A method, not an inline comparison: close() changes state while we await.
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
