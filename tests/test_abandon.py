"""10,000 connections opened and abandoned against a running server, while a normal client
keeps doing round trips.

The mix, one kind per connection in turn:

- a TCP connect that never sends a byte (the handshake timeout closes it),
- a handshake left half-sent (same),
- a completed handshake whose client closes TCP without a close frame (FIN),
- a completed handshake whose client resets TCP (RST),
- a completed handshake whose client goes silent: never reads, never answers a ping (the
  keepalive closes it with 1011, then the close timeout drops TCP).

They are opened in batches of 500 (at most 100 connects in flight, 127.0.0.1 only). The silent
kinds of a batch are dropped by the client after the next batch is open, except one in ten,
kept to the end to prove that the server itself reaps them. Afterwards: no connection left in
``server.connections``, every kept socket closed by the server, no file descriptor leaked,
bounded RSS growth, and a fresh client served.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import resource
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import TIMEOUT_SCALE, ServerFactory, assert_serves, echo, timeout, url
from rawws import RawWS

import tether

N = 10_000
BATCH = 500
IN_FLIGHT = 100
KEEP_EVERY = 10  # one silent connection in ten stays open until the server reaps it
KINDS = ("idle_tcp", "half_handshake", "handshake_fin", "handshake_rst", "handshake_silent")
WANT_FDS = 32_768
MAX_RSS_GROWTH = 100 << 20

HALF_HANDSHAKE = b"GET /socket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.fixture
def many_fds() -> Iterator[None]:
    """RLIMIT_NOFILE raised to 20,000+ for the test (the hard limit too, when root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_hard = hard
    if hard != resource.RLIM_INFINITY and hard < 20_000:
        if os.geteuid() != 0:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 20000 and not root")
        new_hard = WANT_FDS
    new_soft = new_hard if new_hard != resource.RLIM_INFINITY else max(soft, WANT_FDS)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, new_soft), new_hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rss() -> int:
    """This process's resident set size in bytes (the server runs in-process)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def until(condition: Callable[[], bool], seconds: float, what: Callable[[], str]) -> None:
    """Poll ``condition()`` every 50 ms under a (scaled) deadline."""
    deadline = time.monotonic() + seconds * TIMEOUT_SCALE
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what()}"
        await asyncio.sleep(0.05)  # polling a condition under a deadline


async def abandon(port: int, kind: str, gate: asyncio.Semaphore) -> RawWS | None:
    """Open one connection of ``kind``; return it if the client keeps it open (silently)."""
    async with gate, timeout(30):
        ws = await RawWS.connect(port)
        if kind == "idle_tcp":
            return ws
        if kind == "half_handshake":
            ws.writer.write(HALF_HANDSHAKE)
            return ws
        assert await ws.handshake() == 101
        if kind == "handshake_fin":
            ws.writer.close()  # FIN, no close frame
            return None
        if kind == "handshake_rst":
            ws.abort()
            return None
        return ws  # handshake_silent


async def reaped(ws: RawWS) -> None:
    """The server closes a connection the client abandoned (we read and discard until EOF)."""
    try:
        await ws.eof()
    except ConnectionError:
        pass
    ws.abort()


async def round_trips(server: tether.Server, stop: asyncio.Event, done: list[float]) -> None:
    """A normal client: request/reply round trips until ``stop``; every reply must match."""
    async with tether.connect(url(server, "/echo")) as conn:
        for i in itertools.count():
            if stop.is_set():
                return
            started = time.monotonic()
            async with timeout(10):
                await conn.send(f"round trip {i}")
                assert await conn.receive() == f"round trip {i}"
            done.append(time.monotonic() - started)


@pytest.mark.slow
async def test_server_survives_10000_abandoned_connections(make_server: ServerFactory, many_fds: None) -> None:
    server = await make_server(
        {"/socket": echo, "/echo": echo},
        handshake_timeout=1.0,
        ping_interval=1.0,
        ping_timeout=2.0,
        close_timeout=1.0,
    )
    await assert_serves(server)  # warm up before measuring
    gc.collect()
    rss_before, fds_before = rss(), open_fds()

    stop = asyncio.Event()
    latencies: list[float] = []
    client = asyncio.get_running_loop().create_task(round_trips(server, stop, latencies))
    gate = asyncio.Semaphore(IN_FLIGHT)
    kept: list[RawWS] = []  # kept open until the server reaps them
    previous: list[RawWS] = []  # the last batch's silent ones, dropped after this batch opens
    kinds = itertools.cycle(KINDS)
    try:
        for _ in range(N // BATCH):
            batch = await asyncio.gather(*(abandon(server.port, next(kinds), gate) for _ in range(BATCH)))
            assert not client.done(), "the normal client stopped during the attack"
            silent = [ws for ws in batch if ws is not None]
            kept += silent[::KEEP_EVERY]
            for ws in previous:
                ws.abort()
            previous = [ws for i, ws in enumerate(silent) if i % KEEP_EVERY]
        for ws in previous:
            ws.abort()
        rounds_during_attack = len(latencies)
    finally:
        stop.set()
        async with timeout(15):
            await client  # re-raises a mismatch or a timeout of the normal client
    assert rounds_during_attack > 0, "no round trip completed during the attack"

    # The server reaps what the clients abandoned: handshake timeout, keepalive, close timeout.
    async with timeout(30):
        await asyncio.gather(*(reaped(ws) for ws in kept))
    await until(lambda: not server.connections, 15, lambda: f"server.connections drained ({len(server.connections)} left)")
    await until(lambda: open_fds() <= fds_before + 10, 15, lambda: f"file descriptors back to {fds_before} (now {open_fds()})")
    gc.collect()
    growth = rss() - rss_before
    assert growth < MAX_RSS_GROWTH, f"RSS grew by {growth >> 20} MiB"
    await assert_serves(server)
    print(
        f"\n{N} abandoned; {rounds_during_attack} round trips during the attack,"
        f" max {max(latencies) * 1000:.0f} ms; RSS growth {growth >> 20} MiB; kept {len(kept)} until reaped"
    )
