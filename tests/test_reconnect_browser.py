"""tether.js in real headless Chromium against a server process that is killed and restarted.

The page (written to a temporary static dir, served by the server with ``/tether.js``) connects
once; the test SIGKILLs the server, the page sends while it is down, the server comes back on
the same port, and the page must reconnect by itself and deliver what it queued, in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import TIMEOUT_SCALE, timeout
from servers.reconnect_app import ServerProcess, write_page
from tests.browser import chromium

S = TIMEOUT_SCALE
MS = int(10_000 * S)  # Playwright waits, in ms


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess("--static-dir", str(write_page(tmp_path / "static", scale=S)))
    await proc.start()
    yield proc
    await proc.aclose()


@pytest.mark.browser
async def test_browser_reconnects_after_server_killed_and_delivers_queued_messages_in_order(server):
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await page.wait_for_function("window.client && client.state === 'open'", timeout=MS)
        assert await page.evaluate("client.request('add', {a: 1, b: 2})") == 3

        await server.kill()
        await page.wait_for_function("client.state === 'reconnecting'", timeout=MS)
        await page.evaluate("for (let i = 0; i < 10; i++) client.send('append', i)")
        # Still down: the page keeps retrying (and failing) on its own.
        await page.wait_for_function(
            "events.filter((e) => e.name === 'reconnecting').length >= 2", timeout=MS
        )

        async with timeout(20):
            await server.start()  # the same port
        await page.wait_for_function("events.some((e) => e.name === 'reconnected')", timeout=MS)
        assert await page.evaluate("client.request('add', {a: 20, b: 22})") == 42
        log = await page.evaluate("client.request('log')")
        events = await page.evaluate("events")

    assert log == list(range(10))
    names = [e["name"] for e in events]
    assert names[:3] == ["open", "close", "reconnecting"]
    assert names.count("open") == 2 and names.count("reconnected") == 1
    assert names.index("reconnected") == len(names) - 1
    first_close = events[1]["detail"]
    assert first_close["code"] == 1006 and first_close["willReconnect"] is True
    attempts = [e["detail"]["attempt"] for e in events if e["name"] == "reconnecting"]
    assert attempts == list(range(1, len(attempts) + 1))
