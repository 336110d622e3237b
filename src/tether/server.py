"""The standalone server: routes, static files, a health check, and ``serve``/``run``.

.. code-block:: python

    async def socket(conn: tether.Conn) -> None:
        async for message in conn:
            await conn.send(message)

    tether.run({"/socket": socket}, host="127.0.0.1", port=8000, static_dir="static")

A route's handler is any ``async def handler(conn)``; a :class:`tether.App` is one too.
The same port answers plain HTTP GETs: ``/health``, the browser client at ``/tether.js``
(and its ``/tether.d.ts``), and files under ``static_dir``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import mimetypes
import random
import signal
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from . import _picows
from ._picows import Accept, HttpResponse, TransportSettings
from .auth import SUBPROTOCOL, TOKEN_EXPIRED, UNAUTHORIZED, Auth, subprotocols
from .broker import Broker
from .conn import Conn, Overflow, Request
from .errors import CloseConnection, ConnectionClosed
from .limits import RateLimit, TokenBucket
from .rooms import Hub

__all__ = ["Server", "serve", "run", "Handler"]

logger = logging.getLogger("tether")

Handler = Callable[[Conn], Awaitable[None]]
Routes = Mapping[str, Handler]

_CLIENT_FILES = {"/tether.js": "tether.js", "/tether.d.ts": "tether.d.ts"}
# Request header limits (answered with 431). picows itself answers 400 beyond 128 headers and
# drops a request head of 16 KiB or more; a single 9 KB line would pass it.
MAX_HEADERS = 100
MAX_HEADER_LINE = 8192


class Server:
    """A running tether server. Use :func:`serve` to make one."""

    def __init__(
        self,
        routes: Handler | Routes,
        *,
        static_dir: str | Path | None = None,
        allowed_origins: Iterable[str] | None = None,
        # Limits
        max_message_size: int | None = 1 << 20,
        max_queue: int = 32,
        max_connections: int | None = None,
        # Timeouts
        handshake_timeout: float | None = 5.0,
        close_timeout: float = 5.0,
        shutdown_timeout: float = 10.0,
        # Keepalive
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        # Security
        auth: Auth | None = None,
        rate_limit: RateLimit | None = None,
        shutdown_spread: float = 5.0,
        # Rooms and broadcast (docs/rooms.md)
        broker: str | Broker | None = None,
        max_send_queue: int | None = 256,
        max_rooms: int | None = 100,
        send_overflow: Overflow | str = Overflow.DROP_OLDEST,
    ) -> None:
        self.routes: dict[str, Handler] = dict(routes) if isinstance(routes, Mapping) else {"/": routes}
        self.static_dir = Path(static_dir).resolve() if static_dir is not None else None
        self.allowed_origins = None if allowed_origins is None else frozenset(allowed_origins)
        self.max_connections = max_connections
        self.shutdown_timeout = shutdown_timeout
        self.shutdown_spread = shutdown_spread
        self.auth = auth
        self.rate_limit = rate_limit
        self.settings = TransportSettings(
            max_message_size=max_message_size,
            max_queue=max_queue,
            close_timeout=close_timeout,
            handshake_timeout=handshake_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_send_queue=max_send_queue,
            send_overflow=Overflow(send_overflow),
        )
        #: Open connections.
        self.connections: set[Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        #: This process's rooms hub (:class:`tether.Hub`); Apps without a broker of their own use it.
        self.hub = Hub(broker, max_rooms=max_rooms)
        self._hubs = _bind_hubs(self.routes.values(), self.hub)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 8000, *, ssl: ssl_module.SSLContext | None = None, reuse_port: bool = False) -> None:
        """Start listening. ``port=0`` picks a free port: read it from :attr:`port`."""
        for hub in self._hubs:
            await hub.start()
        self._server = await _picows.create_server(self._route, host, port, self.settings, ssl=ssl, reuse_port=reuse_port)

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        assert self._server is not None, "server not started"
        await self._server.serve_forever()

    async def close(self, code: int = 1001, reason: str | None = None) -> None:
        """Shut down gracefully, within ``shutdown_timeout`` seconds.

        Stop accepting; stop reading from every connection; let handlers that are already
        running finish their replies; then close each connection with ``code`` (1001 by
        default) and the reason ``"going away; retry_after=<s>"``, where ``s`` is spread
        at random over ``shutdown_spread`` seconds so clients do not all come back at once.
        """
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        busy = [t for c in self.connections for t in c.assigns.get("_tether_tasks", ())]
        for conn in self.connections:
            conn._wire.pause_reading()
        if busy:
            await asyncio.wait(busy, timeout=self.shutdown_timeout / 2)
        for conn in list(self.connections):
            conn._wire.resume_reading()  # to read the peer's close frame; data is now ignored
            conn._start_close(code, reason if reason is not None else _going_away(self.shutdown_spread))
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        for conn in list(self.connections):
            conn._wire.disconnect()
        if self._server is not None:
            await self._server.wait_closed()
        for hub in self._hubs:
            await hub.close()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- routing -----------------------------------------------------------------------
    def _route(self, request: Request) -> HttpResponse | Accept:
        if _headers_too_large(request.headers):
            return HttpResponse(431, b"431 Request Header Fields Too Large\n")
        handler = self.routes.get(request.path)
        if handler is None:
            return self._http_get(request.path)
        refusal = self._check_upgrade(request)
        if refusal is not None:
            return refusal
        identity: Any = None
        if self.auth is not None:
            try:
                identity = self.auth(request)
            except CloseConnection as exc:
                return _auth_refusal(exc.code)
            if identity is None:
                return _auth_refusal(UNAUTHORIZED)
        headers = (("Sec-WebSocket-Protocol", SUBPROTOCOL),) if SUBPROTOCOL in subprotocols(request) else ()
        return Accept(lambda conn: self._open(handler, conn, identity), headers)

    def _check_upgrade(self, request: Request) -> HttpResponse | None:
        headers = request.headers
        if "websocket" not in headers.get("Upgrade", "").lower():
            return HttpResponse(426, b"426 Upgrade Required: this path is a WebSocket endpoint\n", (("Upgrade", "websocket"),))
        if headers.get("Sec-WebSocket-Version") != "13":
            # RFC 6455 section 4.2.2: tell the client which version we speak.
            return HttpResponse(426, b"426 Upgrade Required: WebSocket version 13 only\n", (("Sec-WebSocket-Version", "13"),))
        if not self._origin_allowed(headers):
            return HttpResponse(403, b"403 Forbidden: origin not allowed\n")
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            return HttpResponse(503, b"503 Service Unavailable: too many connections\n", (("Retry-After", "1"),))
        return None

    def _origin_allowed(self, headers: Mapping[str, str]) -> bool:
        """Same-origin by default (RFC 6455 section 10.2); clients that send no Origin pass."""
        origin = headers.get("Origin")
        if origin is None:
            return True
        if self.allowed_origins is not None:
            return "*" in self.allowed_origins or origin in self.allowed_origins
        return urlsplit(origin).netloc.lower() == headers.get("Host", "").lower()

    def _http_get(self, path: str) -> HttpResponse:
        if path == "/health":
            return HttpResponse(200, b"ok\n")
        if path in _CLIENT_FILES:
            body = resources.files("tether").joinpath("static", _CLIENT_FILES[path]).read_bytes()
            return _file_response(_CLIENT_FILES[path], body)
        name = unquote(path)  # browsers percent-encode names ("a%20b.txt")
        if self.static_dir is not None and "\0" not in name:
            target = (self.static_dir / name.lstrip("/")).resolve()
            if target.is_dir():
                target = target / "index.html"
            if target.is_relative_to(self.static_dir) and target.is_file():
                return _file_response(target.name, target.read_bytes())
        return HttpResponse(404, b"404 Not Found\n")

    # -- connections -------------------------------------------------------------------
    def _open(self, handler: Handler, conn: Conn, identity: Any) -> None:
        self.connections.add(conn)
        conn.hub = self.hub
        if self.rate_limit is not None:
            conn._rate = TokenBucket(self.rate_limit, time.monotonic())
        if inspect.isawaitable(identity):
            handler = _authenticated(identity, handler)
        else:
            _set_identity(conn, identity)
        # One coroutine frame per connection, not two: idle connections should be cheap.
        task = asyncio.get_running_loop().create_task(run_handler(handler, conn))
        self._tasks.add(task)
        task.add_done_callback(partial(self._closed, conn))

    def _closed(self, conn: Conn, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.connections.discard(conn)


async def run_handler(handler: Handler, conn: Conn) -> None:
    """Run ``handler`` on ``conn`` and close it; shared by every transport (picows, ASGI, memory).

    ``CloseConnection`` closes with its code, any other exception with 1011 (logged here,
    never sent to the peer), a normal return with 1000. Returns once ``conn`` is closed.
    """
    try:
        await handler(conn)
    except ConnectionClosed:
        pass
    except CloseConnection as exc:
        conn._start_close(exc.code, exc.reason)
    except Exception:
        logger.exception("handler for %s failed; closing with 1011", conn.path)
        conn._start_close(1011, "internal error")
    else:
        conn._start_close(1000, "")
    await conn.wait_closed()


def _headers_too_large(headers: Mapping[str, str]) -> bool:
    """More than MAX_HEADERS headers, or a header value longer than a MAX_HEADER_LINE line.

    Only values are measured: iterating a multidict's keys materializes ~0.5 KiB per
    connection that it then keeps. Names are bounded by picows' 16 KiB limit on the head.
    """
    return len(headers) > MAX_HEADERS or any(len(v) + 2 > MAX_HEADER_LINE for v in headers.values())


def _going_away(spread: float) -> str:
    return f"going away; retry_after={random.uniform(0.0, spread):.2f}"


def _auth_refusal(code: int) -> HttpResponse:
    if code == UNAUTHORIZED:
        return HttpResponse(401, b"401 Unauthorized\n")
    return HttpResponse(403, b"403 Forbidden\n")


def _set_identity(conn: Conn, identity: Any) -> None:
    """Attach the identity; close with 4002 when its credentials expire."""
    conn.identity = identity
    expires_at = getattr(identity, "expires_at", None)
    if expires_at is not None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, expires_at - time.time()), conn._start_close, TOKEN_EXPIRED, "token expired")
        conn._closed.add_done_callback(lambda _: timer.cancel())


def _authenticated(pending: Awaitable[Any], handler: Handler) -> Handler:
    """Run an async ``auth`` after the upgrade, then the handler (4001 when it says no)."""

    async def run(conn: Conn) -> None:
        identity = await pending
        if identity is None:
            raise CloseConnection(UNAUTHORIZED, "unauthorized")
        _set_identity(conn, identity)
        await handler(conn)

    return run


def _file_response(name: str, body: bytes) -> HttpResponse:
    ctype = {".js": "text/javascript", ".ts": "text/plain"}.get(Path(name).suffix) or mimetypes.guess_type(name)[0]
    ctype = ctype or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    return HttpResponse(200, body, (("Content-Type", ctype), ("Cache-Control", "no-cache")))


class _Serve:
    """``await serve(...)`` or ``async with serve(...) as server``."""

    def __init__(self, server: Server, host: str, port: int, kwargs: dict[str, Any]) -> None:
        self.server, self._args = server, (host, port, kwargs)

    def __await__(self) -> Generator[Any, None, Server]:
        return self._start().__await__()

    async def _start(self) -> Server:
        host, port, kwargs = self._args
        await self.server.start(host, port, **kwargs)
        return self.server

    async def __aenter__(self) -> Server:
        return await self._start()

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()


def serve(
    routes: Handler | Routes,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    ssl: ssl_module.SSLContext | None = None,
    reuse_port: bool = False,
    **settings: Any,
) -> _Serve:
    """Start a server; see :class:`Server` for the settings.

    ``routes`` maps paths to handlers (``{"/socket": socket}``); a single handler is
    mounted at ``/``.
    """
    return _Serve(Server(routes, **settings), host, port, {"ssl": ssl, "reuse_port": reuse_port})


def run(routes: Handler | Routes, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1, **kwargs: Any) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully. Uses uvloop when installed.

    ``workers=N`` runs N processes on the same port (``tether.workers``); they need a shared
    ``broker=`` (e.g. ``"redis://127.0.0.1:6379/0"``), else ``ValueError``.
    """
    if workers != 1:
        from .workers import serve_workers

        serve_workers(routes, host, port, workers=workers, **kwargs)
        return

    async def main() -> None:
        async with serve(routes, host, port, **kwargs) as server:
            logger.info("tether serving on http://%s:%d", host, server.port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            logger.info("shutting down")

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


def _bind_hubs(handlers: Iterable[Handler], hub: Hub) -> list[Hub]:
    """Give ``hub`` to mounted Apps that have no broker of their own; return every hub in use."""
    hubs = [hub]
    for handler in handlers:
        bind = getattr(handler, "_bind_hub", None)
        if bind is not None:
            used = bind(hub)
            if used not in hubs:
                hubs.append(used)
    return hubs


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop

