"""Liveness and readiness: ``/health`` answers while the process serves; ``/ready`` answers 503
from the first moment of a graceful shutdown (and while the broker is unreachable), so a load
balancer stops sending new clients before the open connections are closed."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import tether
from tests.conftest import ServerFactory, echo, make_server, timeout  # noqa: F401
from tests.redis_fixture import RedisServer, eventually, redis_server  # noqa: F401
from tests.tether_run import get


async def status(server: tether.Server, path: str) -> tuple[int, str]:
    response = await get(f"http://127.0.0.1:{server.port}{path}")
    return response.status_code, response.text


async def test_ready_and_health_answer_200_while_serving(make_server: ServerFactory) -> None:  # noqa: F811
    server = await make_server({"/ws": echo})
    assert await status(server, "/health") == (200, "ok\n")
    assert await status(server, "/ready") == (200, "ready\n")
    assert server.ready


async def test_ready_goes_503_at_once_when_a_drain_starts_and_connections_close_after() -> None:
    server = await tether.serve({"/ws": echo}, "127.0.0.1", 0, drain_delay=1.0, shutdown_timeout=2.0)
    conn = await tether.connect(f"ws://127.0.0.1:{server.port}/ws")
    closing = asyncio.ensure_future(server.close())
    try:
        async with timeout(5):
            while (await status(server, "/ready"))[0] != 503:
                await asyncio.sleep(0.02)  # polling the condition: close() has started
            assert await status(server, "/ready") == (503, "not ready: draining\n")
            assert not server.ready
            # During the drain delay the server still works: old connections and new ones.
            assert await status(server, "/health") == (200, "ok\n")
            await conn.send("still here")
            assert await conn.receive() == "still here"
            late = await tether.connect(f"ws://127.0.0.1:{server.port}/ws")
            assert conn.state is tether.ConnState.OPEN
            with pytest.raises(tether.ConnectionClosed) as closed:
                await conn.receive()
            assert closed.value.code == 1001
            await late.wait_closed()
            await closing
    finally:
        closing.cancel()
        conn.drop()
        await conn.wait_closed()


async def test_ready_without_drain_delay_closes_the_listener_at_once() -> None:
    server = await tether.serve({"/ws": echo}, "127.0.0.1", 0)
    port = server.port
    async with timeout(15):
        await server.close()
    assert server.draining and not server.ready
    with pytest.raises(httpx.ConnectError):  # nothing listens any more: the balancer sees it down
        await get(f"http://127.0.0.1:{port}/ready")


@pytest.mark.redis
async def test_ready_is_503_while_the_broker_is_unreachable(make_server: ServerFactory, redis_server: RedisServer) -> None:  # noqa: F811
    from tether.redis_broker import RedisBroker

    broker = RedisBroker(redis_server.url, presence_ttl=1.0, heartbeat_interval=0.2, backoff_cap=0.2)
    server = await make_server({"/ws": echo}, broker=broker)
    assert await status(server, "/ready") == (200, "ready\n")
    redis_server.stop()

    async def unready() -> bool:
        return await status(server, "/ready") == (503, "not ready: broker unreachable\n")

    await eventually(unready, 10, "/ready says the broker is unreachable")
    assert await status(server, "/health") == (200, "ok\n")  # alive all the same: do not restart it
    redis_server.start()

    async def ready() -> bool:
        return (await status(server, "/ready"))[0] == 200

    await eventually(ready, 15, "/ready again once Redis is back")
