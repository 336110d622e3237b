"""The call demo's server (examples/call) over real sockets, driven by tether's Python client.

What a browser relies on: joins with checked names and server-given seats, presence that shows
state changes as tether presence updates (no leave/join churn), signalling relayed to one
member and refused to anyone outside the call, chat with history for late joiners (tether's
room history), clear errors for bad input, and the pages (the call app's and the tutorial's at
/hello) on the same port.

Reconnects, as tether.js does them (sessions on): a client cut by a TCP proxy
(tests/cut_proxy.py) resumes with its member id and seat, the others see no leave/join, and
what happened meanwhile (chat, presence, a signal for it) arrives after the resume, once; a
restarted server (sessions lost) makes the client join again under a new id; a client that
does not come back leaves when its session's window ends; a client without sessions is a new
member after every reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import timeout
from rawws import http_get

import tether
from examples.call.app import CHAT_LINES, IceServer, make_app
from examples.call.server import PAGES, build_site, make_routes
from tests.cut_proxy import CutProxy

ROOM = "amber-otter-4821"
OFFER = {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}
CANDIDATE = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}


class Member:
    """A ``tether.Client`` in the demo (with a session, as tether.js keeps one) and a queue per
    pushed message type and for its ``resumed`` and ``gap`` events."""

    TYPES = ("presence", "signal", "chat")

    def __init__(self, url: str, *, resume: bool = True) -> None:
        self.client = tether.Client(url, resume=resume)
        self.inbox: dict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        for type in self.TYPES:
            self.client.on(type, self.inbox[type].put_nowait)
        for event in ("resumed", "gap", "close"):
            self.client.add_listener(event, lambda *args, event=event: self.inbox[event].put_nowait(args))
        self.id: str | None = None

    async def join(self, name: str, room: str = ROOM, **state: Any) -> dict[str, Any]:
        reply = await self.request("join", {"room": room, "meta": {"name": name, **state}})
        self.id = reply["id"]
        return reply

    async def request(self, type: str, data: Any = None) -> Any:
        async with timeout(5):
            return await self.client.request(type, data)

    async def next(self, type: str) -> Any:
        """The next pushed message (or event) of ``type`` (fails after a scaled timeout)."""
        async with timeout(5):
            return await self.inbox[type].get()

    async def refused(self, type: str, data: Any = None) -> tether.ReplyError:
        with pytest.raises(tether.ReplyError) as info:
            await self.request(type, data)
        return info.value

    async def back(self) -> bool:
        """After a cut: skip the backoff, wait until connected again; whether it resumed."""
        self.client.wake()
        (resumed, _lost) = await self.next("resumed")
        async with timeout(5):
            await self.client.wait_open()
        return bool(resumed)


class Gone:
    """Member ids of the demo app's connections as they close (after the app's own close
    callback ran: this one is added later), to wait for the server to have seen a cut."""

    def __init__(self, app: tether.App) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()

        def watch(conn: tether.Conn) -> None:
            conn.on_close(lambda conn: self.queue.put_nowait(app.hub.member_id(conn)))

        app.on_connect(watch)
        app.on_resume(watch)

    async def wait(self, member: str | None) -> None:
        async with timeout(5):
            while await self.queue.get() != member:
                pass


def demo_routes(**app_settings: Any) -> tuple[dict[str, tether.Handler], tether.App]:
    routes = make_routes(ice_servers=[IceServer("stun:stun.example.org:3478")])
    app = routes["/ws"]
    assert isinstance(app, tether.App)
    if app_settings:
        routes["/ws"] = app = make_app(ice_servers=[IceServer("stun:stun.example.org:3478")], **app_settings)
    return routes, app


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[tether.Server]:
    site = build_site(tmp_path / "site")
    routes, app = demo_routes()
    async with tether.serve(routes, "127.0.0.1", 0, static_dir=site, pages=PAGES) as server:
        server.gone = Gone(app)  # type: ignore[attr-defined]
        yield server


Members = Callable[..., Awaitable[list[Member]]]


@asynccontextmanager
async def started(urls: list[str], **options: Any) -> AsyncIterator[list[Member]]:
    members = [Member(url, **options) for url in urls]
    for member in members:
        member.client.start()
    try:
        yield members
    finally:
        for member in members:
            async with timeout(5):
                await member.client.close()


@pytest.fixture
async def members(demo: tether.Server) -> AsyncIterator[Members]:
    """``alice, bob = await members(2)``: started clients, closed at teardown; ``port=`` another
    port (a proxy's), ``resume=False`` clients without sessions."""
    async with AsyncExitStack() as stack:

        async def make(n: int, *, port: int | None = None, **options: Any) -> list[Member]:
            url = f"ws://127.0.0.1:{port or demo.port}/ws"
            return await stack.enter_async_context(started([url] * n, **options))

        yield make


# -- joining and presence ---------------------------------------------------------------------


async def test_server_join_gives_growing_seats_and_presence_lists_everyone(members):
    alice, bob = await members(2)
    first = await alice.join("Alice")
    assert first["room"] == ROOM
    assert first["presence"] == [{"id": alice.id, "meta": {"name": "Alice", "mic": True, "cam": True, "seat": 1}}]

    second = await bob.join("Bob", mic=False)
    bob_meta = {"name": "Bob", "mic": False, "cam": True, "seat": 2}
    assert {m["id"]: m["meta"] for m in second["presence"]} == {alice.id: first["presence"][0]["meta"], bob.id: bob_meta}
    assert await alice.next("presence") == {"event": "join", "id": bob.id, "meta": bob_meta}


async def test_server_state_is_a_presence_update_without_leave_or_join_events(members):
    alice, bob, carol = await members(3)
    await alice.join("Alice")
    await bob.join("Bob")
    assert (await alice.next("presence"))["event"] == "join"

    meta = await bob.request("state", {"name": "Robert", "mic": False, "cam": False})
    assert meta == {"name": "Robert", "mic": False, "cam": False, "seat": 2}
    assert await alice.next("presence") == {"event": "update", "id": bob.id, "meta": meta}
    assert {m["id"]: m["meta"] for m in await alice.request("presence", {"room": ROOM})}[bob.id] == meta

    joined = await carol.join("Carol")  # a late joiner sees the new state in its join reply
    assert {m["id"]: m["meta"] for m in joined["presence"]}[bob.id] == meta
    # The update was one event: Alice's next one is Carol's join; Bob's reply was his copy.
    assert await alice.next("presence") == {"event": "join", "id": carol.id, "meta": {"name": "Carol", "mic": True, "cam": True, "seat": 3}}
    assert await bob.next("presence") == {"event": "join", "id": carol.id, "meta": {"name": "Carol", "mic": True, "cam": True, "seat": 3}}


async def test_server_state_keeps_the_seat_and_chat_uses_the_new_name(members):
    alice, bob = await members(2)
    await alice.join("Alice")
    await bob.join("Bob")
    await bob.request("state", {"name": "Bobby"})
    line = await bob.request("chat", {"text": "call me Bobby"})
    assert (line["name"], line["from"]) == ("Bobby", bob.id)
    assert (await alice.next("chat"))["name"] == "Bobby"


async def test_server_joining_the_same_call_again_keeps_the_seat_and_updates_the_state(members):
    alice, bob = await members(2)
    await alice.join("Alice")
    await bob.join("Bob")
    assert (await alice.next("presence"))["event"] == "join"
    again = await bob.join("Bob", mic=False)
    meta = {"name": "Bob", "mic": False, "cam": True, "seat": 2}
    assert {m["id"]: m["meta"] for m in again["presence"]}[bob.id] == meta
    assert await alice.next("presence") == {"event": "update", "id": bob.id, "meta": meta}


async def test_server_leave_and_close_are_seen_by_the_others_at_once(members):
    alice, bob, carol = await members(3)
    for member, name in ((alice, "Alice"), (bob, "Bob"), (carol, "Carol")):
        await member.join(name)
    assert [(await alice.next("presence"))["id"] for _ in range(2)] == [bob.id, carol.id]

    assert await bob.request("leave", {"room": ROOM}) is None
    assert await alice.next("presence") == {"event": "leave", "id": bob.id, "meta": None}
    async with timeout(5):
        await carol.client.close()  # a close (1000) ends the session: no window to wait for
    assert await alice.next("presence") == {"event": "leave", "id": carol.id, "meta": None}
    assert [m["id"] for m in await alice.request("presence", {"room": ROOM})] == [alice.id]


# -- reconnecting -----------------------------------------------------------------------------


async def test_server_cut_member_resumes_with_its_id_and_seat_and_gets_what_it_missed(members, demo):
    """Bob's socket is cut and stays down; meanwhile Alice chats, mutes and signals him, and he
    says something. Back, he is the same member, the others saw nothing, and everything said
    either way arrives once, in order."""
    async with CutProxy(demo.port) as proxy:
        (alice,) = await members(1)
        (bob,) = await members(1, port=proxy.port)
        await alice.join("Alice")
        joined = await bob.join("Bob")
        assert (await alice.next("presence"))["event"] == "join"
        await bob.request("chat", {"text": "before the cut"})
        assert (await alice.next("chat"))["text"] == (await bob.next("chat"))["text"] == "before the cut"

        proxy.refuse()
        assert proxy.cut() == 1
        await bob.next("close")
        await demo.gone.wait(bob.id)  # the server saw him go: he is away, his session waits
        assert [m["id"] for m in await alice.request("presence", {"room": ROOM})] == [alice.id, bob.id]
        said = [await alice.request("chat", {"text": f"while you were away {n}"}) for n in range(3)]
        assert [await alice.next("chat") for _ in range(3)] == said
        await alice.request("state", {"name": "Alice", "mic": False})
        assert await alice.request("signal", {"to": bob.id, "description": OFFER}) is None  # kept for him
        bob.client.send("chat", {"text": "typed while cut"})  # in his outbox

        proxy.admit()
        assert await bob.back() is True
        assert bob.inbox["gap"].empty()
        assert [(await bob.next("chat"))["id"] for _ in range(3)] == [line["id"] for line in said]
        assert await bob.next("presence") == {"event": "update", "id": alice.id, "meta": {"name": "Alice", "mic": False, "cam": True, "seat": 1}}
        assert await bob.next("signal") == {"from": alice.id, "description": OFFER}
        assert (await alice.next("chat"))["text"] == "typed while cut"
        assert (await bob.next("chat"))["text"] == "typed while cut"

        again = await bob.request("presence", {"room": ROOM})  # the same member, the same seat
        assert {m["id"]: m["meta"] for m in again} == {
            alice.id: {"name": "Alice", "mic": False, "cam": True, "seat": 1},
            bob.id: {"name": "Bob", "mic": True, "cam": True, "seat": 2},
        }
        assert {m["id"] for m in joined["presence"]} == {alice.id, bob.id}
        await bob.request("chat", {"text": "after the cut"})  # still in the call without joining
        assert (await alice.next("chat"))["text"] == "after the cut"
        assert alice.inbox["presence"].empty()  # no leave, no join
        assert alice.inbox["chat"].empty() and bob.inbox["signal"].empty()  # nothing twice
        assert await alice.request("signal", {"to": bob.id, "candidate": CANDIDATE}) is None
        assert await bob.next("signal") == {"from": alice.id, "candidate": CANDIDATE}


async def test_server_restarted_loses_the_sessions_and_members_join_again(tmp_path):
    """The server process is replaced (sessions are in its memory): each client starts a new
    session, hears that its call is gone (a ``session`` gap) and joins again, under a new id."""
    routes, _ = demo_routes()
    first = await tether.serve(routes, "127.0.0.1", 0)
    try:
        async with CutProxy(first.port) as proxy, started([f"ws://127.0.0.1:{proxy.port}/ws"] * 2) as (alice, bob):
            await alice.join("Alice")
            await bob.join("Bob", cam=False)
            assert (await alice.next("presence"))["id"] == bob.id
            old = (alice.id, bob.id)
            await alice.request("chat", {"text": "said to the first server"})

            proxy.refuse()
            proxy.cut()
            await first.close()
            routes, _ = demo_routes()
            async with tether.serve(routes, "127.0.0.1", 0) as second:
                proxy.upstream_port = second.port
                proxy.admit()
                for member in (alice, bob):
                    assert await member.back() is False
                    assert await member.next("gap") == (ROOM, 0, 0, "session")
                    assert (await member.refused("chat", {"text": "not in a call yet"})).code == "not_in_call"
                await alice.join("Alice")
                rejoined = await bob.join("Bob", cam=False)
                assert alice.id not in old and bob.id not in old
                assert {m["id"]: m["meta"]["seat"] for m in rejoined["presence"]} == {alice.id: 1, bob.id: 2}
                assert await alice.next("presence") == {"event": "join", "id": bob.id, "meta": {"name": "Bob", "mic": True, "cam": False, "seat": 2}}
                assert await bob.request("history") == []  # the first server's history went with it
    finally:
        await first.close()


async def test_server_member_that_does_not_come_back_leaves_when_its_window_ends(tmp_path):
    routes, app = demo_routes(resume=tether.Resume(window=0.5))
    async with tether.serve(routes, "127.0.0.1", 0) as server:
        gone = Gone(app)
        async with CutProxy(server.port) as proxy, started([f"ws://127.0.0.1:{server.port}/ws"]) as (alice,):
            async with started([f"ws://127.0.0.1:{proxy.port}/ws"]) as (bob,):
                await alice.join("Alice")
                await bob.join("Bob")
                assert (await alice.next("presence"))["event"] == "join"
                proxy.refuse()
                proxy.cut()
                await gone.wait(bob.id)
                assert await alice.next("presence") == {"event": "leave", "id": bob.id, "meta": None}
                error = await alice.refused("signal", {"to": bob.id, "candidate": CANDIDATE})
                assert error.code == "no_such_peer"
                proxy.admit()
                assert await bob.back() is False  # too late: a new session
                await bob.join("Bob")
                assert (await alice.next("presence"))["event"] == "join"


async def test_server_client_without_sessions_rejoins_with_a_new_id_and_a_new_seat(members, demo):
    """A client that keeps no session (resume=False, or any plain WebSocket client) is a new
    member after every reconnect: the others see it leave at once, and it joins again."""
    (alice,) = await members(1)
    (bob,) = await members(1, resume=False)
    await alice.join("Alice")
    first = await bob.join("Bob")
    assert (await alice.next("presence"))["id"] == bob.id
    old_id = bob.id

    for conn in list(demo.connections):  # cut Bob's socket from the server side
        if conn.rooms and demo.hub.member_id(conn) == old_id:
            await conn.close(1012, "restart")
    assert await alice.next("presence") == {"event": "leave", "id": old_id, "meta": None}
    async with timeout(10):
        await bob.client.wait_open()
    again = await bob.join("Bob")
    assert bob.id != old_id
    assert {m["id"]: m["meta"]["seat"] for m in again["presence"]} == {alice.id: 1, bob.id: 3}
    assert first["presence"][-1]["meta"]["seat"] == 2
    assert (await alice.next("presence"))["id"] == bob.id


# -- signalling -------------------------------------------------------------------------------


async def test_server_relays_signal_to_its_target_only(members):
    alice, bob, carol = await members(3)
    for member, name in ((alice, "Alice"), (bob, "Bob"), (carol, "Carol")):
        await member.join(name)

    alice.client.send("signal", {"to": bob.id, "description": OFFER})
    alice.client.send("signal", {"to": carol.id, "candidate": CANDIDATE})
    assert await bob.next("signal") == {"from": alice.id, "description": OFFER}
    # Carol's first signal is the second one sent: the offer to Bob never reached her.
    assert await carol.next("signal") == {"from": alice.id, "candidate": CANDIDATE}
    assert await bob.request("signal", {"to": alice.id, "description": {"type": "answer", "sdp": "v=0\r\n"}}) is None
    assert await alice.next("signal") == {"from": bob.id, "description": {"type": "answer", "sdp": "v=0\r\n"}}
    assert alice.inbox["signal"].empty() and bob.inbox["signal"].empty()


async def test_server_refuses_signals_outside_the_call(members):
    alice, bob, mallory, outsider = await members(4)
    await alice.join("Alice")
    await bob.join("Bob")
    await mallory.join("Mallory", room="another-call-1")

    for target in (mallory.id, "no-such-member", alice.id):  # another call, nobody, oneself
        error = await alice.refused("signal", {"to": target, "description": OFFER})
        assert error.code == "no_such_peer", target
    error = await mallory.refused("signal", {"to": bob.id, "candidate": CANDIDATE})
    assert error.code == "no_such_peer"
    error = await outsider.refused("signal", {"to": bob.id, "candidate": CANDIDATE})
    assert error.code == "not_in_call"
    assert bob.inbox["signal"].empty()


@pytest.mark.parametrize(
    ("data", "code", "path"),
    [
        ({"description": OFFER}, "invalid_data", "$.data"),  # no "to"
        ({"to": "x", "description": {"type": "pranswer", "sdp": ""}}, "invalid_data", "$.data.description.type"),
        ({"to": "x", "candidate": {"sdpMid": "0"}}, "invalid_data", "$.data.candidate"),
        ({"to": "x", "description": OFFER, "extra": 1}, "invalid_data", "$.data"),
        ({"to": "x", "description": OFFER, "candidate": CANDIDATE}, "bad_signal", None),
        ({"to": "x"}, "bad_signal", None),
    ],
)
async def test_server_bad_signal_gets_a_clear_error(members, data, code, path):
    (alice,) = await members(1)
    await alice.join("Alice")
    error = await alice.refused("signal", data)
    assert (error.code, error.path) == (code, path)
    assert error.message


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("room", "meta", "code"),
    [
        ("Amber Otter", {"name": "A"}, "bad_room"),
        ("ab", {"name": "A"}, "bad_room"),
        ("-amber", {"name": "A"}, "bad_room"),
        (ROOM, None, "invalid_meta"),
        (ROOM, {"name": ""}, "invalid_meta"),
        (ROOM, {"name": "   "}, "invalid_meta"),
        (ROOM, {"name": "x" * 41}, "invalid_meta"),
        (ROOM, {"name": "A", "mic": "yes"}, "invalid_meta"),
        (ROOM, {"name": "A", "seat": 0}, "invalid_meta"),  # seats are the server's to give
    ],
)
async def test_server_join_with_bad_room_or_meta_is_refused(members, room, meta, code):
    (alice,) = await members(1)
    error = await alice.refused("join", {"room": room, "meta": meta})
    assert error.code == code and error.message
    assert await alice.refused("presence", {"room": room}) is not None  # not in it


async def test_server_one_call_per_connection(members):
    (alice,) = await members(1)
    await alice.join("Alice")
    error = await alice.refused("join", {"room": "another-call-1", "meta": {"name": "Alice"}})
    assert error.code == "one_call_at_a_time"
    again = await alice.join("Alice")  # the same call again: a no-op that keeps the seat
    assert again["presence"][0]["meta"]["seat"] == 1


async def test_server_full_call_refuses_the_next_member(tmp_path):
    async with tether.serve({"/ws": make_app(max_call_size=2)}, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        trio = [Member(url) for _ in range(3)]
        for member in trio:
            member.client.start()
        try:
            await trio[0].join("A")
            await trio[1].join("B")
            error = await trio[2].refused("join", {"room": ROOM, "meta": {"name": "C"}})
            assert error.code == "call_full"
            await trio[1].request("leave", {"room": ROOM})
            await trio[2].join("C")  # a seat is free again
        finally:
            for member in trio:
                async with timeout(5):
                    await member.client.close()


@pytest.mark.parametrize(
    ("type", "data", "code", "path"),
    [
        ("state", {"name": ""}, "invalid_data", "$.data.name"),
        ("state", {"name": "A", "mic": 1}, "invalid_data", "$.data.mic"),
        ("chat", {"text": ""}, "invalid_data", "$.data.text"),
        ("chat", {"text": "x" * 1001}, "invalid_data", "$.data.text"),
        ("chat", "hello", "invalid_data", "$.data"),
        ("shout", {"text": "hi"}, "unknown_type", None),
    ],
)
async def test_server_bad_data_gets_a_clear_error(members, type, data, code, path):
    (alice,) = await members(1)
    await alice.join("Alice")
    error = await alice.refused(type, data)
    assert (error.code, error.path) == (code, path)
    assert error.message


@pytest.mark.parametrize(("type", "data"), [("state", {"name": "A"}), ("chat", {"text": "hi"}), ("history", None)])
async def test_server_call_messages_before_joining_are_refused(members, type, data):
    (alice,) = await members(1)
    assert (await alice.refused(type, data)).code == "not_in_call"


async def test_server_bad_json_gets_an_error_and_the_connection_stays(demo):
    async with tether.connect(f"ws://127.0.0.1:{demo.port}/ws") as conn:
        assert msgspec.json.decode(await conn.receive())["type"] == "welcome"
        await conn.send('{"type": "chat", "data": ')
        error = msgspec.json.decode(await conn.receive())
        assert error["type"] == "error" and error["data"]["code"] == "bad_json"
        await conn.send('{"type": "config", "id": 1}')
        assert msgspec.json.decode(await conn.receive()) == {
            "type": "reply",
            "id": 1,
            "data": {"iceServers": [{"urls": "stun:stun.example.org:3478"}]},
        }


# -- chat -------------------------------------------------------------------------------------


async def test_server_chat_reaches_the_call_and_late_joiners_get_the_history(members):
    alice, bob, carol, elsewhere = await members(4)
    await alice.join("Alice")
    await bob.join("Bob")
    await elsewhere.join("Eve", room="another-call-1")
    said = [await alice.request("chat", {"text": f"line {n}"}) for n in range(3)]
    assert len({line["id"] for line in said}) == 3
    for member in (alice, bob):
        assert [await member.next("chat") for _ in range(3)] == said
    assert said[0]["from"] == alice.id and said[0]["name"] == "Alice" and isinstance(said[0]["at"], int)

    await carol.join("Carol")
    assert await carol.request("history") == said
    assert await elsewhere.request("history") == []
    assert elsewhere.inbox["chat"].empty()


async def test_server_history_is_the_last_lines_whatever_else_the_call_broadcast(members):
    """The history comes from the room's (presence events are in it too): the last CHAT_LINES
    lines, oldest first."""
    alice, bob = await members(2)
    await alice.join("Alice")
    said = []
    for n in range(CHAT_LINES + 5):
        said.append(await alice.request("chat", {"text": f"line {n}"}))
        await alice.request("state", {"name": "Alice", "mic": n % 2 == 0})  # presence updates between
    await bob.join("Bob")
    assert await bob.request("history") == said[-CHAT_LINES:]


async def test_server_history_outlives_the_members_of_a_call(members):
    """Everyone left: a link opened again (within CHAT_MAX_AGE) shows what was said there."""
    alice, bob = await members(2)
    await alice.join("Alice")
    line = await alice.request("chat", {"text": "see you tomorrow"})
    async with timeout(5):
        await alice.client.close()
    await bob.join("Bob")
    assert await bob.request("history") == [line]


# -- configuration and pages ------------------------------------------------------------------


async def test_server_config_gives_the_ice_servers(members):
    (alice,) = await members(1)
    assert await alice.request("config") == {"iceServers": [{"urls": "stun:stun.example.org:3478"}]}


@pytest.mark.parametrize(
    ("path", "marker"),
    [
        ("/", b"Start a new call"),
        ("/call/amber-otter-4821", b'src="/assets/call.js"'),
        ("/assets/call.js", b'from "/tether.js"'),
        ("/assets/app.css", b".tile"),
        ("/hello", b"Getting Started with WebSockets in Go"),
    ],
)
async def test_demo_serves_its_pages(demo, path, marker):
    status, headers, body = await http_get(demo.port, path)
    assert status == 200 and marker in body


async def test_demo_keeps_the_tutorial_conversation_on_the_same_port(demo, caplog):
    caplog.set_level(logging.INFO, logger="hello")
    async with tether.connect(f"ws://127.0.0.1:{demo.port}/socket") as conn:
        await conn.send('{"message": "hello server!"}')
        assert msgspec.json.decode(await conn.receive()) == {"message": "Thanks for the message!"}
    assert "Received message: hello server!" in caplog.messages
