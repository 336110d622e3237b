"""tether behind real nginx (Debian's package), configured with docs/deploy.md's block.

``tether run`` serves tests/servers/ops_app.py; nginx (read timeout T, set low) proxies it. A
client through nginx stays connected across 3 T thanks to tether's keepalive, and nginx cuts
it after about T when the keepalive is off; ``conn.remote_address`` is the client's (a
loopback address other than nginx's), not nginx's, and what the client claims itself is
ignored; the origin check passes for the proxied host and not without ``--proxy-headers``;
``/ready`` through nginx turns 503 at the start of a drain while connections still work;
the guide's ``/metrics`` location admits only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import timeout
from tests.nginx_fixture import Nginx
from tests.test_forwarded import open_from
from tests.tether_run import TetherRun, get, tether_run  # noqa: F401

READ_TIMEOUT = 1.5  # nginx's proxy_read_timeout in these tests (60 s in the guide)
CLIENT = "127.0.0.2"  # the browser's address; nginx connects from 127.0.0.1

Stack = Callable[..., Awaitable[tuple[TetherRun, Nginx]]]


@pytest.fixture
async def stack(tether_run: Callable[..., TetherRun], tmp_path: Path) -> Any:  # noqa: F811
    """``tether, nginx = await stack(*tether_run_args)``: tether run, then nginx in front of it."""
    started: list[Nginx] = []

    async def start(*args: str) -> tuple[TetherRun, Nginx]:
        tether = await tether_run("ops_app:app", *args).start()
        nginx = await Nginx(tether.port, READ_TIMEOUT, tmp_path / f"nginx{len(started)}").start()
        started.append(nginx)
        return tether, nginx

    yield start
    for nginx in started:
        nginx.stop()


async def typed(ws: ClientConnection, type: str, data: Any = None, id: int = 1) -> Any:
    """A request over a raw client; other messages (welcome, heartbeats) are skipped."""
    await ws.send(json.dumps({"type": type, "data": data, "id": id}))
    while True:
        message = json.loads(await ws.recv())
        if message.get("id") == id:
            return message["data"]


async def through(nginx: Nginx, **kwargs: Any) -> ClientConnection:
    """A client at 127.0.0.2 connected to nginx."""
    return await open_from(CLIENT, nginx.port, **kwargs)


async def test_heartbeat_keeps_a_client_connected_through_nginx_across_three_read_timeouts(stack: Stack) -> None:
    _, nginx = await stack("--proxy-headers", "--ws-ping-interval", "0.3")
    origin = f"http://127.0.0.1:{nginx.port}"
    ws = await through(nginx, origin=origin)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + 3 * READ_TIMEOUT + 0.5
        seen = 0
        while (left := end - loop.time()) > 0:  # the client sends nothing: only tether's traffic
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), left))
            except TimeoutError:
                break
            seen += message["type"] == "heartbeat"
        assert loop.time() - start >= 3 * READ_TIMEOUT
        async with timeout(5):
            who = await typed(ws, "whoami")
        assert who["remote"] == [CLIENT, 0] and who["origin"] == origin
        assert seen >= 3, "the typed app's heartbeats came through too"
    finally:
        await ws.close()


async def test_without_keepalive_nginx_cuts_the_idle_connection_after_its_read_timeout(stack: Stack) -> None:
    _, nginx = await stack("--ws-ping-interval", "none")
    ws = await through(nginx)
    loop = asyncio.get_running_loop()
    async with timeout(10):
        who = await typed(ws, "whoami")
        idle_since = loop.time()
        assert who["remote"][0] == "127.0.0.1", "without --proxy-headers tether sees nginx"
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await ws.recv()
    idle = loop.time() - idle_since
    assert READ_TIMEOUT * 0.8 <= idle < 3 * READ_TIMEOUT, idle


async def test_remote_address_is_the_clients_and_the_origin_check_passes_for_the_proxied_host(stack: Stack) -> None:
    tether, nginx = await stack("--proxy-headers")
    origin = f"http://127.0.0.1:{nginx.port}"
    async with timeout(10):
        ws = await through(nginx, origin=origin, additional_headers={"X-Forwarded-For": "6.6.6.6"})
        who = await typed(ws, "whoami")
        await ws.close()
        assert who["remote"] == [CLIENT, 0], "the client's address, not nginx's nor the one it claimed"
        closed = await tether.wait_for(lambda r: r.get("event") == "close")
        assert closed["remote"] == f"{CLIENT}:0"
        # Straight to tether (no proxy), the browser's origin does not match tether's own host.
        with pytest.raises(websockets.InvalidStatus) as refused:
            await open_from(CLIENT, tether.port, origin=origin)
        assert refused.value.response.status_code == 403
        # Nor does a forged X-Forwarded-Host help a peer that is not nginx.
        forged = await open_from(CLIENT, tether.port, origin=origin, additional_headers={"X-Forwarded-Host": f"127.0.0.1:{nginx.port}"})
        with pytest.raises(websockets.ConnectionClosed):
            await forged.recv()
        assert forged.close_code == 1008


async def test_origin_through_nginx_is_refused_without_proxy_headers(stack: Stack) -> None:
    _, nginx = await stack()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await through(nginx, origin=f"http://127.0.0.1:{nginx.port}")
    assert refused.value.response.status_code == 403  # Host is $host: nginx's port is not in it


async def test_ready_through_nginx_turns_503_during_a_drain(stack: Stack) -> None:
    # Pings below nginx's read timeout: the drain lasts longer than it.
    tether, nginx = await stack("--proxy-headers", "--drain-delay", "3", "--timeout-graceful-shutdown", "2", "--ws-ping-interval", "0.3")
    assert (await get(nginx.http("/ready"))).status_code == 200
    assert (await get(nginx.http("/metrics"))).status_code == 200  # the guide lets 127.0.0.1 scrape
    ws = await through(nginx, origin=f"http://127.0.0.1:{nginx.port}")
    try:
        tether.signal(signal.SIGTERM)
        async with timeout(10):
            while (response := await get(nginx.http("/ready"))).status_code == 200:
                await asyncio.sleep(0.05)  # polling the condition: the drain has started
            assert (response.status_code, response.text) == (503, "not ready: draining\n")
            assert await typed(ws, "echo", "still served", id=2) == "still served"
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
        assert ws.close_code == 1001
        assert await tether.wait(15) == 0
    finally:
        await ws.close()


async def test_metrics_location_of_the_guide_refuses_other_addresses(stack: Stack) -> None:
    _, nginx = await stack()
    sock_client = await asyncio.open_connection("127.0.0.1", nginx.port, local_addr=(CLIENT, 0))
    reader, writer = sock_client
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
    async with timeout(5):
        status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert status_line.split()[1] == b"403"
