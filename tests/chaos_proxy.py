"""A TCP proxy on 127.0.0.1 that cuts connections: by hand, or each one after a random time.

    proxy = ChaosProxy([backend_port, other_port])      # backends used in turn, one per connection
    await proxy.start()
    ...  connect clients to ws://127.0.0.1:{proxy.port}/...
    proxy.cut_all()                                      # every connection dropped at once
    proxy.chaos(0.1, 0.5)                                # from now: each lives 100-500 ms, then is cut

A cut aborts both sides (RST to the client and to the server), the way a dropped NAT entry or
a dead wifi link looks to both ends once they notice. ``cuts`` counts them; ``picks`` records
which backend each connection went to, so a test can check a client moved between servers;
``upstreams`` the local port of each connection to a backend (the client port the backend sees),
so that a test can tell which of several processes sharing one port served it.
"""

from __future__ import annotations

import asyncio
import random
import socket
from contextlib import suppress


class ChaosProxy:
    def __init__(self, backends: list[int], *, seed: int = 1, rcvbuf: int | None = None) -> None:
        """``rcvbuf``: SO_RCVBUF of the sockets to the backends (a small one stops the kernel
        from absorbing what the proxy does not read while :meth:`stall` holds it)."""
        self.backends = list(backends)
        self.rcvbuf = rcvbuf
        self._stalled = False
        self.port = 0
        self.cuts = 0
        self.picks: list[int] = []
        self.upstreams: list[int] = []
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._chaos: tuple[float, float] | None = None
        self._blocked = False
        self._next = 0

    async def start(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def chaos(self, low: float, high: float) -> None:
        """From now on cut every connection (those open now too) after a random
        ``low``..``high`` seconds."""
        self._chaos = (low, high)
        loop = asyncio.get_running_loop()
        for pair in list(self._pairs):
            loop.call_later(self._random.uniform(low, high), self._cut, pair)

    def calm(self) -> None:
        self._chaos = None

    def block(self) -> None:
        """Refuse new connections (accept, then drop at once) until :meth:`unblock`."""
        self._blocked = True

    def unblock(self) -> None:
        self._blocked = False

    def stall(self) -> None:
        """Stop reading from the backends (the client looks like a peer that stopped
        reading) until :meth:`flow`; new connections stall too."""
        self._stalled = True
        for _, up_writer in self._pairs:
            up_writer.transport.pause_reading()

    def flow(self) -> None:
        self._stalled = False
        for _, up_writer in self._pairs:
            up_writer.transport.resume_reading()

    def cut_all(self) -> None:
        for pair in list(self._pairs):
            self._cut(pair)

    def _cut(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        if pair in self._pairs:
            self._pairs.discard(pair)
            self.cuts += 1
            for writer in pair:
                writer.transport.abort()
                writer.close()  # the StreamWriter too (else it warns when collected)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            writer.transport.abort()
            writer.close()
            return
        backend = self.backends[self._next % len(self.backends)]
        self._next += 1
        self.picks.append(backend)
        try:
            if self.rcvbuf is None:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)  # before connect
                sock.setblocking(False)
                try:
                    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", backend))
                except OSError:
                    sock.close()
                    raise
                up_reader, up_writer = await asyncio.open_connection(sock=sock)
        except OSError:
            writer.transport.abort()
            writer.close()
            return
        self.upstreams.append(up_writer.get_extra_info("sockname")[1])
        pair = (writer, up_writer)
        self._pairs.add(pair)
        if self._stalled:
            up_writer.transport.pause_reading()
        loop = asyncio.get_running_loop()
        if self._chaos is not None:
            loop.call_later(self._random.uniform(*self._chaos), self._cut, pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = loop.create_task(self._pump(source, sink, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        try:
            while data := await source.read(1 << 16):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if pair in self._pairs:  # one side ended normally: end the other
                self._pairs.discard(pair)
                for writer in pair:
                    with suppress(OSError):
                        writer.close()

    async def aclose(self) -> None:
        self.calm()
        self.cut_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
