"""A TCP proxy on 127.0.0.1 that a test cuts: the network failures a resume must survive.

- :meth:`CutProxy.cut` aborts every connection open now (both sides get a reset, as when a
  NAT or a mobile network drops a path);
- :meth:`CutProxy.refuse` / :meth:`CutProxy.admit`: while refusing, a new connection is
  reset as soon as it is accepted (the network is still down);
- :meth:`CutProxy.swallow` makes the connections open now drop what goes ``"up"`` (client to
  server) or ``"down"`` without forwarding it: bytes written before a cut that never arrive.
  :attr:`swallowed` is set once some were.

.. code-block:: python

    async with CutProxy(server.port) as proxy:
        connect(f"ws://127.0.0.1:{proxy.port}/ws")
        proxy.refuse()
        proxy.cut()        # the client reconnects, and is refused until admit()
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Literal

__all__ = ["CutProxy"]

Direction = Literal["up", "down"]


class _Pipe:
    """One proxied connection: client <-> upstream."""

    def __init__(self, proxy: CutProxy, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers = (client, upstream)
        self.swallow: set[Direction] = set()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: Direction) -> None:
        try:
            while data := await reader.read(65536):
                if direction in self.swallow:
                    self.proxy.swallowed.set()
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        self.abort()

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.proxy.pipes.discard(self)


class CutProxy:
    """Listen on 127.0.0.1 (a free port, :attr:`port`) and forward to ``upstream_port``.

    :attr:`accepted` counts connections accepted (refused ones included), :attr:`cuts`
    the connections :meth:`cut` aborted.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.accepted = 0
        self.cuts = 0
        self.refusing = False
        self.swallowed = asyncio.Event()
        self.pipes: set[_Pipe] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> int:
        """Reset every connection open now; returns how many there were."""
        pipes = list(self.pipes)
        for pipe in pipes:
            pipe.abort()
        self.cuts += len(pipes)
        return len(pipes)

    def refuse(self) -> None:
        """Reset new connections as soon as they are accepted (until :meth:`admit`)."""
        self.refusing = True

    def admit(self) -> None:
        self.refusing = False

    def swallow(self, direction: Direction) -> None:
        """Drop, from now on, what the connections open now carry in ``direction``."""
        self.swallowed.clear()
        for pipe in self.pipes:
            pipe.swallow.add(direction)

    async def start(self) -> CutProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> CutProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            client_writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.transport.abort()
            return
        if self.refusing:  # refused while we were connecting upstream
            client_writer.transport.abort()
            up_writer.transport.abort()
            return
        pipe = _Pipe(self, client_writer, up_writer)
        self.pipes.add(pipe)
        loop = asyncio.get_running_loop()
        routes: tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter, Direction], ...] = (
            (client_reader, up_writer, "up"),
            (up_reader, client_writer, "down"),
        )
        for reader, writer, direction in routes:
            task = loop.create_task(pipe.pump(reader, writer, direction))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
