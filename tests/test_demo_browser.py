"""The call demo in headless Chromium: real pages, fake camera and microphone, real WebRTC.

The demo server (``python -m examples.call.server``) runs as a child process so a test can
SIGKILL it and start it again on the same port (its sessions die with it: the pages join
again), or a TCP proxy (tests/cut_proxy.py) cuts one page's socket while the server stays up
(the page resumes its session: same member id, no leave/join, nothing missed). Each
participant is its own browser context (its own storage, like another person's browser), with
camera and microphone granted. Proof of a call, as notes/webrtc.md has it:
``RTCPeerConnection.connectionState == "connected"`` on both sides and ``getStats()``
inbound-rtp video ``bytesReceived`` growing.

The two-person test keeps a screenshot; ``TETHER_DEMO_SCREENSHOT=1`` writes it to
``docs/demo.png`` (the README's), otherwise it stays in the test's temporary directory so that
test runs do not touch the working tree.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import TIMEOUT_SCALE
from playwright.async_api import Browser, Page, async_playwright
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.cut_proxy import CutProxy

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
MEDIA_ARGS = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
VIEWPORT = {"width": 1280, "height": 720}
ROOM = "demo-call-0001"


def ms(seconds: float) -> int:
    """A Playwright timeout in ms, scaled by TETHER_TEST_TIMEOUT_SCALE."""
    return int(seconds * 1000 * TIMEOUT_SCALE)


class DemoServer:
    """``python -m examples.call.server`` as a child process: start, SIGKILL, start again."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start on the last port (a free one the first time); return once it listens."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "examples.call.server", "--port", str(self.port),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(20 * TIMEOUT_SCALE):
            line = (await self.proc.stdout.readline()).decode()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if found is None:
            raise RuntimeError(f"the demo did not start: {line!r}")
        self.port = int(found.group(1))

    async def kill(self) -> None:
        """SIGKILL: every socket dies with the process, no close frames."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def aclose(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10 * TIMEOUT_SCALE):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def server() -> AsyncIterator[DemoServer]:
    demo = DemoServer()
    await demo.start()
    yield demo
    await demo.aclose()


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + MEDIA_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def join(browser: Browser, server: DemoServer, name: str, *, base: str | None = None) -> Page:
    """A new participant (a context of its own) named ``name`` opening the call's link
    (on the server, or at ``base``: a proxy in front of it)."""
    base = base or server.base
    context = await browser.new_context(viewport=VIEWPORT)
    await context.grant_permissions(["camera", "microphone"], origin=base)
    await context.add_init_script(f"localStorage.setItem('tether-call.name', {name!r})")
    page = await context.new_page()
    errors: list[str] = []
    console: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.errors, page.console = errors, console  # type: ignore[attr-defined]
    await page.goto(f"{base}/call/{ROOM}")
    return page


async def in_call(page: Page, names: list[str]) -> None:
    """Wait until ``page`` lists exactly ``names`` (itself included) and every peer is connected."""
    try:
        await _in_call(page, names)
    except PlaywrightTimeoutError:
        summary = await page.evaluate("JSON.stringify(call.summary(), null, 1)")
        pytest.fail(f"not in a call with {names}: {summary}\nconsole: {page.console}")  # type: ignore[attr-defined]


async def _in_call(page: Page, names: list[str]) -> None:
    await page.wait_for_function(
        """(names) => {
            const s = call.summary();
            return s.myId !== null
              && JSON.stringify(s.roster.map((m) => m.name).sort()) === JSON.stringify([...names].sort())
              && s.peers.length === names.length - 1
              && s.peers.every((p) => p.state === "connected");
        }""",
        arg=names,
        timeout=ms(30),
    )


VIDEO_GROWS = """async (deadline_ms) => {
    const peers = [...call.peers.values()];
    const bytes = () => Promise.all(peers.map((peer) => peer.videoBytesReceived()));
    const first = await bytes();
    const deadline = performance.now() + deadline_ms;
    while (performance.now() < deadline) {                     // bounded: until the deadline
        await new Promise((resolve) => setTimeout(resolve, 100));
        const now = await bytes();
        if (now.every((b, i) => b > first[i])) return { first, now };
    }
    throw new Error(`inbound video bytes did not grow: ${JSON.stringify(first)} -> ${JSON.stringify(await bytes())}`);
}"""


async def video_grows(page: Page) -> None:
    """Inbound video bytes grow on every peer connection of ``page``."""
    result = await page.evaluate(VIDEO_GROWS, ms(15))
    assert len(result["now"]) == len(await page.evaluate("[...call.peers.keys()]"))


async def say(page: Page, text: str) -> None:
    await page.fill("#chat-text", text)
    await page.press("#chat-text", "Enter")


async def hears(page: Page, text: str) -> None:
    await page.wait_for_function(
        "(text) => [...document.querySelectorAll('#chat-lines li:not(.unsent) .text')].some((e) => e.textContent === text)",
        arg=text,
        timeout=ms(10),
    )


async def sees(page: Page, name: str, **state: bool) -> None:
    """``page``'s people list shows ``name`` with the mic/cam ``state`` given."""
    await page.wait_for_function(
        """([name, state]) => [...document.querySelectorAll('#people li')].some((li) =>
            li.querySelector('.name').textContent === name
            && Object.entries(state).every(([k, v]) => li.dataset[k] === String(v)))""",
        arg=[name, state],
        timeout=ms(10),
    )


async def indicator(page: Page, state: str) -> str:
    await page.wait_for_function("(state) => document.getElementById('conn').dataset.state === state", arg=state, timeout=ms(20))
    return await page.text_content("#conn .label") or ""


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


async def test_two_browsers_call_chat_and_recover_when_the_server_restarts(server, tmp_path):
    async with chromium() as browser:
        ada = await join(browser, server, "Ada Lovelace")
        grace = await join(browser, server, "Grace Hopper")
        for page in (ada, grace):
            await in_call(page, ["Ada Lovelace", "Grace Hopper"])
        for page in (ada, grace):
            await video_grows(page)
        await sees(ada, "Grace Hopper", mic=True, cam=True)
        await sees(grace, "Ada Lovelace", mic=True, cam=True)

        await grace.click("#mic")  # live presence state: Ada sees Grace muted
        await sees(ada, "Grace Hopper", mic=False, cam=True)
        await say(ada, "Hi Grace! Can you see me?")
        await hears(grace, "Hi Grace! Can you see me?")
        await say(grace, "Loud and clear, Ada.")
        await hears(ada, "Loud and clear, Ada.")

        # The README's screenshot: Ada's view, Grace's video playing.
        await ada.wait_for_function(
            "[...document.querySelectorAll('.tile video')].every((v) => v.videoWidth > 0 && v.readyState >= 2)", timeout=ms(10)
        )
        await ada.evaluate("document.activeElement?.blur()")
        shot = tmp_path / "demo.png"
        await ada.screenshot(path=str(shot))
        assert png_size(shot) == (VIEWPORT["width"], VIEWPORT["height"])
        if os.environ.get("TETHER_DEMO_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / "docs" / "demo.png")

        before = {page: await page.evaluate("call.myId") for page in (ada, grace)}
        await server.kill()  # its sessions die with it
        for page in (ada, grace):
            assert (await indicator(page, "reconnecting")).startswith("Reconnecting")
        await say(grace, "Typed while the server was down.")  # waits on the page
        await server.start()  # the same port
        for page in (ada, grace):
            assert await indicator(page, "connected") == "Connected"

        # A new session: the pages join again. Presence heals: new member ids, the same
        # people, Grace still muted.
        for page in (ada, grace):
            await in_call(page, ["Ada Lovelace", "Grace Hopper"])
            assert await page.evaluate("call.myId") != before[page]
            assert await page.evaluate("call.resumes") == [False]
            assert {"room": ROOM, "reason": "session"} in await page.evaluate("call.gaps")
        await sees(ada, "Grace Hopper", mic=False, cam=True)
        await sees(grace, "Ada Lovelace", mic=True, cam=True)
        for page in (ada, grace):  # signalling recovered: new peer connections carry video
            await video_grows(page)
        await hears(ada, "Typed while the server was down.")
        await say(grace, "Still here after the restart.")
        await hears(ada, "Still here after the restart.")
        assert await ada.evaluate("call.summary().chat.filter((t) => t === 'Typed while the server was down.').length") == 1

        for page in (ada, grace):
            states = [entry["state"] for entry in await page.evaluate("call.connectionLog")]
            assert states == ["connecting", "connected", "reconnecting", "connected"], states
            assert page.errors == []


async def test_offers_crossing_on_both_sides_still_connect(server):
    """Glare: both sides make an offer at the same moment; the polite one rolls back."""
    async with chromium() as browser:
        pages = [await join(browser, server, name) for name in ("Polly Polite", "Ivan Impolite")]
        for page in pages:
            await in_call(page, ["Polly Polite", "Ivan Impolite"])
        peer = "[...call.peers.values()][0]"
        before = [await page.evaluate(f"({{...{peer}.stats}})") for page in pages]

        # Hold back incoming signals on both pages, make both offer (an ICE restart), and only
        # once both sit in have-local-offer let the offers cross.
        for page in pages:
            await page.evaluate("call.hold()")
        for page in pages:
            await page.evaluate(f"{peer}.restartIce()")
        for page in pages:
            await page.wait_for_function(f"{peer}.pc.signalingState === 'have-local-offer'", timeout=ms(10))
        await asyncio.gather(*(page.evaluate("call.release()") for page in pages))

        for page in pages:
            await page.wait_for_function(
                f"{peer}.pc.signalingState === 'stable' && {peer}.state === 'connected'", timeout=ms(20)
            )
            await video_grows(page)
        after = [await page.evaluate(f"({{...{peer}.stats}})") for page in pages]
        polite = [await page.evaluate(f"{peer}.polite") for page in pages]
        assert sorted(polite) == [False, True]  # the server's seats gave one role to each
        for was, now, is_polite in zip(before, after, polite, strict=True):
            assert now["collisions"] > was["collisions"]
            if is_polite:
                assert now["rollbacks"] > was["rollbacks"] and now["ignoredOffers"] == was["ignoredOffers"]
            else:
                assert now["ignoredOffers"] > was["ignoredOffers"] and now["rollbacks"] == was["rollbacks"]
        for page in pages:
            assert page.errors == []


async def test_third_person_joins_every_pair_connects_then_one_leaves(server):
    names = ["Ada Lovelace", "Grace Hopper", "Alan Turing"]
    async with chromium() as browser:
        ada, grace = [await join(browser, server, name) for name in names[:2]]
        for page in (ada, grace):
            await in_call(page, names[:2])
        await say(ada, "Alan should be here any minute.")
        await hears(grace, "Alan should be here any minute.")
        alan = await join(browser, server, names[2])
        await hears(alan, "Alan should be here any minute.")  # history for a late joiner
        for page in (ada, grace, alan):
            await in_call(page, names)
        for page in (ada, grace, alan):
            await video_grows(page)
        for page in (ada, grace):
            await sees(page, "Alan Turing", mic=True, cam=True)
        await alan.fill("#people li.mine input", "Alan M. Turing")  # names are editable, live
        await alan.press("#people li.mine input", "Enter")
        for page in (ada, grace):
            await sees(page, "Alan M. Turing", mic=True, cam=True)
            await page.wait_for_function("[...document.querySelectorAll('.tile .name')].some((e) => e.textContent === 'Alan M. Turing')", timeout=ms(10))
        assert await alan.evaluate("localStorage.getItem('tether-call.name')") == "Alan M. Turing"

        await alan.click("#leave")
        await alan.wait_for_selector("#ended:not([hidden])", timeout=ms(10))
        assert await alan.text_content("#ended-title") == "You left the call."
        # The others see it at once (well within the presence timeout) and drop the peer.
        for page in (ada, grace):
            await in_call(page, names[:2])
            assert await page.locator("#people li").count() == 2
            assert await page.locator(".tile").count() == 2
        for page in (ada, grace, alan):
            assert page.errors == []


async def test_one_cut_socket_reconnects_and_the_other_side_heals_while_the_server_stays_up(server):
    """Grace's socket (through a TCP proxy) is cut and stays down for a while; the server
    stays up. Her page resumes its session: the same member id and seat, Ada sees no leave or
    join, the peer connections carry on, and what was said, changed and signalled meanwhile
    arrives, in both directions."""
    async with CutProxy(server.port) as proxy, chromium() as browser:
        ada = await join(browser, server, "Ada Lovelace")
        grace = await join(browser, server, "Grace Hopper", base=f"http://127.0.0.1:{proxy.port}")
        for page in (ada, grace):
            await in_call(page, ["Ada Lovelace", "Grace Hopper"])
        await grace.click("#cam")
        await sees(ada, "Grace Hopper", mic=True, cam=False)
        ids = {page: await page.evaluate("call.myId") for page in (ada, grace)}
        for page in (ada, grace):  # mark the Peer objects: the same ones must be there after
            await page.evaluate("window.peersBefore = [...call.peers.values()]")
        seen = await ada.evaluate("call.presenceLog.length")
        restarts = await ada.evaluate("[...call.peers.values()][0].stats.iceRestarts")

        proxy.refuse()  # the network is down: reconnects fail until admit()
        assert proxy.cut() == 1
        assert (await indicator(grace, "reconnecting")).startswith("Reconnecting")
        await video_grows(ada)  # video does not go through the server
        await video_grows(grace)
        await say(ada, "Grace, are you still there?")
        await say(grace, "My network dropped for a moment.")  # waits in her client's outbox
        await grace.click("#mic")  # so does her new state
        await ada.evaluate("[...call.peers.values()][0].restartIce()")  # an offer for her: kept
        await ada.wait_for_function("[...call.peers.values()][0].pc.signalingState === 'have-local-offer'", timeout=ms(10))

        proxy.admit()
        await grace.evaluate("call.client.wake()")  # skip what is left of the backoff
        assert await indicator(grace, "connected") == "Connected"
        await hears(grace, "Grace, are you still there?")
        await hears(ada, "My network dropped for a moment.")
        await sees(ada, "Grace Hopper", mic=False, cam=False)
        await ada.wait_for_function(
            """(restarts) => { const peer = [...call.peers.values()][0];
                return peer.stats.iceRestarts > restarts && peer.pc.signalingState === 'stable' && peer.state === 'connected'; }""",
            arg=restarts, timeout=ms(20),
        )  # fmt: skip
        for page in (ada, grace):
            await in_call(page, ["Ada Lovelace", "Grace Hopper"])
            await video_grows(page)
            assert await page.evaluate("call.myId") == ids[page]
            assert await page.evaluate("[...call.peers.values()].every((peer, i) => peer === window.peersBefore[i])")
        assert await grace.evaluate("call.resumes") == [True]
        assert await grace.evaluate("call.gaps") == []
        # Ada saw Grace change her state, and no leave or join: no flapping.
        changes = (await ada.evaluate("call.presenceLog"))[seen:]
        assert changes == [{"event": "update", "id": ids[grace]}], changes
        roster = await ada.evaluate("call.summary().roster.map((m) => m.id)")
        assert sorted(roster) == sorted(ids.values())
        assert await ada.locator(".tile.remote.no-video").count() == 1
        await say(ada, "Welcome back, Grace.")
        await hears(grace, "Welcome back, Grace.")
        for page in (ada, grace):  # every line once
            chat = await page.evaluate("call.summary().chat")
            assert len(chat) == len(set(chat)) == 3, chat

        grace_log = [e["state"] for e in await grace.evaluate("call.connectionLog")]
        assert grace_log == ["connecting", "connected", "reconnecting", "connected"], grace_log
        assert [e["state"] for e in await ada.evaluate("call.connectionLog")] == ["connecting", "connected"]
        for page in (ada, grace):
            assert page.errors == []


async def test_a_reload_leaves_and_joins_again_at_once(server):
    """A reloaded page ends its session (pagehide): the others see it leave at once rather
    than keep a ghost for the resume window, and it joins again with the chat's history."""
    async with chromium() as browser:
        ada = await join(browser, server, "Ada Lovelace")
        grace = await join(browser, server, "Grace Hopper")
        for page in (ada, grace):
            await in_call(page, ["Ada Lovelace", "Grace Hopper"])
        await say(ada, "Said before the reload.")
        await hears(grace, "Said before the reload.")
        old = await grace.evaluate("call.myId")

        await grace.reload()
        await ada.wait_for_function(
            "(old) => call.presenceLog.some((e) => e.event === 'leave' && e.id === old)", arg=old, timeout=ms(5)
        )  # well within the session window (30 s)
        for page in (ada, grace):
            await in_call(page, ["Ada Lovelace", "Grace Hopper"])
            await video_grows(page)
        assert await grace.evaluate("call.myId") != old
        await hears(grace, "Said before the reload.")  # the history, from tether's room history
        for page in (ada, grace):
            assert page.errors == []


PURE_MODULES = """async () => {
    const { Roster, isPolite } = await import("/assets/roster.js");
    const { ChatLog } = await import("/assets/chat.js");
    const { describe } = await import("/assets/status.js");
    const { bestGrid } = await import("/assets/layout.js");
    const { toRoomName, randomRoom, ROOM_NAME, initials } = await import("/assets/names.js");
    const meta = (name, seat) => ({ name, mic: true, cam: true, seat });

    // Diffs before the state wait for it, then apply on top, in order.
    const roster = new Roster();
    roster.apply({ event: "join", id: "n.3", meta: meta("C", 3) });
    roster.apply({ event: "leave", id: "n.2", meta: null });
    roster.apply({ event: "update", id: "n.1", meta: { ...meta("Ann", 1), mic: false } });
    const waiting = roster.synced;
    roster.sync([{ id: "n.1", meta: meta("A", 1) }, { id: "n.2", meta: meta("B", 2) }]);
    const afterSync = roster.entries().map(([id, m]) => `${id}:${m.name}:${m.mic}`);
    roster.apply({ event: "update", id: "n.9", meta: meta("ghost", 9) }); // unknown: ignored
    roster.unsync();                                      // a gap: diffs wait for the list
    roster.apply({ event: "leave", id: "n.1", meta: null });
    const keptWhileUnsynced = roster.size;
    roster.unsync();                                      // still waiting: the leave waits too
    roster.sync([{ id: "n.1", meta: meta("Ann", 1) }, { id: "n.3", meta: meta("C", 3) }]);
    const afterGap = roster.entries().map(([id]) => id);
    roster.reset();                                       // a new session: old diffs are dropped
    roster.apply({ event: "join", id: "m.1", meta: meta("A", 1) });
    roster.reset();
    roster.sync([{ id: "m.2", meta: meta("B", 1) }]);
    const afterReset = roster.entries().map(([id]) => id);

    const chat = new ChatLog(5);
    const line = (id) => ({ id, text: id });
    chat.add([line("c")]);                                 // live before the history reply
    const mark = chat.mark();
    chat.add([line("e")]);                                 // said after the mark
    const merged = chat.merge([line("a"), line("b"), line("c"), line("d")], mark);
    const afterMerge = chat.lines.map((l) => l.text);
    const again = chat.add([line("d")]);                   // in the history, then live: once
    const same = chat.merge([line("c"), line("d")], chat.mark());
    chat.add([line("f")]);                                 // the limit drops "a"...
    const dropped = chat.merge([line("a"), line("f")], chat.mark()); // ...for good
    const old = new ChatLog();
    old.add([line("x"), line("y")]);                       // then the server restarted
    const fresh = old.mark();
    old.merge([line("z")], fresh);

    return {
        waiting, afterSync, keptWhileUnsynced, afterGap, afterReset,
        polite: [isPolite({ id: "n.2", meta: meta("B", 2) }, { id: "n.1", meta: meta("A", 1) }),
                 isPolite({ id: "n.1", meta: meta("A", 1) }, { id: "n.2", meta: meta("B", 2) })],
        chat: chat.lines.map((l) => l.text), merged, afterMerge, again, same, dropped, restarted: old.lines.map((l) => l.text),
        status: [describe("connected", null, 0), describe("reconnecting", 2500, 0), describe("reconnecting", 100, 200),
                 describe("offline", null, 0), describe("connecting", null, 0)],
        grid: [bestGrid(2, 890, 544), bestGrid(1, 890, 544), bestGrid(4, 890, 544)].map((g) => [g.cols, g.rows]),
        rooms: [toRoomName(" Team Sync! "), toRoomName("http://x/call/amber-otter-4821"), toRoomName("http://x/call?room=amber-otter-4821"), toRoomName("a"),
                ROOM_NAME.test(randomRoom())],
        initials: [initials("Ada Lovelace"), initials("grace"), initials("Alan M Turing")],
    };
}"""


async def test_page_modules_merge_presence_and_chat_in_order(server):
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{server.base}/")
        result = await page.evaluate(PURE_MODULES)
    assert result["waiting"] is False
    assert result["afterSync"] == ["n.1:Ann:false", "n.3:C:true"]  # B left, C came, A updated
    assert result["keptWhileUnsynced"] == 2  # shown as last known until the next state
    assert result["afterGap"] == ["n.3"]  # the leave that came while waiting applies on top
    assert result["afterReset"] == ["m.2"]  # the old session's join does not
    assert result["polite"] == [True, False]  # the later seat is polite
    assert result["merged"] is True and result["afterMerge"] == ["a", "b", "c", "d", "e"]
    assert result["again"] is False and result["same"] is False
    assert result["chat"] == ["b", "c", "d", "e", "f"] and result["dropped"] is False
    assert result["restarted"] == ["x", "y", "z"]
    assert result["status"] == ["Connected", "Reconnecting in 3 s", "Reconnecting…", "Offline", "Connecting…"]
    assert result["grid"] == [[2, 1], [1, 1], [2, 2]]
    assert result["rooms"] == ["team-sync", "amber-otter-4821", "amber-otter-4821", None, True]
    assert result["initials"] == ["AL", "GR", "AT"]
