"""Zero-loss resume (issue 12; docs/protocol.md "Sessions and resume").

The pure bookkeeping (tether.proto.resume) with events only; then real sockets: tether.Client
through a TCP proxy that cuts the connection (tests/chaos_proxy.py), against tether's server
with the in-memory broker, and across two hubs sharing one MemoryBus (a client resuming in
"another process"). The chaos runs are marked slow.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether
from chaos_proxy import ChaosProxy
from conftest import TIMEOUT_SCALE, timeout
from tether.proto.backoff import Backoff
from tether.proto.resume import DirectLog, Gap, HistoryBudget, Inbound, RoomLog, merge
from tether.sessions import Resume

S = TIMEOUT_SCALE

# -- the pure bookkeeping -----------------------------------------------------------------------


def test_inbound_accepts_each_seq_once_and_acks_cumulatively() -> None:
    inbound = Inbound()
    assert [inbound.accept(s) for s in (1, 2, 2, 1, 3)] == [True, True, False, False, True]
    assert inbound.accept(None) is True  # clients without sessions: always handled
    assert inbound.ack_due() == 3 and inbound.ack_due() is None
    assert inbound.accept(7) and inbound.ack_due() == 7  # holes are fine (outbox overflow)


def test_direct_log_keeps_until_acked_and_replays_the_tail() -> None:
    log = DirectLog(max_count=10)
    for n in range(1, 6):
        assert log.next() == n
        log.keep(n, b"m%d" % n)
    log.ack(2)
    assert [seq for seq, _ in log.entries] == [3, 4, 5] and log.size == 6
    payloads, gap = log.replay(3)
    assert (payloads, gap) == ([b"m4", b"m5"], None)


def test_direct_log_restored_from_an_older_copy_numbers_on_after_what_the_client_has() -> None:
    """A copy saved before its process died knows seq 2; the client received up to 7 from
    that process: what comes next must be 8, or the client drops it as seen."""
    log = DirectLog(max_count=10, seq=2)
    assert log.replay(7) == ([], None)
    assert log.next() == 8 and log.acked == 7


def test_direct_log_overflow_is_a_gap_on_replay() -> None:
    log = DirectLog(max_count=3)
    for n in range(1, 9):
        log.keep(log.next(), b"m%d" % n)
    assert log.dropped == 5
    payloads, gap = log.replay(2)
    assert payloads == [b"m6", b"m7", b"m8"] and gap == Gap(3, 5, "trimmed")


def test_direct_log_bounds_bytes_too() -> None:
    log = DirectLog(max_count=100, max_bytes=10)
    for n in range(1, 5):
        log.keep(log.next(), b"x" * 4)
    assert len(log.entries) == 2 and log.size == 8


def test_room_log_trims_by_count_and_reports_the_gap() -> None:
    log = RoomLog("e1", max_count=3)
    for n in range(10):
        assert log.append(b"%d" % n, now=0.0) == n + 1
    kept, gap = log.read(after=2, now=0.0)
    assert [o for o, _ in kept] == [8, 9, 10] and gap == Gap(3, 7, "trimmed", "e1")
    assert log.read(after=10, now=0.0) == ([], None)
    assert log.read(after=9, now=0.0) == ([(10, b"9")], None)


def test_room_log_expires_by_age() -> None:
    log = RoomLog("e1", max_count=100, max_age=10.0)
    log.append(b"old", now=0.0)
    log.append(b"new", now=8.0)
    kept, gap = log.read(after=0, now=15.0)
    assert kept == [(2, b"new")] and gap == Gap(1, 1, "expired", "e1")


def test_room_log_without_history_counts_offsets_and_gaps_any_miss() -> None:
    log = RoomLog("e1", max_count=0)
    assert [log.append(b"x", 0.0) for _ in range(3)] == [1, 2, 3]
    assert log.read(after=1, now=0.0) == ([], Gap(2, 3, "trimmed", "e1"))


def test_room_log_too_many_missing_is_one_gap() -> None:
    log = RoomLog("e1", max_count=5000)
    for _ in range(2000):
        log.append(b"x", 0.0)
    assert log.read(after=0, now=0.0, limit=1000) == ([], Gap(1, 2000, "too_many", "e1"))


def test_history_budget_evicts_the_oldest_of_any_room_first() -> None:
    budget = HistoryBudget(max_bytes=10)
    a, b = RoomLog("a", budget=budget), RoomLog("b", budget=budget)
    a.append(b"aaaa", 0.0)  # oldest
    b.append(b"bbbb", 0.0)
    a.append(b"aaaa", 0.0)  # 12 bytes > 10: a's first goes
    assert budget.size == 8 and [o for o, _, _ in a.entries] == [2] and len(b.entries) == 1
    assert a.read(after=0, now=0.0) == ([(2, b"aaaa")], Gap(1, 1, "trimmed", "a"))


def test_merge_orders_dedupes_and_finds_a_hole() -> None:
    history = [(4, b"d"), (5, b"e")]
    live = [(5, b"e"), (6, b"f"), (3, b"c")]
    assert merge(history, live, after=2) == ([(3, b"c"), (4, b"d"), (5, b"e"), (6, b"f")], None)
    run, hole = merge([(3, b"c")], [(6, b"f")], after=2)
    assert run == [(3, b"c")] and hole == Gap(4, 5, "lost")


# -- over real sockets ------------------------------------------------------------------------


class Counter:
    """Server side of the test app: what each handler saw, to count executions."""

    def __init__(self) -> None:
        self.executed: collections.Counter[int] = collections.Counter()
        self.messages: list[int] = []
        self.events: list[tuple[str, str, Any]] = []
        self.release = asyncio.Event()


def resume_app(counter: Counter, resume: Resume | None = Resume()) -> tether.App:
    app = tether.App(resume=resume)

    @app.on_connect
    async def hello(conn: tether.Conn) -> None:
        name = conn.query.get("name", "anon")
        await conn.join("lobby", {"name": name})

    @app.on("work")
    async def work(conn: tether.Conn, n: int) -> int:
        counter.executed[n] += 1
        return n * 2

    @app.on("slow")
    async def slow(conn: tether.Conn, n: int) -> int:
        counter.executed[n] += 1
        await counter.release.wait()
        return n * 2

    @app.on("note")
    def note(conn: tether.Conn, n: int) -> None:
        counter.messages.append(n)

    @app.on("shout")
    async def shout(conn: tether.Conn, n: int) -> None:
        await app.broadcast("lobby", "said", n)

    return app


def fast_backoff() -> Backoff:
    return Backoff(base=0.01 * S, cap=0.05 * S)


class Setup:
    def __init__(self, server: tether.Server, proxy: ChaosProxy, app: tether.App, counter: Counter) -> None:
        self.server, self.proxy, self.app, self.counter = server, proxy, app, counter

    def client(self, name: str = "anon", **kwargs: Any) -> tether.Client:
        return tether.Client(f"ws://127.0.0.1:{self.proxy.port}/app?name={name}", backoff=fast_backoff(), **kwargs)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    counter = Counter()
    app = resume_app(counter)
    server = await tether.serve({"/app": app}, "127.0.0.1", 0)
    proxy = await ChaosProxy([server.port]).start()
    yield Setup(server, proxy, app, counter)
    counter.release.set()
    await proxy.aclose()
    await server.close()


class Seen:
    """What a client's handlers and listeners saw."""

    def __init__(self, client: tether.Client) -> None:
        self.said: list[int] = []
        self.presence: list[dict[str, Any]] = []
        self.gaps: list[tuple[Any, ...]] = []
        self.resumed: list[tuple[bool, int]] = []
        self.reconnected = asyncio.Event()
        client.on("said", self.said.append)
        client.on("presence", self.presence.append)
        client.add_listener("gap", lambda *args: self.gaps.append(args))
        client.add_listener("resumed", lambda *args: self.resumed.append(args))
        client.add_listener("reconnected", self.reconnected.set)

    async def reconnect(self) -> None:
        await self.reconnected.wait()
        self.reconnected.clear()


async def until(condition: Any, seconds: float = 5.0) -> None:
    async with timeout(seconds):
        while not condition():
            await asyncio.sleep(0.005)


async def test_broadcasts_sent_while_cut_arrive_after_the_resume_in_order(setup: Setup) -> None:
    async with timeout(10), setup.client() as client:
        seen = Seen(client)
        await client.wait_open()
        for n in range(3):
            await setup.app.broadcast("lobby", "said", n)
        await until(lambda: len(seen.said) == 3)
        setup.proxy.block()
        setup.proxy.cut_all()
        for n in range(3, 10):
            await setup.app.broadcast("lobby", "said", n)  # the client is away
        setup.proxy.unblock()
        await seen.reconnect()
        await until(lambda: len(seen.said) == 10)
        await setup.app.broadcast("lobby", "said", 10)
        await until(lambda: len(seen.said) == 11)
    assert seen.said == list(range(11)) and seen.resumed == [(True, 0)] and seen.gaps == []


async def test_a_session_client_that_stops_reading_is_closed_1013_and_resumes_with_nothing_lost() -> None:
    """A member that stops reading fills its send queue. Without a session the default policy
    drops the oldest frames (docs/rooms.md); with one a room message is never dropped: the
    connection is closed with 1013, the client resumes from its last offset and the room's
    history replays the rest."""
    app = resume_app(Counter())
    server = await tether.serve({"/app": app}, "127.0.0.1", 0, max_send_queue=16)
    proxy = await ChaosProxy([server.port], rcvbuf=4096).start()
    got: list[int] = []
    closes: list[int] = []
    pad = "x" * 1000
    try:
        async with timeout(30 * S), tether.Client(f"ws://127.0.0.1:{proxy.port}/app", backoff=fast_backoff()) as client:
            seen = Seen(client)
            client.on("big", lambda data: got.append(data["n"]))
            client.add_listener("close", lambda code, reason: closes.append(code))
            await client.wait_open()
            app.hub.set_history("lobby", max_count=5000)
            (conn,) = server.connections
            await app.broadcast("lobby", "big", {"n": 0, "pad": pad})
            await until(lambda: got == [0])
            proxy.stall()
            n = 1
            while conn.state is tether.ConnState.OPEN and n < 5000:
                await app.broadcast("lobby", "big", {"n": n, "pad": pad})
                n += 1
            assert conn.state is not tether.ConnState.OPEN and conn.stats.dropped == 0, (n, conn.stats)
            assert conn.close_code == 1013
            proxy.flow()
            await until(lambda: len(got) >= n, 15 * S)
    finally:
        await proxy.aclose()
        await server.close()
    assert got == list(range(n)) and closes[:1] == [1013], (len(got), closes)
    assert seen.resumed == [(True, 0)] and seen.gaps == []


async def test_request_in_flight_when_cut_runs_once_and_gets_its_reply(setup: Setup) -> None:
    async with timeout(10), setup.client() as client:
        seen = Seen(client)
        await client.wait_open()
        pending = asyncio.ensure_future(client.request("slow", 7, timeout=None))
        await until(lambda: setup.counter.executed[7] == 1)
        setup.proxy.cut_all()
        await seen.reconnect()
        setup.counter.release.set()
        assert await pending == 14
    assert setup.counter.executed == {7: 1}


async def test_one_way_messages_across_cuts_are_handled_exactly_once_in_order(setup: Setup) -> None:
    async with timeout(10), setup.client() as client:
        seen = Seen(client)
        await client.wait_open()
        for n in range(50):
            client.send("note", n)
            if n % 10 == 5:
                setup.proxy.cut_all()  # some were written to a socket that is now gone
        await until(lambda: len(setup.counter.messages) == 50)
        await asyncio.sleep(0)
    assert setup.counter.messages == list(range(50))


async def test_presence_stays_across_a_resume_with_no_leave_or_join(setup: Setup) -> None:
    async with timeout(10), setup.client("ann") as ann, setup.client("bob") as bob:
        seen_ann, seen_bob = Seen(ann), Seen(bob)
        await ann.wait_open()
        await bob.wait_open()
        await until(lambda: [p["event"] for p in seen_ann.presence] == ["join"])
        before = {m.id for m in await setup.app.presence("lobby")}
        setup.proxy.cut_all()
        await seen_bob.reconnect()
        await ann.request("shout", 1)  # a round trip after the resume: events would be here
        await until(lambda: seen_bob.said == [1] and seen_ann.said == [1])
        after = {m.id for m in await setup.app.presence("lobby")}
        events = [p["event"] for p in seen_ann.presence]
    assert events == ["join"]  # bob's join, and no leave/join pair for either resume
    assert before == after and len(after) == 2


async def test_history_trimmed_while_away_is_a_gap_then_the_rest(setup: Setup) -> None:
    setup.server.hub.set_history("lobby", max_count=3)
    async with timeout(10), setup.client() as client:
        seen = Seen(client)
        await client.wait_open()
        await setup.app.broadcast("lobby", "said", 0)
        await until(lambda: seen.said == [0])
        setup.proxy.block()  # away until the broadcasts are made (or they go live)
        setup.proxy.cut_all()
        for n in range(1, 11):
            await setup.app.broadcast("lobby", "said", n)
        setup.proxy.unblock()
        await seen.reconnect()
        await until(lambda: len(seen.said) == 4)
    assert seen.said == [0, 8, 9, 10]
    ((room, first, last, reason),) = seen.gaps
    assert room == "lobby" and reason == "trimmed" and last - first == 6  # offsets of 1..7


async def test_history_expired_while_away_is_a_gap(setup: Setup) -> None:
    setup.server.hub.set_history("lobby", max_count=100, max_age=0.2)
    async with timeout(10), setup.client() as client:
        seen = Seen(client)
        await client.wait_open()
        setup.proxy.block()
        setup.proxy.cut_all()
        await setup.app.broadcast("lobby", "said", 1)
        # The message must be older than max_age when the resume reads history: the age is
        # the condition under test, so keeping the client away that long is the test.
        await asyncio.sleep(0.25)
        setup.proxy.unblock()
        await seen.reconnect()
        await until(lambda: seen.gaps)
    assert seen.said == [] and [g[3] for g in seen.gaps] == ["expired"]


async def test_epoch_change_while_away_is_a_gap(setup: Setup) -> None:
    async with timeout(10), setup.client() as client:
        seen = Seen(client)
        await client.wait_open()
        await setup.app.broadcast("lobby", "said", 1)
        await until(lambda: seen.said == [1])
        setup.proxy.block()  # away until the epoch changed and 2 was sent
        setup.proxy.cut_all()
        broker = setup.server.hub.broker
        assert isinstance(broker, tether.MemoryBroker)
        broker.bus.streams.pop("lobby")  # the room's history is lost: a new epoch
        await setup.app.broadcast("lobby", "said", 2)
        setup.proxy.unblock()
        await seen.reconnect()
        await until(lambda: seen.gaps)
        await setup.app.broadcast("lobby", "said", 3)
        await until(lambda: seen.said[-1:] == [3])
    assert [g[3] for g in seen.gaps] == ["epoch"]
    assert seen.said == [1, 2, 3]  # after the gap, the new epoch from its start


async def test_expired_session_is_a_new_one_with_gaps_and_lost_requests() -> None:
    counter = Counter()
    app = resume_app(counter, Resume(window=0.2))
    server = await tether.serve({"/app": app}, "127.0.0.1", 0)
    proxy = await ChaosProxy([server.port]).start()
    try:
        async with timeout(10), tether.Client(f"ws://127.0.0.1:{proxy.port}/app", backoff=fast_backoff()) as client:
            seen = Seen(client)
            await client.wait_open()
            pending = asyncio.ensure_future(client.request("slow", 1, timeout=None))
            await until(lambda: counter.executed[1] == 1)
            proxy.block()
            proxy.cut_all()
            await asyncio.sleep(0.3)  # away for longer than the 0.2 s window: the condition under test
            proxy.unblock()
            await seen.reconnect()
            with pytest.raises(tether.ConnectionLost):
                await pending
    finally:
        counter.release.set()
        await proxy.aclose()
        await server.close()
    assert seen.resumed == [(False, 0)]
    assert [(g[0], g[3]) for g in seen.gaps] == [("lobby", "session")]


async def test_direct_messages_beyond_the_log_are_a_gap_on_resume() -> None:
    counter = Counter()
    app = resume_app(counter, Resume(max_direct=3))
    pushes: list[tether.Conn] = []

    @app.on("mine")
    def mine(conn: tether.Conn) -> None:
        pushes.append(conn)

    server = await tether.serve({"/app": app}, "127.0.0.1", 0)
    proxy = await ChaosProxy([server.port]).start()
    got: list[int] = []
    try:
        async with timeout(10), tether.Client(f"ws://127.0.0.1:{proxy.port}/app", backoff=fast_backoff()) as client:
            seen = Seen(client)
            client.on("push", got.append)
            await client.request("mine")
            proxy.block()  # the client stays away until the pushes are made (or they go live)
            proxy.cut_all()
            await until(lambda: pushes[0].state is tether.ConnState.CLOSED)
            for n in range(8):
                await pushes[0].emit("push", n)  # kept by the session, not raised: the client will resume
            proxy.unblock()
            await seen.reconnect()
            await until(lambda: len(got) == 3)
            await until(lambda: seen.gaps)
    finally:
        await proxy.aclose()
        await server.close()
    assert got == [5, 6, 7]
    ((room, first, last, reason),) = seen.gaps
    assert room is None and reason == "trimmed" and last - first == 4


async def test_resume_on_another_hub_of_the_same_bus(tmp_path: Any) -> None:
    """Two servers on one MemoryBus stand for two processes: a client cut from the first
    resumes its session on the second (the proxy sends each connection to the next server)."""
    bus = tether.MemoryBus()
    counters = [Counter(), Counter()]
    apps = [resume_app(c) for c in counters]
    servers = [await tether.serve({"/app": a}, "127.0.0.1", 0, broker=tether.MemoryBroker(bus)) for a in apps]
    ports = [s.port for s in servers]
    proxy = await ChaosProxy(ports).start()
    try:
        async with timeout(10), tether.Client(f"ws://127.0.0.1:{proxy.port}/app?name=x", backoff=fast_backoff()) as client:
            seen = Seen(client)
            await client.wait_open()
            await apps[0].broadcast("lobby", "said", 1)
            await until(lambda: seen.said == [1])
            pending = asyncio.ensure_future(client.request("slow", 5, timeout=None))
            await until(lambda: counters[0].executed[5] == 1)
            proxy.cut_all()
            await apps[0].broadcast("lobby", "said", 2)
            # The handler ends while the second server asks the first to let go (it waits
            # for the session's handlers, RELEASE_TIMEOUT / 2 at most): its reply moves too.
            counters[0].release.set()
            await seen.reconnect()
            assert await pending == 10
            await until(lambda: seen.said == [1, 2])
            assert await client.request("work", 3) == 6
            members = await apps[1].presence("lobby")
    finally:
        await proxy.aclose()
        for server in servers:
            await server.close()
    assert proxy.picks == ports
    assert counters[1].executed == {3: 1} and counters[0].executed == {5: 1}
    assert seen.resumed == [(True, 0)] and len(members) == 1


async def test_hub_recent_gives_a_late_joiner_the_rooms_last_broadcasts() -> None:
    hub = tether.Hub()
    for n in range(5):
        await hub.broadcast("chat", "said", {"n": n})
    recent = await hub.recent("chat", limit=3)
    assert [(type, data) for _, type, data in recent] == [("said", {"n": 2}), ("said", {"n": 3}), ("said", {"n": 4})]
    assert [offset for offset, _, _ in recent] == [3, 4, 5]
    assert await hub.recent("empty") == []
    await hub.close()
