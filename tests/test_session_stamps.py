"""A client's connection attempts are ordered (docs/protocol.md, "Sessions and resume").

A client that gave up on an attempt (cut during its handshake, or while the server was still
asking another process for the session) has already come back somewhere else when that
attempt gets its turn. Without an order the old attempt took the session back: the server
holding the client's current connection let go of it and closed it with 4009, and the client,
reading 4009 as "a copy of me took my session", started a new one (every message in flight
reported lost). Seen under load in tests/test_chaos.py (two processes on Redis).

Each resume offer carries a stamp that grows with every attempt (``session.<token>.<ack>.<stamp>``);
an attempt older than the one holding the session is closed 4009 and the holder keeps it.
The race is made deterministic here: the old attempt's process is held at the moment it asks
the holder to let go, while the client resumes on the holder.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from chaos_proxy import ChaosProxy
from conftest import timeout

import tether
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401  (fixture)
from tether.proto.backoff import Backoff
from tether.redis_broker import RedisBroker


class HeldRelease:
    """Mixed into a broker: its release requests wait at ``gate`` (``asking`` says one did)."""

    asking: asyncio.Event
    gate: asyncio.Event

    def hold(self) -> None:
        self.asking, self.gate = asyncio.Event(), asyncio.Event()

    async def release_session(self, node: str, token: str, wait: float, stamp: int = 0) -> None:
        self.asking.set()
        await self.gate.wait()
        await super().release_session(node, token, wait, stamp)  # type: ignore[misc]


class HeldMemoryBroker(HeldRelease, tether.MemoryBroker):
    pass


class HeldRedisBroker(HeldRelease, RedisBroker):
    pass


def work_app(executed: list[int]) -> tether.App:
    app = tether.App()

    @app.on("work")
    def work(conn: tether.Conn, n: int) -> int:
        executed.append(n)
        return n * 2

    return app


class Stack:
    """Process A (the old attempt's, its release requests held) and process B (the holder),
    sharing a broker; the client reaches B through a proxy that can cut it."""

    def __init__(self, servers: list[tether.Server], brokers: list[Any], proxy: ChaosProxy, executed: list[int]) -> None:
        self.a, self.b = servers
        self.held = brokers[0]
        self.proxy = proxy
        self.executed = executed


@pytest.fixture(params=["memory", "redis"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    if request.param == "memory":
        bus = tether.MemoryBus()
        brokers: list[Any] = [HeldMemoryBroker(bus), tether.MemoryBroker(bus)]
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        brokers = [HeldRedisBroker(redis.url), RedisBroker(redis.url)]
    brokers[0].hold()
    executed: list[int] = []
    servers = [await tether.serve({"/app": work_app(executed)}, "127.0.0.1", 0, broker=b) for b in brokers]
    proxy = await ChaosProxy([servers[1].port]).start()
    try:
        yield Stack(servers, brokers, proxy, executed)
    finally:
        brokers[0].gate.set()
        await proxy.aclose()
        for server in servers:
            await server.close()


class Watched:
    """A tether.Client's closes and resumes."""

    def __init__(self, client: tether.Client) -> None:
        self.closes: list[int | None] = []
        self.resumed: list[bool] = []
        self.reconnected = asyncio.Event()
        client.add_listener("close", lambda code, reason: self.closes.append(code))
        client.add_listener("resumed", lambda ok, *rest: self.resumed.append(ok))
        client.add_listener("reconnected", self.reconnected.set)


async def attempt(port: int, token: str, stamp: int) -> tether.Conn:
    """A raw resume attempt of the client's session with ``stamp`` (what a late attempt is)."""
    return await tether.connect(
        f"ws://127.0.0.1:{port}/app", headers={"Sec-WebSocket-Protocol": f"tether, session.{token}.0.{stamp}"}
    )


async def answer(conn: tether.Conn) -> tuple[str, Any]:
    """What the server does with an attempt: ``("closed", code)`` or ``("welcome", resumed)``."""
    try:
        async with timeout(10):
            message = msgspec.json.decode(await conn.receive())
    except tether.ConnectionClosed:
        return "closed", conn.close_code
    session = message["data"].get("session") if message["type"] == "welcome" else None
    await conn.close()
    return message["type"], session and session["resumed"]


async def test_an_old_attempt_held_up_in_another_process_does_not_take_the_session_back(stack: Stack) -> None:
    async with timeout(20), tether.Client(f"ws://127.0.0.1:{stack.proxy.port}/app", backoff=Backoff(base=0.01, cap=0.05)) as client:
        watched = Watched(client)
        await client.wait_open()
        assert await client.request("work", 1) == 2
        token = client._session.token
        assert token is not None
        # The old attempt (stamp 5: before the client's next one, which stamps the wall clock
        # in ms) reaches process A, which asks B to let go and is held right there.
        old = await attempt(stack.a.port, token, 5)
        async with timeout(5):
            await stack.held.asking.wait()
        # Meanwhile the client is cut and resumes on B: the newer attempt holds the session.
        stack.proxy.cut_all()
        await asyncio.wait_for(watched.reconnected.wait(), 10)
        assert watched.resumed == [True]
        stack.held.gate.set()  # A goes on: B refuses to let go, A reads B's stamp and gives up
        assert await answer(old) == ("closed", 4009)
        assert await client.request("work", 2) == 4  # the client kept its connection and session
        assert client.state == "open"
    assert 4009 not in watched.closes and watched.resumed == [True]
    assert stack.executed == [1, 2]


async def test_an_old_attempt_reaching_the_holder_itself_is_closed_4009(stack: Stack) -> None:
    async with timeout(20), tether.Client(f"ws://127.0.0.1:{stack.proxy.port}/app", backoff=Backoff(base=0.01, cap=0.05)) as client:
        watched = Watched(client)
        await client.wait_open()
        stack.proxy.cut_all()  # one resume: the session's holder is a stamped attempt now
        await asyncio.wait_for(watched.reconnected.wait(), 10)
        token = client._session.token
        assert token is not None and watched.resumed == [True]
        old = await attempt(stack.b.port, token, client._session.stamp - 1)
        assert await answer(old) == ("closed", 4009)
        assert await client.request("work", 3) == 6
        # A newer attempt (a copy of the client holding its token) does take the session over.
        newer = await attempt(stack.b.port, token, client._session.stamp + 1)
        assert await answer(newer) == ("welcome", True)
    assert watched.closes.count(4009) == 1  # the copy took it: the client started anew
    assert stack.executed == [3]
