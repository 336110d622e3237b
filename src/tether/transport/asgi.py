"""Run a tether handler (an :class:`tether.App` or any ``async def handler(conn)``) as an ASGI app.

.. code-block:: python

    from starlette.applications import Starlette
    from starlette.routing import Mount, WebSocketRoute

    app = tether.App()   # or: async def app(conn): ...

    web = Starlette(routes=[
        WebSocketRoute("/socket", app.asgi()),      # exactly /socket
        # Mount("/live", app.asgi()),               # anything under /live/
    ])
    # FastAPI: api.router.routes.append(WebSocketRoute("/socket", app.asgi()))
    #          or api.mount("/live", app.asgi())
    # then: uvicorn module:web

The handler gets the same :class:`tether.Conn` as on tether's own server; only the
:class:`ASGIWire` under it differs, and the same connection policy applies
(:mod:`tether.transport.base`: origin, auth, rate limit, max connections, identity expiry),
checked before ``websocket.accept``: a refusal is an HTTP response with the same status as on
tether's server when the ASGI server supports the ``websocket.http.response`` extension
(uvicorn does), else a close before accept (which ASGI servers answer with 403).

The ASGI server (uvicorn, hypercorn, ...) owns the socket, the handshake, pings and the close
handshake; this module translates ASGI events to ``Conn`` events and back:

- ``websocket.receive`` -> ``conn.on_message``; ``websocket.disconnect`` -> close frame + lost.
- ``Conn`` writes synchronously, so frames go to a queue drained by one writer task that awaits
  ``send`` (one write path). More than ``write_limit`` bytes pending pauses the ``Conn``'s
  writers (``send``/``emit`` wait) until the queue has drained to a quarter of it.
- ``pause_reading`` stops the reader task from pulling ``receive``, so the ASGI server's own
  flow control slows the peer.

Plain HTTP requests to the route get ``426 Upgrade Required``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ..auth import Auth
from ..conn import Conn, ConnSettings, Request, make_request
from ..proto.flow import WriteBuffer
from ..proto.frames import OP_TEXT
from ..proto.limits import RateLimit
from ..rooms.hub import Hub
from .base import Admitted, Handler, HttpResponse, Policy, run_handler

__all__ = ["ASGIApp", "ASGIWire", "asgi", "request_from_scope"]

logger = logging.getLogger("tether")

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]


def asgi(
    handler: Handler,
    *,
    max_message_size: int | None = 1 << 20,
    max_queue: int = 32,
    write_limit: int = 1 << 16,
    close_timeout: float = 5.0,
    heartbeat_interval: float | None = 20.0,
    heartbeat_timeout: float | None = 20.0,
    # Security (the same as tether.serve's; docs/security.md)
    allowed_origins: Iterable[str] | None = None,
    auth: Auth | None = None,
    rate_limit: RateLimit | None = None,
    max_connections: int | None = None,
    hub: Hub | None = None,
) -> ASGIApp:
    """Wrap ``handler`` as an ASGI application; see the module docstring.

    ``max_message_size`` (bytes, ``None`` = no limit) closes with 1009 when exceeded;
    ``max_queue`` messages buffer before reading pauses; ``write_limit`` bytes of queued
    outgoing frames pause ``send``; ``close_timeout`` bounds the closing handshake;
    ``heartbeat_interval``/``heartbeat_timeout`` drive a typed App's heartbeat messages
    (protocol pings are uvicorn's: its ``ws_ping_interval``/``ws_ping_timeout``).
    ``allowed_origins``, ``auth``, ``rate_limit`` and ``max_connections`` work as in
    :class:`tether.Server`. ``hub`` is the rooms hub of its connections (``app.asgi()`` passes
    the App's); the ASGI app starts it and closes it (its broker) in its lifespan.
    """
    settings = ConnSettings(max_queue=max_queue, close_timeout=close_timeout, ping_interval=heartbeat_interval, ping_timeout=heartbeat_timeout)
    policy = Policy(allowed_origins=allowed_origins, auth=auth, rate_limit=rate_limit, max_connections=max_connections)
    return ASGIApp(handler, settings, policy, max_message_size=max_message_size, write_limit=write_limit, hub=hub)


class ASGIApp:
    """An ASGI 3 application serving one tether handler. Make one with :func:`asgi`.

    It is a class instance, not a function, so Starlette's ``WebSocketRoute`` and ``Mount``
    call it as raw ASGI rather than as ``endpoint(websocket)``.
    """

    def __init__(
        self, handler: Handler, settings: ConnSettings, policy: Policy, *, max_message_size: int | None, write_limit: int, hub: Hub | None = None
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.policy = policy
        self.max_message_size = max_message_size
        self.write_limit = write_limit
        #: The rooms hub of the connections served here (the App's, from ``app.asgi()``).
        self.hub = hub if hub is not None else Hub()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await _upgrade_required(send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Start the hub, then close it (withdrawing presence, closing the broker) at shutdown.

        Served directly, the ASGI app runs this for its own lifespan events; mounted, pass it
        to the framework: ``Starlette(routes=[...], lifespan=asgi_app.lifespan)``.
        """
        await self.hub.start()
        try:
            yield
        finally:
            await self.hub.close()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Served directly (not mounted): startup and shutdown of the hub."""
        async with contextlib.AsyncExitStack() as stack:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await stack.enter_async_context(self.lifespan())
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await stack.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return  # the client went away before the handshake
        request = request_from_scope(scope)
        decision = self.policy.admit(request)
        if isinstance(decision, HttpResponse):
            await _refuse(scope, send, decision)
            return
        await send(_accept(decision))
        wire = ASGIWire(receive, send, write_limit=self.write_limit, max_message_size=self.max_message_size, drop_timeout=self.settings.close_timeout)
        conn = Conn(wire, request, self.settings, transport_pings=False)
        conn.hub = self.hub
        wire.start(conn)
        try:
            await run_handler(self.policy.open(conn, decision, self.handler), conn)
        finally:
            await wire.aclose()


class ASGIWire:
    """The :class:`tether.conn.Transport` over ASGI ``receive``/``send``.

    Call :meth:`start` with the ``Conn`` once it exists, :meth:`aclose` when done.
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        *,
        write_limit: int = 1 << 16,
        max_message_size: int | None = 1 << 20,
        drop_timeout: float = 5.0,
    ) -> None:
        self._receive = receive
        self._send = send
        self._buffer = WriteBuffer(write_limit)
        self._max = max_message_size
        self._drop_timeout = drop_timeout
        self._conn: Conn | None = None
        self._queue: deque[tuple[ASGIMessage, int]] = deque()
        self._can_read = asyncio.Event()
        self._can_read.set()
        self._wakeup = asyncio.Event()
        self._gone = False  # the peer disconnected, or we dropped the connection
        self._close_sent = False
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Bytes of frames queued or being sent."""
        return self._buffer.pending

    def start(self, conn: Conn) -> None:
        """Start the reader and writer tasks for ``conn``."""
        self._conn = conn
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._writer = loop.create_task(self._write())

    async def aclose(self) -> None:
        """Stop both tasks (the connection is over) and wait for them."""
        self._gone = True
        tasks = [t for t in (self._reader, self._writer) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                logger.error("ASGI wire task failed", exc_info=task.exception())

    # -- Transport -----------------------------------------------------------------------
    def write(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            self._enqueue({"type": "websocket.send", "text": payload.decode()}, len(payload))
        else:
            self._enqueue({"type": "websocket.send", "bytes": payload}, len(payload))

    def write_frame(self, frame: bytes, opcode: int, payload: bytes) -> None:
        """ASGI sends messages, not frames: send what the frame carries."""
        self.write(opcode, payload)

    def write_close(self, code: int, reason: str) -> None:
        self._enqueue({"type": "websocket.close", "code": code, "reason": reason}, 0)

    def ping(self, payload: bytes) -> None:
        """ASGI has no ping event: the ASGI server runs its own keepalive (uvicorn ``ws_ping_*``)."""

    def pong(self, payload: bytes) -> None:
        """The ASGI server answers pings itself."""

    def pause_reading(self) -> None:
        self._can_read.clear()

    def resume_reading(self) -> None:
        self._can_read.set()

    def disconnect(self) -> None:
        """Drop the connection: stop reading; the writer flushes what is queued (within
        ``drop_timeout``), then ``Conn`` learns the connection is lost and the ASGI app
        returns, which makes the server close the socket."""
        if self._reader is not None:
            self._reader.cancel()
        self._gone = True
        self._wakeup.set()
        if self._queue and self._writer is not None:
            # A peer that does not read must not keep the connection alive for ever.
            asyncio.get_running_loop().call_later(self._drop_timeout, self._writer.cancel)

    def abort(self) -> None:
        """Drop the connection now: what is queued is never sent."""
        self._queue.clear()
        if self._reader is not None:
            self._reader.cancel()
        if self._writer is not None:
            self._writer.cancel()
        self._gone = True

    # -- writing -------------------------------------------------------------------------
    def _enqueue(self, message: ASGIMessage, size: int) -> None:
        if self._gone:
            return
        self._queue.append((message, size))
        self._wakeup.set()
        if self._buffer.add(size) and self._conn is not None:
            self._conn.on_pause_writing()

    async def _write(self) -> None:
        """The writer task: the only caller of ``send``."""
        try:
            while True:
                while self._queue:
                    message, size = self._queue[0]
                    await self._send(message)
                    self._queue.popleft()
                    if self._buffer.sent(size) and self._conn is not None:
                        self._conn.on_resume_writing()
                    if message["type"] == "websocket.close":
                        self._close_sent = True
                        self._queue.clear()
                        # Read on: the server reports the end of the handshake as a disconnect.
                        self._can_read.set()
                if self._gone:
                    break
                self._wakeup.clear()
                await self._wakeup.wait()
        except OSError:
            pass  # the peer is gone (ASGI servers raise an OSError subclass on send)
        finally:
            self._lost()

    # -- reading -------------------------------------------------------------------------
    async def _read(self) -> None:
        """The reader task: pulls ``receive`` while reading is not paused."""
        conn = self._conn
        assert conn is not None
        while True:
            await self._can_read.wait()
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data: str | bytes = text if text is not None else (message.get("bytes") or b"")
                if self._max is not None and _size(data) > self._max:
                    conn.on_protocol_error(1009, "message too big")
                    return
                conn.on_message(data)
            elif kind == "websocket.disconnect":
                self._queue.clear()
                self._gone = True
                code = message.get("code", 1005)
                if not (self._close_sent and code == 1005):  # some servers report 1005 after our close
                    conn.on_close_frame(code, message.get("reason") or "")
                self._lost()
                return

    def _lost(self) -> None:
        self._gone = True
        self._wakeup.set()
        if self._conn is not None:
            self._conn.on_lost()


def _size(data: str | bytes) -> int:
    """A message's size in bytes, as the limit counts it on every transport."""
    if isinstance(data, bytes) or data.isascii():
        return len(data)
    return len(data.encode())


def request_from_scope(scope: Scope) -> Request:
    """The :class:`tether.Request` of an ASGI websocket scope."""
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
    qs = scope.get("query_string", b"").decode("latin-1")
    client = scope.get("client")
    remote = (str(client[0]), int(client[1])) if client else None
    path = scope.get("path") or "/"
    return make_request(f"{path}?{qs}" if qs else path, headers, remote)


def _accept(admitted: Admitted) -> ASGIMessage:
    message: ASGIMessage = {"type": "websocket.accept"}
    if admitted.subprotocol is not None:
        message["subprotocol"] = admitted.subprotocol
    return message


async def _refuse(scope: Scope, send: Send, response: HttpResponse) -> None:
    """Answer a refused upgrade with ``response``, or a close before accept (403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": ""})
        return
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(response.body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    await send({"type": "websocket.http.response.start", "status": response.status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": response.body})


async def _upgrade_required(send: Send) -> None:
    body = b"426 Upgrade Required: this path is a WebSocket endpoint\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"upgrade", b"websocket"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 426, "headers": headers})
    await send({"type": "http.response.body", "body": body})
