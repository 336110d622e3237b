"""Real processes for rooms tests: a ``redis-server`` on a free port, app server processes
(``tests/rooms_app.py``), and a small typed client.

``redis_server`` (fixture) starts ``/usr/bin/redis-server --save '' --appendonly no`` on a
port the OS picked and stops it at teardown; ``restart()`` brings it back on the same port.
Waits poll a condition under a deadline; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import tether
from tests.conftest import TIMEOUT_SCALE

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
APP = Path(__file__).with_name("rooms_app.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, seconds: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + seconds * TIMEOUT_SCALE
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)  # polling a condition under a deadline
    raise TimeoutError(f"nothing listens on port {port} after {seconds}s")


class RedisServer:
    """A throwaway redis-server: ``url``, ``stop()``, ``start()``, ``restart()``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if not os.path.exists(REDIS):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class AppProcess:
    """``tests/rooms_app.py`` running in its own process on ``port``."""

    def __init__(self, broker: str, *args: str, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        cmd = [sys.executable, str(APP), str(self.port), broker, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.port, 15, self.proc)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket"

    def kill(self) -> None:
        """SIGKILL: no goodbye to Redis, presence must expire."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
async def app_processes() -> AsyncIterator[Callable[..., AppProcess]]:
    """``start(broker, *args)`` -> an :class:`AppProcess`; at teardown the test's peers
    close first (so the servers' graceful shutdown is quick), then every process stops."""
    started: list[AppProcess] = []

    def start(broker: str, *args: str, port: int | None = None) -> AppProcess:
        proc = AppProcess(broker, *args, port=port)
        started.append(proc)
        return proc

    yield start
    await _close_all_peers()
    for proc in started:
        proc.stop()


class Peer:
    """A typed client: ``request`` waits for its reply; other messages go to ``events``."""

    _ids = itertools.count(1)
    #: Every peer opened, closed by the ``close_peers`` fixture.
    opened: list[Peer] = []

    def __init__(self, conn: tether.Conn) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []
        Peer.opened.append(self)

    @classmethod
    async def open(cls, url: str, **query: str) -> Peer:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        conn = await tether.connect(f"{url}?{qs}" if qs else url)
        peer = cls(conn)
        await peer.event("welcome")  # broadcasts to rooms joined in on_connect may come first
        return peer

    async def _next(self) -> dict[str, Any]:
        message: dict[str, Any] = msgspec.json.decode(await self.conn.receive())
        return message

    async def request(self, type: str, data: Any = None) -> Any:
        id = next(self._ids)
        await self.conn.send(msgspec.json.encode({"type": type, "data": data, "id": id}).decode())
        while True:
            message = await self._next()
            if message.get("id") == id:
                if message["type"] == "error":
                    raise tether.ReplyError(message["data"]["code"], message["data"]["message"])
                return message.get("data")
            self.events.append(message)

    async def event(self, type: str | None = None) -> dict[str, Any]:
        """The next message of ``type`` (any type if None), buffered or received."""
        for i, message in enumerate(self.events):
            if type is None or message["type"] == type:
                return self.events.pop(i)
        while True:
            message = await self._next()
            if type is None or message["type"] == type:
                return message
            self.events.append(message)

    async def close(self) -> None:
        """Close; drop TCP if the server does not answer within a second (it may be dead)."""
        try:
            await asyncio.wait_for(self.conn.close(), 1.0)
        except (asyncio.TimeoutError, tether.ConnectionClosed):
            self.conn._transport.disconnect()
            await self.conn.wait_closed()


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    """Close every :class:`Peer` a test opened (import this fixture into the test module)."""
    yield
    await _close_all_peers()


async def _close_all_peers() -> None:
    peers, Peer.opened = Peer.opened, []
    await asyncio.gather(*(peer.close() for peer in peers))


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Poll ``check`` until it returns True; fail after ``seconds`` (scaled)."""
    deadline = time.monotonic() + seconds * TIMEOUT_SCALE
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.05)  # polling a condition under a deadline


async def open_peers(url: str, n: int, prefix: str = "p", **query: str) -> list[Peer]:
    """``n`` peers named ``<prefix>0..``, opened 50 at a time (the listen backlog is finite)."""
    peers: list[Peer] = []
    for start in range(0, n, 50):
        batch = range(start, min(n, start + 50))
        peers += await asyncio.gather(*(Peer.open(url, name=f"{prefix}{i}", **query) for i in batch))
    return peers


__all__ = ["RedisServer", "AppProcess", "Peer", "eventually", "free_port", "redis_server", "app_processes", "open_peers", "close_peers"]
