"""tether.js sessions in headless Chromium: nothing lost or doubled across a cut, both ways.

A page (served by the server, with ``/tether.js``) talks to a tether App through a TCP proxy
on 127.0.0.1 (tests/cut_proxy.py) that the test cuts, keeps refusing while "the network is
down", or makes swallow the bytes in flight in one direction. The App counts what it
executes and receives; the page records what it gets.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import tether
from tests.browser import chromium
from tests.conftest import TIMEOUT_SCALE, ServerFactory, timeout
from tests.cut_proxy import CutProxy

S = TIMEOUT_SCALE
MS = int(15_000 * S)  # Playwright waits, in ms

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>tether resume test</title>
<script type="module">
  import { connect } from "/tether.js";
  const query = new URLSearchParams(location.search);
  window.got = [];        // {data, room} of every "tick"
  window.presence = [];   // data of every "presence" event
  window.events = [];     // {name, detail} of the client's events
  window.replies = [];    // {id, ok | error} of requests made with call()
  const options = { backoff: { base: %(base)s, cap: %(cap)s }, requestTimeout: %(request_ms)d, ackDelay: 100 };
  if (query.get("persist")) options.persist = "sessionStorage";
  const client = connect(query.get("ws"), options);
  client.on("tick", (data, room) => window.got.push({ data, room }));
  client.on("presence", (data) => window.presence.push(data));
  for (const name of ["open", "close", "reconnecting", "reconnected", "resumed", "gap", "error"]) {
    client.addEventListener(name, (event) => window.events.push({ name, detail: event.detail ?? null }));
  }
  // A request whose outcome the test reads later (a promise cannot cross page.evaluate twice).
  window.call = (type, data) => {
    const entry = { type, data };
    window.replies.push(entry);
    client.request(type, data).then((ok) => { entry.ok = ok; }, (error) => { entry.error = error.name; });
  };
  window.client = client;
</script>
"""


@dataclass
class Counts:
    """What the App saw: executions per key, one-way items in order, connections (new or
    resumed, in the order they came)."""

    executed: Counter[str] = field(default_factory=Counter)
    items: list[Any] = field(default_factory=list)
    conns: list[tether.Conn] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, predicate: Any) -> None:
        """Until ``predicate()`` holds (the caller bounds it)."""
        while not predicate():
            self.changed.clear()
            await self.changed.wait()


def make_app(counts: Counts) -> tether.App:
    app = tether.App()

    @app.on_join
    def may_join(conn: tether.Conn, room: str, meta: Any) -> Any:
        return True

    @app.on_connect
    @app.on_resume
    def came(conn: tether.Conn) -> None:
        counts.conns.append(conn)
        counts.changed.set()

    @app.on("append")
    def append(conn: tether.Conn, data: Any) -> None:
        counts.items.append(data)
        counts.changed.set()

    @app.on("log")
    def log(conn: tether.Conn) -> list[Any]:
        return counts.items

    @app.on("count")
    def count(conn: tether.Conn, data: str) -> str:
        counts.executed[data] += 1
        counts.changed.set()
        return f"done {data}"

    @app.on("work")
    async def work(conn: tether.Conn, data: str) -> str:
        """Runs until the test releases it: a request in flight across a cut."""
        counts.executed[data] += 1
        counts.started.set()
        await counts.release.wait()
        return f"done {data}"

    @app.on("whoami")
    def whoami(conn: tether.Conn) -> str | None:
        return app.hub.member_id(conn)

    return app


@dataclass
class Stack:
    app: tether.App
    server: tether.Server
    proxy: CutProxy
    counts: Counts

    def page_url(self, **query: str) -> str:
        extra = "".join(f"&{key}={value}" for key, value in query.items())
        return f"http://127.0.0.1:{self.server.port}/?ws=ws://127.0.0.1:{self.proxy.port}/ws{extra}"

    async def broadcast(self, start: int, stop: int, room: str = "room") -> None:
        for i in range(start, stop):
            await self.app.broadcast(room, "tick", i)

    async def down(self, page: Any) -> None:
        """The network goes down: the page's connection is cut and reconnecting fails, and
        the server has seen its connection (the last one that came) close."""
        conn = self.counts.conns[-1]
        self.proxy.refuse()
        assert self.proxy.cut() == 1
        async with timeout(10):
            await conn.wait_closed()
        await page.wait_for_function("client.state === 'reconnecting'", timeout=MS)


@pytest.fixture
async def stack(make_server: ServerFactory, tmp_path: Path) -> AsyncIterator[Stack]:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text(PAGE % {"base": 0.05 * S, "cap": 0.3 * S, "request_ms": int(30_000 * S)})
    counts = Counts()
    app = make_app(counts)
    # The page comes from the server, its socket goes through the proxy: allow that origin.
    server = await make_server({"/ws": app}, static_dir=static, allowed_origins=["*"])
    async with CutProxy(server.port) as proxy:
        yield Stack(app, server, proxy, counts)
        counts.release.set()  # a hanging handler must not hold the server's close


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


async def open_page(browser: Any, stack: Stack, **query: str) -> Any:
    page = await browser.new_page()
    await page.goto(stack.page_url(**query))
    await page.wait_for_function("window.client && client.state === 'open'", timeout=MS)
    return page


async def join(page: Any, room: str = "room", meta: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = await page.evaluate("([room, meta]) => client.request('join', {room, meta})", [room, meta])
    return reply


async def wait_resumed(page: Any, count: int = 1) -> None:
    await page.wait_for_function(f"events.filter((e) => e.name === 'resumed').length >= {count}", timeout=MS)


async def events_named(page: Any, *names: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = await page.evaluate("events")
    return [e for e in events if e["name"] in names]


# -- (a) server -> client: broadcasts --------------------------------------------------------


@pytest.mark.browser
async def test_browser_gets_broadcasts_sent_while_cut_after_resume_in_order_once(stack: Stack, browser: Any) -> None:
    page = await open_page(browser, stack)
    await join(page)
    await stack.broadcast(0, 5)
    await page.wait_for_function("got.length === 5", timeout=MS)

    await stack.down(page)
    await stack.broadcast(5, 55)  # the page is away for all of these
    stack.proxy.admit()
    await wait_resumed(page)
    await stack.broadcast(55, 60)  # and live again
    await page.wait_for_function("got.length >= 60", timeout=MS)
    got = await page.evaluate("got")
    # Nothing more is on its way: a marker through the same room comes right after.
    await stack.broadcast(60, 61)
    await page.wait_for_function("got.length >= 61", timeout=MS)
    got = await page.evaluate("got")

    assert [g["data"] for g in got] == list(range(61))
    assert {g["room"] for g in got} == {"room"}
    assert await events_named(page, "resumed", "gap") == [{"name": "resumed", "detail": {"resumed": True, "lostMessages": 0}}]
    assert stack.proxy.accepted >= 2  # the first connection, the resumed one (and any refused between)


# -- (b) a request in flight --------------------------------------------------------------------


@pytest.mark.browser
async def test_browser_request_running_when_cut_gets_its_one_reply_after_resume(stack: Stack, browser: Any) -> None:
    page = await open_page(browser, stack)
    await page.evaluate("call('work', 'a')")
    async with timeout(10):
        await stack.counts.started.wait()
    await stack.down(page)
    stack.counts.release.set()  # it finishes while the page is away: its reply waits in the session
    stack.proxy.admit()
    await page.wait_for_function("replies[0].ok !== undefined || replies[0].error !== undefined", timeout=MS)
    assert await page.evaluate("replies") == [{"type": "work", "data": "a", "ok": "done a"}]
    assert stack.counts.executed == Counter({"a": 1})
    assert await events_named(page, "resumed", "gap") == [{"name": "resumed", "detail": {"resumed": True, "lostMessages": 0}}]


@pytest.mark.browser
async def test_browser_request_whose_reply_was_lost_in_the_cut_is_executed_once(stack: Stack, browser: Any) -> None:
    """The server ran it and replied, the reply never arrived: after the resume the page
    sends it again (unacked), the server drops the duplicate and replays the reply."""
    page = await open_page(browser, stack)
    stack.proxy.swallow("down")
    await page.evaluate("call('count', 'b')")
    async with timeout(10):
        await stack.counts.wait(lambda: stack.counts.executed["b"] == 1)
        await stack.proxy.swallowed.wait()  # the reply reached the proxy, and no further
    assert await page.evaluate("replies[0].ok") is None
    await stack.down(page)
    stack.proxy.admit()
    await page.wait_for_function("replies[0].ok !== undefined", timeout=MS)
    # One more round trip: had the request run twice, the count would show it by now.
    await page.evaluate("call('count', 'marker')")
    await page.wait_for_function("replies[1].ok !== undefined", timeout=MS)
    assert await page.evaluate("replies.map((r) => r.ok)") == ["done b", "done marker"]
    assert stack.counts.executed == Counter({"b": 1, "marker": 1})


@pytest.mark.browser
async def test_browser_request_lost_on_its_way_in_the_cut_is_resent_and_executed_once(stack: Stack, browser: Any) -> None:
    page = await open_page(browser, stack)
    stack.proxy.swallow("up")
    await page.evaluate("call('count', 'c')")
    async with timeout(10):
        await stack.proxy.swallowed.wait()  # written by the page, lost in the network
    await stack.down(page)
    assert stack.counts.executed["c"] == 0
    stack.proxy.admit()
    await page.wait_for_function("replies[0].ok !== undefined", timeout=MS)
    assert await page.evaluate("replies[0].ok") == "done c"
    assert stack.counts.executed == Counter({"c": 1})


# -- (c) client -> server: one-way messages --------------------------------------------------------


@pytest.mark.browser
async def test_browser_one_way_messages_around_a_cut_are_delivered_once_in_order(stack: Stack, browser: Any) -> None:
    page = await open_page(browser, stack)
    await page.evaluate("for (let i = 0; i < 10; i++) client.send('append', i)")
    async with timeout(10):
        await stack.counts.wait(lambda: len(stack.counts.items) == 10)
    stack.proxy.swallow("up")
    await page.evaluate("for (let i = 10; i < 20; i++) client.send('append', i)")  # written, lost on the way
    async with timeout(10):
        await stack.proxy.swallowed.wait()
    await stack.down(page)
    await page.evaluate("for (let i = 20; i < 30; i++) client.send('append', i)")  # queued while down
    stack.proxy.admit()
    await wait_resumed(page)
    assert await page.evaluate("client.request('log')") == list(range(30))
    assert stack.counts.items == list(range(30))
    assert await events_named(page, "resumed", "gap") == [{"name": "resumed", "detail": {"resumed": True, "lostMessages": 0}}]


# -- (d) presence ---------------------------------------------------------------------------------


@pytest.mark.browser
async def test_browser_reconnect_within_the_window_shows_no_leave_or_join_to_other_members(stack: Stack, browser: Any) -> None:
    other_presence: list[Any] = []
    marker = asyncio.Event()
    async with tether.Client(f"ws://127.0.0.1:{stack.server.port}/ws") as other:
        other.on("presence", other_presence.append)
        other.on("tick", lambda data: marker.set())
        async with timeout(10):
            await other.wait_open()
            await other.request("join", {"room": "room", "meta": {"name": "other"}})
        page = await open_page(browser, stack)
        joined = await join(page, meta={"name": "page"})
        member = joined["id"]
        async with timeout(10):
            while not any(p.get("id") == member for p in other_presence):
                await other.request("presence", {"room": "room"})  # a round trip: what came before it is in
        assert other_presence == [{"event": "join", "id": member, "meta": {"name": "page"}}]

        await stack.down(page)
        stack.proxy.admit()
        await wait_resumed(page)
        assert await page.evaluate("client.request('whoami')") == member
        await stack.broadcast(0, 1)  # after anything the cut made the room publish
        async with timeout(10):
            await marker.wait()
            listed = await other.request("presence", {"room": "room"})
        await page.wait_for_function("got.length === 1", timeout=MS)  # the marker: presence before it is in
        assert await page.evaluate("presence") == []  # (the other's own close, next, is a leave)
    assert other_presence == [{"event": "join", "id": member, "meta": {"name": "page"}}]
    assert member in [m["id"] for m in listed]


# -- (e) persist: a page reload ----------------------------------------------------------------------


@pytest.mark.browser
async def test_browser_persist_reload_resumes_the_session_with_the_broadcasts_it_missed(stack: Stack, browser: Any) -> None:
    page = await open_page(browser, stack, persist="1")
    await join(page)
    member = await page.evaluate("client.request('whoami')")
    await stack.broadcast(0, 3)
    await page.wait_for_function("got.length === 3", timeout=MS)
    await page.evaluate("client.send('append', 'before')")
    async with timeout(10):
        await stack.counts.wait(lambda: stack.counts.items == ["before"])

    conn = stack.counts.conns[-1]
    stack.proxy.refuse()  # the reloaded page cannot reconnect yet
    await page.reload(wait_until="load")
    async with timeout(10):
        await conn.wait_closed()
    code = conn.close_code
    await stack.broadcast(3, 8)  # missed while the page reloads
    stack.proxy.admit()
    await page.wait_for_function("window.client && client.state === 'open'", timeout=MS)
    await page.wait_for_function("got.length >= 5", timeout=MS)
    await stack.broadcast(8, 9)
    await page.wait_for_function("got.length >= 6", timeout=MS)

    assert [g["data"] for g in await page.evaluate("got")] == [3, 4, 5, 6, 7, 8]
    assert await page.evaluate("client.request('whoami')") == member
    assert await events_named(page, "resumed", "gap") == [{"name": "resumed", "detail": {"resumed": True, "lostMessages": 0}}]
    await page.evaluate("client.send('append', 'after')")
    assert await page.evaluate("client.request('log')") == ["before", "after"]  # seq numbering went on
    assert code != 1000  # a reload is not a deliberate close: the session waited
    stored = await page.evaluate("Object.keys(sessionStorage)")
    assert stored == [f"tether.session ws://127.0.0.1:{stack.proxy.port}/ws"]


@pytest.mark.browser
async def test_browser_duplicated_tab_takes_the_session_and_the_first_starts_a_new_one(stack: Stack, browser: Any) -> None:
    """A duplicated tab copies sessionStorage: the copy resumes the session, the server closes
    the original with 4009, and the original starts a session of its own (a gap for its room)."""
    context = await browser.new_context()
    first = await context.new_page()
    await first.goto(stack.page_url(persist="1"))
    await first.wait_for_function("window.client && client.state === 'open'", timeout=MS)
    await join(first)
    member = await first.evaluate("client.request('whoami')")
    await first.evaluate("dispatchEvent(new Event('pagehide'))")  # as a duplication would find it saved
    saved = await first.evaluate("JSON.stringify(Object.entries(sessionStorage))")

    copy = await context.new_page()
    await copy.add_init_script(f"for (const [k, v] of {saved}) sessionStorage.setItem(k, v);")
    await copy.goto(stack.page_url(persist="1"))
    await copy.wait_for_function("window.client && client.state === 'open'", timeout=MS)
    await first.wait_for_function("events.some((e) => e.name === 'close' && e.detail.code === 4009)", timeout=MS)
    await wait_resumed(first)

    assert await events_named(copy, "resumed") == [{"name": "resumed", "detail": {"resumed": True, "lostMessages": 0}}]
    assert await copy.evaluate("client.request('whoami')") == member
    assert await events_named(first, "resumed", "gap") == [
        {"name": "gap", "detail": {"room": "room", "first": 0, "last": 0, "reason": "session"}},
        {"name": "resumed", "detail": {"resumed": False, "lostMessages": 0}},
    ]
    assert await first.evaluate("client.request('whoami')") is None  # a new session, in no room
    await stack.broadcast(0, 1)
    await copy.wait_for_function("got.length === 1", timeout=MS)
    assert await first.evaluate("got") == []
    await context.close()
