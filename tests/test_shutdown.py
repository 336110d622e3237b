"""Graceful shutdown of a ``tether.run`` process (tests/servers/shutdown_app.py) on SIGTERM/SIGINT.

On the signal the server stops accepting (a new connect is refused), lets a request that is
already being handled finish and sends its reply, then closes every connection with 1001 and
a ``retry_after=<s>`` reason spread at random over ``shutdown_spread``, and exits with code 0
within ``shutdown_timeout`` (plus interpreter start-up/tear-down margin) -- even if a client
never answers the close.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import tether
from conftest import TIMEOUT_SCALE, timeout
from rawws import RawWS
from tether.proto.backoff import Backoff

APP = str(Path(__file__).parent / "servers" / "shutdown_app.py")
SPREAD = 4.0
SHUTDOWN_TIMEOUT = 3.0
MARGIN = 3.0 * TIMEOUT_SCALE  # process tear-down, on top of shutdown_timeout
RETRY_AFTER = re.compile(r"^going away; retry_after=([0-9]+\.[0-9]+)$")


class Process:
    """shutdown_app.py as a child process."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self, port: int = 0) -> int:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, APP, "--port", str(port), *self.args, stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        async with timeout(15):
            line = await self.proc.stdout.readline()
        assert line.startswith(b"listening "), line
        self.port = int(line.split()[1])
        return self.port

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def aclose(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def server() -> AsyncIterator[Process]:
    proc = Process("--shutdown-spread", str(SPREAD), "--shutdown-timeout", str(SHUTDOWN_TIMEOUT))
    await proc.start()
    yield proc
    await proc.aclose()


async def receive_json(conn: tether.Conn) -> dict[str, Any]:
    message = await conn.receive()
    assert isinstance(message, str)
    result: dict[str, Any] = json.loads(message)
    return result


async def typed_client(server: Process) -> tether.Conn:
    conn = await tether.connect(server.url())
    assert (await receive_json(conn))["type"] == "welcome"
    await conn.send(json.dumps({"type": "echo", "data": "hi", "id": 1}))
    assert await receive_json(conn) == {"type": "reply", "data": "hi", "id": 1}
    return conn


async def rest(conn: tether.Conn) -> tuple[list[dict[str, Any]], tether.ConnectionClosed]:
    """Every message until the close, and the close."""
    messages = []
    while True:
        try:
            messages.append(await receive_json(conn))
        except tether.ConnectionClosed as exc:
            return messages, exc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_server_signal_drains_closes_1001_with_spread_retry_after_and_exits_0(server: Process, sig: int) -> None:
    async with timeout(30):
        clients = [await typed_client(server) for _ in range(8)]
        busy = clients[0]
        await busy.send(json.dumps({"type": "slow", "data": 0.5, "id": 2}))
        assert await receive_json(busy) == {"type": "started", "data": 0.5}  # the handler is awaiting
        overlapping = clients[1]
        await overlapping.send(json.dumps({"type": "slow_concurrent", "data": 0.9, "id": 3}))
        assert await receive_json(overlapping) == {"type": "started", "data": 0.9}

        signalled = time.monotonic()
        server.signal(sig)
        outcomes = await asyncio.gather(*(rest(conn) for conn in clients))
        closed_after = time.monotonic() - signalled

        # Stopped accepting: the listening socket is gone before any connection was closed.
        with pytest.raises(OSError):
            await tether.connect(server.url(), open_timeout=5)
        assert await server.wait() == 0
        exited_after = time.monotonic() - signalled

    # The in-flight request got its reply before the close; the others got nothing more.
    assert outcomes[0][0] == [{"type": "reply", "data": "done after 0.5", "id": 2}]
    assert outcomes[1][0] == [{"type": "reply", "data": "concurrent done after 0.9", "id": 3}]
    assert all(messages == [] for messages, _ in outcomes[2:])
    assert 0.5 <= closed_after < SHUTDOWN_TIMEOUT
    delays = []
    for _, closed in outcomes:
        assert isinstance(closed, tether.ConnectionClosedOK) and closed.code == 1001
        match = RETRY_AFTER.match(closed.reason)
        assert match, closed.reason
        delays.append(float(match.group(1)))
    assert all(0.0 <= d <= SPREAD for d in delays)
    assert len(set(delays)) >= 3, f"retry_after not spread: {delays}"  # 8 draws from 400 values
    assert exited_after < SHUTDOWN_TIMEOUT + MARGIN


async def test_server_signal_exits_within_shutdown_timeout_when_a_client_never_answers_close(server: Process) -> None:
    """A client that never reads (so never answers the close) cannot hold the process."""
    async with timeout(30):
        mute = await RawWS.open(server.port, "/ws", rcvbuf=4096)
        assert mute.status == 101
        polite = await typed_client(server)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        _, closed = await rest(polite)
        assert closed.code == 1001
        assert await server.wait() == 0
        exited_after = time.monotonic() - signalled
        await mute.eof()  # the server dropped the mute client's TCP
    mute.abort()
    assert exited_after < SHUTDOWN_TIMEOUT + MARGIN


@pytest.mark.parametrize("path", ["/push", "/stubborn"])
async def test_server_process_exits_within_shutdown_timeout_plus_1s_despite_a_non_reader_or_a_stuck_handler(path: str) -> None:
    """``/push``: the client never reads while the server pushes, so no close frame or FIN can
    be written; ``/stubborn``: a handler that never returns. SIGTERM still ends the process
    within shutdown_timeout + 1 s (plus the interpreter's exit)."""
    proc = Process("--shutdown-timeout", "1.0")
    await proc.start()
    try:
        async with timeout(30):
            mute = await RawWS.open(proc.port, path, rcvbuf=4096)
            assert mute.status == 101
            polite = await tether.connect(f"ws://127.0.0.1:{proc.port}/ws")
            await polite.receive()  # welcome: the server is serving
            signalled = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert await proc.wait() == 0
            exited_after = time.monotonic() - signalled
        mute.abort()
    finally:
        await proc.aclose()
    assert exited_after < 1.0 + 1.0 + 0.5 * TIMEOUT_SCALE


async def test_client_reconnects_to_restarted_server_after_1001(tmp_path: Path) -> None:
    """tether.Client sees 1001, waits its retry_after (spread 0.3 s here), and reconnects to
    a new process on the same port; the outbox carries what was sent meanwhile."""
    first = Process("--shutdown-spread", "0.3", "--shutdown-timeout", "2")
    port = await first.start()
    closes: list[tuple[Any, ...]] = []
    reconnected = asyncio.Event()
    client = tether.Client(first.url(), backoff=Backoff(base=0.05, cap=0.2))
    client.add_listener("close", lambda *args: closes.append(args))
    client.add_listener("reconnected", reconnected.set)
    second = Process()
    try:
        async with timeout(30), client:
            assert await client.request("echo", 1) == 1
            first.signal(signal.SIGTERM)
            assert await first.wait() == 0
            pending = asyncio.create_task(client.request("echo", "queued"))
            await second.start(port)
            await reconnected.wait()
            assert await pending == "queued"
            assert await client.request("echo", 2) == 2
    finally:
        await first.aclose()
        await second.aclose()
    code, reason = closes[0]
    assert code == 1001 and RETRY_AFTER.match(reason)
    assert float(RETRY_AFTER.match(reason).group(1)) <= 0.3  # type: ignore[union-attr]
