"""Both clients behind a proxy that cuts idle connections (nginx ``proxy_read_timeout``) or
blackholes them (tests/idle_proxy.py).

- With the server's heartbeat on, a connection with no user traffic outlives several idle
  timeouts: pings and ``heartbeat`` messages are bytes from upstream.
- With it off (``ping_interval=None``), the proxy cuts the connection and the client
  reconnects by itself.
- A blackholed connection (TCP open, nothing forwarded) is detected by the keepalive
  within interval + timeout (plus one check period in the browser) and the client reconnects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import tether
from conftest import TIMEOUT_SCALE, timeout, within
from idle_proxy import IdleProxy
from servers.reconnect_app import ClientEvents, make_app, write_page
from tests.browser import chromium
from tether.proto.backoff import Backoff

S = TIMEOUT_SCALE
IDLE = 1.0 * S  # the proxy's idle timeout, N
HEARTBEAT = 0.3 * S  # the server's ping_interval when the heartbeat is on
MS = int(10_000 * S)  # Playwright waits, in ms


@pytest.fixture
def static(tmp_path: Path) -> Path:
    return write_page(tmp_path / "static", scale=S)


@pytest.fixture
async def stack(static: Path) -> AsyncIterator[Any]:
    """``server, proxy = await stack(idle_timeout=..., **server_settings)``; closed at teardown."""
    opened: list[Any] = []

    async def make(*, idle_timeout: float | None, **settings: Any) -> tuple[tether.Server, IdleProxy]:
        # The page comes from the server, its socket goes through the proxy: allow that origin.
        server = await tether.serve({"/ws": make_app()}, "127.0.0.1", 0, static_dir=static, allowed_origins=["*"], **settings)
        opened.append(server)
        proxy = await IdleProxy(server.port, idle_timeout=idle_timeout).start()
        opened.append(proxy)
        return server, proxy

    yield make
    for item in reversed(opened):
        await within(item.aclose() if isinstance(item, IdleProxy) else item.close(), 15)


def fast_backoff() -> Backoff:
    return Backoff(base=0.02 * S, cap=0.1 * S)


async def nothing_happens(event: asyncio.Event, seconds: float) -> None:
    """Assert ``event`` stays unset for ``seconds``."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


# -- the proxy itself ----------------------------------------------------------------------------------


async def test_proxy_cuts_connection_when_only_the_client_talks(stack):
    """Client -> upstream bytes do not keep a connection open, as with nginx."""
    _, proxy = await stack(idle_timeout=0.3 * S, ping_interval=None)
    sent = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with tether.connect(f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=None) as conn:
        async with timeout(5):
            while not proxy.cut.is_set():
                await conn.send('{"type": "append", "data": 1}')  # one-way: no answer comes back
                sent += 1
                last_send = loop.time()
                try:
                    await asyncio.wait_for(proxy.cut.wait(), 0.03 * S)
                except TimeoutError:
                    pass
            with pytest.raises(tether.ConnectionClosed):
                while True:
                    await conn.receive()
    # It kept talking until past the idle timeout, and was cut anyway.
    assert sent >= 2 and last_send - started >= 0.3 * S * 0.9
    assert proxy.cuts == 1


# -- Python client -----------------------------------------------------------------------------------


async def test_client_through_idle_proxy_stays_connected_with_server_heartbeat(stack):
    _, proxy = await stack(idle_timeout=IDLE, ping_interval=HEARTBEAT, ping_timeout=IDLE)
    # The client sends no pings of its own: only the server's traffic can keep the proxy happy.
    async with tether.Client(f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=None) as client:
        events = ClientEvents(client)
        await within(client.wait_open())
        conn = client._conn
        await nothing_happens(proxy.cut, 4 * IDLE)
        assert client._conn is conn and client.state == "open"
        assert await within(client.request("add", {"a": 1, "b": 2})) == 3
    assert events.names() == ["open", "close"]  # the close is ours, at the end
    assert proxy.accepted == 1 and proxy.cuts == 0


async def test_client_through_idle_proxy_without_heartbeat_is_cut_and_reconnects(stack):
    _, proxy = await stack(idle_timeout=IDLE, ping_interval=None)
    async with tether.Client(f"ws://127.0.0.1:{proxy.port}/ws", backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(4 * IDLE + 5):
            await client.wait_open()
            opened = time.monotonic()
            (code, _), cut = await events.wait("close")
            await events.wait("reconnected")
            assert await client.request("add", {"a": 1, "b": 2}) == 3
    assert code == 1006
    assert cut - opened >= IDLE - 0.1 * S  # (the proxy's clock started at the welcome, just before)
    assert proxy.cuts >= 1 and proxy.accepted >= 2


async def test_client_detects_blackholed_proxy_within_interval_plus_timeout_and_reconnects(stack):
    interval, ping_timeout = 0.2 * S, 0.3 * S
    _, proxy = await stack(idle_timeout=None, ping_interval=None)
    client = tether.Client(
        f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=interval, ping_timeout=ping_timeout, backoff=fast_backoff()
    )
    async with client:
        events = ClientEvents(client)
        async with timeout(5):
            await client.wait_open()
            proxy.blackhole()
            holed = time.monotonic()
            (code, reason), closed = await events.wait("close")
            await events.wait("reconnected")  # new connections get through
            assert await client.request("add", {"a": 1, "b": 2}) == 3
    assert (code, reason) == (1011, "keepalive timeout")
    assert closed - holed <= interval + ping_timeout + 0.2 * S


async def test_connection_through_blackholed_proxy_raises_keepalive_timeout(stack):
    _, proxy = await stack(idle_timeout=None, ping_interval=None)
    async with tether.connect(f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=0.1 * S, ping_timeout=0.2 * S) as conn:
        assert (await within(conn.receive())).startswith('{"type":"welcome"')
        proxy.blackhole()
        with pytest.raises(tether.KeepaliveTimeout) as caught:
            await within(conn.receive())
    assert (caught.value.code, caught.value.reason) == (1011, "keepalive timeout")


# -- browser client ------------------------------------------------------------------------------------


async def open_page(browser: Any, server: tether.Server, proxy: IdleProxy) -> Any:
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{server.port}/?ws=ws://127.0.0.1:{proxy.port}/ws")
    await page.wait_for_function("window.client && client.state === 'open'", timeout=MS)
    return page


@pytest.mark.browser
async def test_browser_through_idle_proxy_stays_connected_with_server_heartbeat(stack):
    server, proxy = await stack(idle_timeout=IDLE, ping_interval=HEARTBEAT, ping_timeout=IDLE)
    async with chromium() as browser:
        page = await open_page(browser, server, proxy)
        await nothing_happens(proxy.cut, 4 * IDLE)
        assert await page.evaluate("client.request('add', {a: 1, b: 2})") == 3
        names = await page.evaluate("events.map((e) => e.name)")
        latency = await page.evaluate("client.latency")
    assert names == ["open"]
    assert proxy.accepted == 1 and proxy.cuts == 0
    assert latency is not None and latency >= 0  # the page's own heartbeats were echoed


@pytest.mark.browser
async def test_browser_through_idle_proxy_without_heartbeat_is_cut_and_reconnects(stack):
    server, proxy = await stack(idle_timeout=IDLE, ping_interval=None)
    async with chromium() as browser:
        page = await open_page(browser, server, proxy)
        async with timeout(5):
            await proxy.cut.wait()
        await page.wait_for_function("events.some((e) => e.name === 'reconnected')", timeout=MS)
        assert await page.evaluate("client.request('add', {a: 1, b: 2})") == 3
        events = await page.evaluate("events")
    assert [e["name"] for e in events][:4] == ["open", "close", "reconnecting", "open"]
    assert events[1]["detail"]["code"] == 1006


@pytest.mark.browser
async def test_browser_detects_blackholed_server_from_heartbeat_and_reconnects(stack):
    interval, ping_timeout = 0.2 * S, 0.3 * S
    server, proxy = await stack(idle_timeout=None, ping_interval=interval, ping_timeout=ping_timeout)
    async with chromium() as browser:
        page = await open_page(browser, server, proxy)
        holed = await page.evaluate("performance.now()")
        proxy.blackhole()
        await page.wait_for_function("events.some((e) => e.name === 'reconnected')", timeout=MS)
        assert await page.evaluate("client.request('add', {a: 1, b: 2})") == 3
        events = await page.evaluate("events")
    close = next(e for e in events if e["name"] == "close")
    assert close["detail"] == {"code": 1006, "reason": "keepalive timeout", "willReconnect": True}
    # The page checks when interval + timeout of silence has passed since the last message,
    # which came at most one interval before the blackhole.
    assert (close["at"] - holed) / 1000 <= interval + ping_timeout + 0.2 * S
