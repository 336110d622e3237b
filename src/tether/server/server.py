"""The standalone server: routes, static files, a health check, and ``serve``/``run``.

.. code-block:: python

    async def socket(conn: tether.Conn) -> None:
        async for message in conn:
            await conn.send(message)

    tether.run({"/socket": socket}, host="127.0.0.1", port=8000, static_dir="static")

A route's handler is any ``async def handler(conn)``; a :class:`tether.App` is one too.
The same port answers plain HTTP GETs: ``/health``, ``/ready``, ``/metrics`` (with
``metrics=True``), the browser client at ``/tether.js`` (and its ``/tether.d.ts``), and files
under ``static_dir``. Running it in production: docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import ssl as ssl_module
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from ..app import App
from ..auth import Auth
from ..conn import Conn, ConnSettings, Overflow, Request
from ..metrics import Metrics, broker_up, mark_dead, require
from ..proto.limits import RateLimit
from ..rooms.broker import Broker
from ..rooms.hub import Hub
from ..transport import picows
from ..transport.base import Admitted, Handler, HttpResponse, Policy, run_handler
from ..transport.picows import Accept, TransportSettings
from . import logs
from .http import TOO_LARGE, StaticFiles, check_upgrade, headers_too_large, metrics_response, readiness

__all__ = ["Server", "serve", "run_one", "Handler"]

logger = logging.getLogger("tether")

Routes = Mapping[str, Handler]

_GRACE = 0.25  # seconds for aborted connections' handlers to end, then for cancelled ones


class Server:
    """A running tether server. Use :func:`serve` to make one."""

    def __init__(
        self,
        routes: Handler | Routes,
        *,
        static_dir: str | Path | None = None,
        pages: Mapping[str, str] | None = None,
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
        # Operations (docs/deploy.md)
        metrics: bool | Metrics = False,
        forwarded_allow_ips: str | Iterable[str] | None = None,
        drain_delay: float = 0.0,
    ) -> None:
        self.routes: dict[str, Handler] = dict(routes) if isinstance(routes, Mapping) else {"/": routes}
        self.files = StaticFiles(static_dir, pages)
        self.shutdown_timeout = shutdown_timeout
        self.shutdown_spread = shutdown_spread
        #: Seconds ``/ready`` answers 503 at the start of :meth:`close` before connections close.
        self.drain_delay = drain_delay
        #: True from the start of :meth:`close`: ``/ready`` answers 503.
        self.draining = False
        #: Origin, auth, rate limit and max connections (the same policy under ASGI and in tests).
        self.policy = Policy(
            allowed_origins=allowed_origins,
            auth=auth,
            rate_limit=rate_limit,
            max_connections=max_connections,
            forwarded_allow_ips=forwarded_allow_ips,
        )
        conn = ConnSettings(
            max_queue=max_queue,
            close_timeout=close_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            max_send_queue=max_send_queue,
            send_overflow=Overflow(send_overflow),
        )
        self.settings = TransportSettings(conn, max_message_size=max_message_size, handshake_timeout=handshake_timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        #: This process's rooms hub (:class:`tether.Hub`); Apps without a broker of their own use it.
        self.hub = Hub(broker, max_rooms=max_rooms)
        self._hubs = _bind_hubs(self.routes.values(), self.hub)
        #: The metrics at ``/metrics`` (:class:`tether.metrics.Metrics`), or None (off).
        self.metrics = _make_metrics(metrics)
        if self.metrics is not None:
            for hub in self._hubs:
                self.metrics.watch(hub.broker)
                setattr(hub, "metrics", self.metrics)  # noqa: B010  (read by Hub's fan-out hook)

    @property
    def connections(self) -> set[Conn]:
        """Open connections."""
        return self.policy.connections

    @property
    def static_dir(self) -> Path | None:
        return self.files.directory

    @property
    def ready(self) -> bool:
        """What ``/ready`` says: not draining, and every broker in use reachable."""
        return not self.draining and all(broker_up(hub.broker) for hub in self._hubs)

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 8000, *, ssl: ssl_module.SSLContext | None = None, reuse_port: bool = False) -> None:
        """Start listening. ``port=0`` picks a free port: read it from :attr:`port`."""
        for hub in self._hubs:
            await hub.start()
        self._server = await picows.create_server(self.route, host, port, self.settings, ssl=ssl, reuse_port=reuse_port)
        if self.metrics is not None:
            self.metrics.start(asyncio.get_running_loop().call_later)

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        assert self._server is not None, "server not started"
        await self._server.serve_forever()

    async def close(self, code: int = 1001, reason: str | None = None) -> None:
        """Shut down gracefully, within ``drain_delay + shutdown_timeout`` seconds (and one more
        at most).

        ``/ready`` answers 503 from the start; for ``drain_delay`` seconds everything else is
        served as before (a load balancer's health check has time to take this server out of
        rotation). Then: stop accepting; stop reading from every connection; let handlers that are already
        running finish their replies (at most half the timeout); then close each connection
        with ``code`` (1001 by default) and the reason ``"going away; retry_after=<s>"``, where
        ``s`` is spread at random over ``shutdown_spread`` seconds so clients do not all come
        back at once. At the deadline, connections still open are aborted (a peer that does not
        read cannot hold the shutdown), handlers still running are cancelled, and the brokers
        get what time is left, at least a second, to withdraw this process's presence.
        """
        loop = asyncio.get_running_loop()
        already, self.draining = self.draining, True
        if self.drain_delay > 0 and self._server is not None and not already:
            logger.info("draining: /ready answers 503; connections close in %.1fs", self.drain_delay)
            await asyncio.sleep(self.drain_delay)  # the drain period itself, not a wait for a condition
        if self._server is not None:
            self._server.close()
        deadline = loop.time() + self.shutdown_timeout
        busy = [f for c in self.connections if c.consumer is not None for f in c.consumer.busy()]
        for conn in self.connections:
            conn.pause_reading()
        if busy:
            await asyncio.wait(busy, timeout=self.shutdown_timeout / 2)
        for conn in list(self.connections):
            # Starting the close reads again, for the peer's close frame (data is now ignored).
            conn.start_close(code, reason if reason is not None else _going_away(self.shutdown_spread))
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(0.0, deadline - loop.time()))
        for conn in list(self.connections):
            conn.drop()  # still there at the deadline: abort
        await self._cancel_handlers(grace=_GRACE)
        for hub in self._hubs:
            try:
                await asyncio.wait_for(hub.close(), max(_GRACE, deadline - loop.time()))
            except TimeoutError:
                logger.warning("rooms hub did not close within the shutdown timeout")
        if self.metrics is not None:
            self.metrics.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _cancel_handlers(self, grace: float) -> None:
        """Let handlers of aborted connections end (their connection is lost on the next loop
        iteration); cancel those still running after ``grace`` seconds."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("cancelled %d handlers still running at the shutdown deadline", len(pending))
            await asyncio.wait(pending, timeout=grace)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- routing -----------------------------------------------------------------------
    def route(self, request: Request) -> HttpResponse | Accept:
        """The answer to one HTTP request: a page, a refusal, or an upgrade to a handler."""
        answer = self._route(request)
        metrics = self.metrics
        if metrics is not None and isinstance(answer, HttpResponse):
            if request.path in self.routes:
                metrics.refused(answer.status)
            else:
                metrics.http_response(answer.status)
        return answer

    def _route(self, request: Request) -> HttpResponse | Accept:
        if headers_too_large(request.headers):
            return TOO_LARGE
        handler = self.routes.get(request.path)
        if handler is None:
            return self._page(request)
        refusal = check_upgrade(request)
        if refusal is not None:
            return refusal
        decision = self.policy.admit(request)
        if isinstance(decision, HttpResponse):
            return decision
        headers = (("Sec-WebSocket-Protocol", decision.subprotocol),) if decision.subprotocol else ()
        return Accept(partial(self._open, handler, decision), headers)

    def _page(self, request: Request) -> HttpResponse:
        path = request.path
        if path == "/ready":
            return readiness(self.draining, all(broker_up(hub.broker) for hub in self._hubs))
        if path == "/metrics" and self.metrics is not None:
            return metrics_response(*self.metrics.render(request.headers.get("Accept", "")))
        return self.files.get(path)

    # -- connections -------------------------------------------------------------------
    def _open(self, handler: Handler, admitted: Admitted, conn: Conn) -> None:
        conn.hub = self.hub
        run = self.policy.open(conn, admitted, handler)  # behind a proxy: the client's address from here on
        metrics = self.metrics
        if metrics is not None:
            metrics.opened()
            conn.metrics = metrics  # the hooks of Conn and its Dispatcher report here
        log = logs.access_enabled()
        if log:
            logs.log_open(conn)
        if log or metrics is not None:
            conn.on_close(partial(self._closed, time.monotonic(), log))
        # One coroutine frame per connection, not two: idle connections should be cheap. The
        # task leaves _tasks as it ends (run_handler's finally; a task cancelled before its first
        # step would stay, but handlers are cancelled only at shutdown, long after they started).
        self._tasks.add(asyncio.get_running_loop().create_task(run_handler(run, conn, self._tasks)))

    def _closed(self, opened: float, log: bool, conn: Conn) -> None:
        if self.metrics is not None:
            self.metrics.closed(conn.close_code)
        if log:
            logs.log_close(conn, time.monotonic() - opened)


def _make_metrics(setting: bool | Metrics) -> Metrics | None:
    """``metrics=True``: one process's metrics, or a worker's when ``PROMETHEUS_MULTIPROC_DIR``
    names the directory the workers share (``tether run --workers N`` sets it)."""
    if isinstance(setting, Metrics):
        return setting
    if not setting:
        return None
    require()
    return Metrics(directory=os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None)


def _going_away(spread: float) -> str:
    return f"going away; retry_after={random.uniform(0.0, spread):.2f}"


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


def run_one(routes: Handler | Routes, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """One server process until SIGINT or SIGTERM, then a graceful shutdown (uvloop if installed)."""

    async def main() -> None:
        async with serve(routes, host, port, **kwargs) as server:
            scheme = "https" if kwargs.get("ssl") is not None else "http"
            logger.info("tether serving on %s://%s:%d", scheme, host, server.port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            logger.info("shutting down")

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(main())
    finally:
        # A worker of several: its live gauges in the shared metrics directory go with it.
        mark_dead(os.getpid(), os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None)


def _bind_hubs(handlers: Iterable[Handler], hub: Hub) -> list[Hub]:
    """Give ``hub`` to mounted Apps that have no broker of their own; return every hub in use."""
    hubs = [hub]
    for handler in handlers:
        if isinstance(handler, App):
            used = handler.bind_hub(hub)
            if used not in hubs:
                hubs.append(used)
    return hubs


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
