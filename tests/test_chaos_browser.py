"""Zero loss under chaos for tether.js in headless Chromium (issue 12): tests/test_chaos.py's
workload and checks, with the page as the client.

A TCP proxy on 127.0.0.1 (tests/chaos_proxy.py) cuts each connection after 100-500 ms while a
room gets 10,000 broadcasts and the page sends 10,000 one-way messages with ``await
client.emit`` (paced like the Python client's) and 1,000 requests. At the end: every broadcast
reached the page once and in order, every message was handled once and in order, every request
ran once and the page got its reply. Against one server, and against two servers on one
MemoryBus (the proxy sends each new connection to the other one, so every cut is also a move).
Marked slow; prints the counts.

The page is served by the (first) server, its socket goes through the proxy (so the servers
allow any origin).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from browser import chromium
from chaos_proxy import ChaosProxy
from conftest import TIMEOUT_SCALE, timeout
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from test_chaos import BROADCASTS, MESSAGES, REQUESTS, Ledger, chaos_app, check, feed_history

import tether

MS = int(90_000 * TIMEOUT_SCALE)  # Playwright waits, in ms
TAIL = 20  # s (scaled): the most the last messages may take to arrive once the cuts stopped
TAIL_MS = int(TAIL * 1000 * TIMEOUT_SCALE)

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>tether chaos test</title>
<script type="module">
  import { connect } from "/tether.js";
  const query = new URLSearchParams(location.search);
  window.got = [];        // the data of every "tick", in arrival order
  window.gaps = [];       // details of "gap" events
  window.resumed = [];    // details of "resumed" events
  window.replies = null;  // once the sender is done: each request's reply, or {error: name}
  window.failure = null;  // the sender failed (an emit rejected)
  const client = connect(query.get("ws"), {
    backoff: { base: 0.005, cap: 0.05 }, requestTimeout: null, resume: query.get("resume") !== "0",
  });
  client.on("tick", (n) => got.push(n));
  client.addEventListener("gap", (event) => gaps.push(event.detail));
  client.addEventListener("resumed", (event) => resumed.push(event.detail));
  window.client = client;

  // tests/test_chaos.py's sender: a request every 10 messages, paced over many cuts.
  async function sender(messages) {
    const replies = [];
    for (let n = 0; n < messages; n++) {
      await client.emit("note", n);
      // Settled at once, so that a failure is this list's, not an unhandled rejection.
      if (n % 10 === 0) replies.push(client.request("work", n / 10).catch((e) => ({ error: e.name })));
      if (n % 20 === 19) await new Promise((resolve) => setTimeout(resolve, 10));
    }
    return await Promise.all(replies);
  }
  window.run = (messages) => {
    sender(messages).then((r) => { window.replies = r; }, (e) => { window.failure = `${e.name}: ${e.message}`; });
  };
</script>
"""


class Notifying(list[int]):
    """A list that sets ``changed`` on every append (the App's ledger of one-way messages)."""

    def __init__(self, changed: asyncio.Event) -> None:
        super().__init__()
        self.changed = changed

    def append(self, item: int) -> None:
        super().append(item)
        self.changed.set()


def ledger_for_waiting() -> tuple[Ledger, asyncio.Event]:
    ledger = Ledger()
    changed = asyncio.Event()
    ledger.messages = Notifying(changed)
    return ledger, changed


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest.fixture
def static(tmp_path: Path) -> Path:
    folder = tmp_path / "static"
    folder.mkdir()
    (folder / "index.html").write_text(PAGE)
    return folder


async def run_chaos_page(
    browser: Any, apps: list[tether.App], ports: list[int], ledger: Ledger, changed: asyncio.Event, *, resume: bool = True
) -> dict[str, Any]:
    feed_history(apps)
    proxy = await ChaosProxy(ports, seed=7).start()
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    began = time.monotonic()
    try:
        async with timeout(110):
            query = f"ws=ws://127.0.0.1:{proxy.port}/app" + ("" if resume else "&resume=0")
            await page.goto(f"http://127.0.0.1:{ports[0]}/?{query}")
            await page.wait_for_function("window.client && client.state === 'open'", timeout=MS)
            proxy.chaos(0.1, 0.5)

            async def broadcaster() -> None:
                for n in range(BROADCASTS):
                    await apps[n % len(apps)].broadcast("feed", "tick", n)
                    if n % 50 == 49:
                        await asyncio.sleep(0.02)  # a steady feed over seconds, not one burst

            feed = asyncio.ensure_future(broadcaster())
            try:
                await page.evaluate("(messages) => run(messages)", MESSAGES)
                await page.wait_for_function("replies !== null || failure !== null", polling=100, timeout=MS)
            finally:
                await feed
            proxy.calm()
            assert await page.evaluate("failure") is None
            # Everything sent is on its way, or lost for good: wait for the rest, bounded;
            # what never comes is for check() to report, with the counts.
            with suppress(PlaywrightTimeoutError):
                await page.wait_for_function(f"got.length >= {BROADCASTS}", polling=100, timeout=TAIL_MS)
            with suppress(TimeoutError):
                async with timeout(TAIL):
                    while len(ledger.messages) < MESSAGES:
                        changed.clear()
                        await changed.wait()
            state = await page.evaluate("({ got, replies, gaps, resumed })")
    finally:
        cuts = proxy.cuts
        picks = list(proxy.picks)
        await page.close()
        await proxy.aclose()
    return {
        "errors": errors,
        "received": state["got"], "replies": state["replies"], "gaps": state["gaps"],
        "resumed": [(r["resumed"], r["lostMessages"]) for r in state["resumed"]],
        "cuts": cuts, "picks": picks, "seconds": time.monotonic() - began,
    }


@pytest.mark.slow
@pytest.mark.browser
async def test_browser_client_loses_nothing_through_a_proxy_that_keeps_cutting(browser: Any, static: Path) -> None:
    ledger, changed = ledger_for_waiting()
    app = chaos_app(ledger)
    server = await tether.serve({"/app": app}, "127.0.0.1", 0, static_dir=static, allowed_origins=["*"])
    try:
        result = await run_chaos_page(browser, [app], [server.port], ledger, changed)
    finally:
        await server.close()
    check(result, ledger, "tether.js, one process")
    assert result["errors"] == []
    assert len(ledger.executed) == REQUESTS


@pytest.mark.slow
@pytest.mark.browser
async def test_browser_client_loses_nothing_moving_between_two_hubs_on_each_cut(browser: Any, static: Path) -> None:
    """Two servers on one MemoryBus (two 'processes' sharing a broker); the proxy sends each
    new connection to the other one, so every cut is also a move."""
    ledger, changed = ledger_for_waiting()
    bus = tether.MemoryBus()
    apps = [chaos_app(ledger), chaos_app(ledger)]
    servers = [
        await tether.serve({"/app": a}, "127.0.0.1", 0, static_dir=static, allowed_origins=["*"], broker=tether.MemoryBroker(bus))
        for a in apps
    ]
    try:
        result = await run_chaos_page(browser, apps, [s.port for s in servers], ledger, changed)
    finally:
        for server in servers:
            await server.close()
    check(result, ledger, "tether.js, two hubs")
    assert result["errors"] == []
    assert len(set(result["picks"])) == 2
