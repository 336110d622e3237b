"""A TCP proxy for tests that behaves like nginx in front of a WebSocket server.

- **Idle cut** (``proxy_read_timeout``): a connection is closed, both sides, once no byte went
  from upstream to the client for more than ``idle_timeout`` seconds. Bytes from the client
  do not count, as in nginx: only reads from the upstream reset the timer.
- **Blackhole**: :meth:`IdleProxy.blackhole` makes the connections open at that moment stop
  forwarding in both directions (closes included) while their TCP connections stay open (a dead server behind a
  proxy, or a network path that silently drops packets). Connections made afterwards are
  forwarded normally, so a client that gives up and reconnects gets through.

.. code-block:: python

    async with IdleProxy(upstream_port, idle_timeout=1.0) as proxy:
        connect(f"ws://127.0.0.1:{proxy.port}/ws")
        await proxy.cut.wait()        # an idle connection was closed by the proxy

No sleeps: the idle check is a timer re-armed for the moment the connection would go idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

__all__ = ["IdleProxy"]


class _Pipe:
    """One proxied connection: client <-> upstream."""

    def __init__(self, proxy: IdleProxy, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.last_down = time.monotonic()  # last byte upstream -> client
        self.blackholed = False
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        timeout = self.proxy.idle_timeout
        if timeout is None or self.closed:
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(loop.time() + self.last_down + timeout - time.monotonic(), self._check)

    def _check(self) -> None:
        assert self.proxy.idle_timeout is not None
        if time.monotonic() - self.last_down > self.proxy.idle_timeout:
            self.proxy.cuts += 1
            self.proxy.cut.set()
            self.close()
        else:
            self._arm()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, downstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if self.blackholed:
                    continue  # swallowed: the TCP connection stays open, nothing gets through
                if downstream:
                    self.last_down = time.monotonic()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        if not self.blackholed:  # a blackhole hides even a close: the other side never learns
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for writer in (self.client, self.upstream):
            writer.transport.abort()
        self.proxy.pipes.discard(self)


class IdleProxy:
    """Listen on 127.0.0.1 (a free port, :attr:`port`) and forward to ``upstream_port``.

    ``idle_timeout=None`` never cuts. Counters: :attr:`accepted` connections, :attr:`cuts`
    made for idleness (and :attr:`cut`, an event set at the first one).
    """

    def __init__(self, upstream_port: int, *, idle_timeout: float | None) -> None:
        self.upstream_port = upstream_port
        self.idle_timeout = idle_timeout
        self.accepted = 0
        self.cuts = 0
        self.cut = asyncio.Event()
        self.pipes: set[_Pipe] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def blackhole(self) -> None:
        """Stop forwarding on every connection open now; keep them open."""
        for pipe in self.pipes:
            pipe.blackholed = True
            if pipe.timer is not None:
                pipe.timer.cancel()  # a blackholed connection is never cut: that is the point

    async def start(self) -> IdleProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self.pipes):
            pipe.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> IdleProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        pipe = _Pipe(self, client_writer, up_writer)
        self.pipes.add(pipe)
        loop = asyncio.get_running_loop()
        for reader, writer, down in ((client_reader, up_writer, False), (up_reader, client_writer, True)):
            task = loop.create_task(pipe.pump(reader, writer, down))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
