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
:class:`ASGIWire` under it differs. The ASGI server (uvicorn, hypercorn, ...) owns the socket,
the handshake, pings and the close handshake; this module translates ASGI events to ``Conn``
events and back:

- ``websocket.receive`` -> ``conn._on_data``; ``websocket.disconnect`` -> close frame + lost.
- ``Conn`` writes synchronously, so frames go to a queue drained by one writer task that awaits
  ``send`` (one write path). More than ``write_limit`` bytes pending pauses the ``Conn``'s
  writers (``send``/``emit`` wait) until the queue has drained to a quarter of it.
- ``pause_reading`` stops the reader task from pulling ``receive``, so the ASGI server's own
  flow control slows the peer.

Plain HTTP requests to the route get ``426 Upgrade Required``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from .conn import Conn, Request
from .protocol import OP_BINARY, OP_TEXT
from .server import Handler, run_handler

__all__ = ["ASGIApp", "ASGIWire", "asgi"]

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
) -> ASGIApp:
    """Wrap ``handler`` as an ASGI application; see the module docstring.

    ``max_message_size`` (bytes, ``None`` = no limit) closes with 1009 when exceeded;
    ``max_queue`` messages buffer before reading pauses; ``write_limit`` bytes of queued
    outgoing frames pause ``send``; ``close_timeout`` bounds the closing handshake;
    ``heartbeat_interval``/``heartbeat_timeout`` drive a typed App's heartbeat messages
    (protocol pings are uvicorn's: its ``ws_ping_interval``/``ws_ping_timeout``).
    """
    app = ASGIApp(
        handler, max_message_size=max_message_size, max_queue=max_queue, write_limit=write_limit, close_timeout=close_timeout
    )
    app.heartbeat = (heartbeat_interval, heartbeat_timeout)
    return app


class ASGIApp:
    """An ASGI 3 application serving one tether handler. Make one with :func:`asgi`.

    It is a class instance, not a function, so Starlette's ``WebSocketRoute`` and ``Mount``
    call it as raw ASGI rather than as ``endpoint(websocket)``.
    """

    def __init__(self, handler: Handler, *, max_message_size: int | None, max_queue: int, write_limit: int, close_timeout: float) -> None:
        self.handler = handler
        self.max_message_size = max_message_size
        self.max_queue = max_queue
        self.write_limit = write_limit
        self.close_timeout = close_timeout
        self.heartbeat: tuple[float | None, float | None] = (20.0, 20.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await _upgrade_required(send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return  # the client went away before the handshake
        await send({"type": "websocket.accept"})
        wire = ASGIWire(
            receive, send, write_limit=self.write_limit, max_message_size=self.max_message_size, drop_timeout=self.close_timeout
        )
        conn = Conn(wire, request_from_scope(scope), max_queue=self.max_queue, close_timeout=self.close_timeout)
        wire.start(conn)
        conn._start_keepalive(*self.heartbeat, pings=False)
        try:
            await run_handler(self.handler, conn)
        finally:
            await wire.aclose()


class ASGIWire:
    """The :class:`tether.conn.Wire` over ASGI ``receive``/``send``.

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
        self._limit = write_limit
        self._max = max_message_size
        self._drop_timeout = drop_timeout
        self._conn: Conn | None = None
        self._queue: deque[tuple[ASGIMessage, int]] = deque()
        #: Bytes of frames queued or being sent.
        self.pending = 0
        self._paused = False  # Conn's writers paused by us
        self._can_read = asyncio.Event()
        self._can_read.set()
        self._wakeup = asyncio.Event()
        self._gone = False  # the peer disconnected, or we dropped the connection
        self._close_sent = False
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None

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

    # -- Wire ----------------------------------------------------------------------------
    def write(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_TEXT:
            self._enqueue({"type": "websocket.send", "text": payload.decode()}, len(payload))
        else:
            assert opcode == OP_BINARY
            self._enqueue({"type": "websocket.send", "bytes": payload}, len(payload))

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

    # -- writing -------------------------------------------------------------------------
    def _enqueue(self, message: ASGIMessage, size: int) -> None:
        if self._gone:
            return
        self._queue.append((message, size))
        self.pending += size
        self._wakeup.set()
        if self.pending > self._limit and not self._paused and self._conn is not None:
            self._paused = True
            self._conn._on_pause_writing()

    async def _write(self) -> None:
        """The writer task: the only caller of ``send``."""
        try:
            while True:
                while self._queue:
                    message, size = self._queue[0]
                    await self._send(message)
                    self._queue.popleft()
                    self._sent(size)
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

    def _sent(self, size: int) -> None:
        self.pending -= size
        if self._paused and self.pending <= self._limit // 4:
            self._paused = False
            assert self._conn is not None
            self._conn._on_resume_writing()

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
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                if self._max is not None and len(data) > self._max:
                    conn._on_fail(1009, "message too big")
                    return
                conn._on_data(data)
            elif kind == "websocket.disconnect":
                self._queue.clear()
                self._gone = True
                code = message.get("code", 1005)
                if not (self._close_sent and code == 1005):  # some servers report 1005 after our close
                    conn._on_close_frame(code, message.get("reason") or "")
                self._lost()
                return

    def _lost(self) -> None:
        self._gone = True
        self._wakeup.set()
        if self._conn is not None:
            self._conn._on_lost()


def request_from_scope(scope: Scope) -> Request:
    """The :class:`tether.Request` of an ASGI websocket scope."""
    headers = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ()))
    qs = scope.get("query_string", b"").decode("latin-1")
    query = MultiDictProxy(MultiDict(parse_qsl(qs, keep_blank_values=True)))
    client = scope.get("client")
    remote = (str(client[0]), int(client[1])) if client else None
    return Request(scope.get("path") or "/", CIMultiDictProxy(headers), query, remote)


async def _upgrade_required(send: Send) -> None:
    body = b"426 Upgrade Required: this path is a WebSocket endpoint\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"upgrade", b"websocket"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 426, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Served directly (not mounted), the app has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
