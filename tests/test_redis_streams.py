"""Room streams on the Redis broker, against a real redis-server (a free port per test).

Three levels:

- :class:`tether.rooms.redis.Track`, the pure bookkeeping of one room's live stream at one
  process (order, holes, epochs), driven by events only;
- :class:`RedisBroker` itself: two brokers (two "processes") on one Redis, each recording
  what it hands its hub (``deliver`` and ``on_gap``), compared with :class:`MemoryBroker`
  where the semantics must be the same;
- the hub and the wire: in-process servers on their own RedisBrokers and a client of the raw
  session protocol (subprotocol ``session``, then ``session.<token>.<ack>`` and a ``resume``
  message), or ``tether.Client``; and two server processes (tests/rooms_app.py).

Waits poll a condition under a scaled deadline; time passing is only waited for where time
is the condition (a message expiring).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.exceptions

import tether
from tether.proto.backoff import Backoff
from tether.proto.resume import Gap
from tether.redis_broker import LinkState, RedisBroker
from tether.rooms.broker import History, MemoryBroker, MemoryBus
from tether.rooms.redis import DELIVER, HELD, SEEN, Track
from tests.chaos_proxy import ChaosProxy
from tests.conftest import timeout, within
from tests.redis_fixture import (  # noqa: F401  (fixtures)
    AnyRedis,
    AppProcess,
    Peer,
    any_redis,
    app_processes,
    close_peers,
    eventually,
    open_peers,
    redis_cluster,
    redis_cluster_session,
)

RedisServer = AnyRedis

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_server(any_redis: AnyRedis) -> AnyRedis:
    """Every test here that takes a Redis runs on a redis-server and on a Redis Cluster."""
    return any_redis

NODE_A, NODE_B = "aaaaaaaaaaaa", "bbbbbbbbbbbb"


# -- Track: events in, decisions out ------------------------------------------------------------
def test_track_delivers_in_order_and_drops_what_it_has_seen() -> None:
    track = Track()
    assert track.arrive("e", 5, b"5") == HELD  # not positioned yet
    track.position("e", 4)
    assert track.drain() == ([(5, b"5")], False)
    assert track.arrive("e", 6, b"6") == DELIVER
    assert track.arrive("e", 6, b"6") == SEEN
    assert (track.epoch, track.last, track.held) == ("e", 6, [])


def test_track_position_keeps_messages_published_after_the_subscription() -> None:
    """A message that arrived before the position was read, at or before the head, was
    published after subscribing: it and what follows are delivered."""
    track = Track()
    for offset in (9, 10, 11):
        track.arrive("e", offset, b"%d" % offset)
    track.arrive("old", 3, b"old")
    track.position("e", 10)
    assert track.last == 8
    assert track.drain() == ([(9, b"9"), (10, b"10"), (11, b"11")], False)


def test_track_hole_is_held_then_filled_by_history_in_order() -> None:
    track = Track()
    track.position("e", 0)
    assert track.arrive("e", 1, b"1") == DELIVER
    assert track.arrive("e", 4, b"4") == HELD  # 2 and 3 were lost
    assert track.arrive("e", 5, b"5") == HELD  # held behind the hole, not delivered early
    assert track.read("e", [(2, b"2"), (3, b"3"), (4, b"4")], None) == [(2, b"2"), (3, b"3"), (4, b"4")]
    assert track.drain() == ([(5, b"5")], False)
    assert track.arrive("e", 6, b"6") == DELIVER


def test_track_history_gap_is_reported_before_what_follows_it() -> None:
    track = Track()
    track.position("e", 1)
    track.arrive("e", 5, b"5")
    out = track.read("e", [(4, b"4"), (5, b"5")], Gap(2, 3, "trimmed", "e"))
    assert out == [Gap(2, 3, "trimmed", "e"), (4, b"4"), (5, b"5")]
    assert track.drain() == ([], False) and track.last == 5


def test_track_gap_from_history_stops_at_what_is_held() -> None:
    """No history (or too much missing): the gap covers the hole, not what arrived after it."""
    track = Track()
    track.position("e", 1)
    track.arrive("e", 3, b"3")
    track.arrive("e", 4, b"4")
    assert track.read("e", [], Gap(2, 4, "trimmed", "e")) == [Gap(2, 2, "trimmed", "e")]
    assert track.drain() == ([(3, b"3"), (4, b"4")], False)


def test_track_new_epoch_is_a_gap_from_0_then_the_new_epoch_from_its_start() -> None:
    track = Track()
    track.position("old", 7)
    assert track.arrive("new", 3, b"n3") == HELD
    out = track.read("new", [(1, b"n1"), (2, b"n2")], Gap(0, 0, "epoch", "new"))
    assert out == [Gap(0, 0, "epoch", "new"), (1, b"n1"), (2, b"n2")]
    assert (track.epoch, track.last) == ("new", 2)
    assert track.drain() == ([(3, b"n3")], False)
    # the new epoch's own history trimmed: the epoch gap ends where it resumes
    track = Track()
    track.position("old", 7)
    assert track.read("new", [(5, b"n5")], Gap(0, 4, "epoch", "new")) == [Gap(0, 4, "epoch", "new"), (5, b"n5")]


def test_track_held_message_of_another_epoch_asks_for_another_read() -> None:
    track = Track()
    track.position("e", 3)
    track.arrive("other", 1, b"x")
    assert track.drain() == ([], True)  # which epoch is current? read again
    assert track.held == []


def test_track_gives_up_a_hole_as_lost_and_delivers_what_it_holds() -> None:
    track = Track()
    track.position("e", 2)
    for offset in (5, 4, 8):
        track.arrive("e", offset, b"%d" % offset)
    assert track.give_up() == [Gap(3, 3, "lost", "e"), (4, b"4"), (5, b"5"), Gap(6, 7, "lost", "e"), (8, b"8")]
    assert track.last == 8 and track.held == []


# -- brokers on one Redis ---------------------------------------------------------------------
class Stream:
    """What a broker hands its hub, in order: ``(room, offset, data)`` and ``(room, Gap)``."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, room: str, data: bytes, offset: int | None = None) -> None:
        self.events.append((room, offset, data))

    def gap(self, room: str, gap: Gap) -> None:
        self.events.append((room, gap))

    def messages(self, room: str = "r") -> list[tuple[int, bytes]]:
        return [(e[1], e[2]) for e in self.events if e[0] == room and len(e) == 3]

    def gaps(self, room: str = "r") -> list[Gap]:
        return [e[1] for e in self.events if e[0] == room and len(e) == 2]

    def data(self, room: str = "r") -> list[bytes]:
        return [data for _, data in self.messages(room)]

    async def has(self, n: int, room: str = "r", seconds: float = 10) -> None:
        async def check() -> bool:
            return len(self.messages(room)) >= n

        await eventually(check, seconds, f"{n} messages delivered in {room!r} (have {len(self.messages(room))})")


Start = Callable[..., Awaitable[tuple[RedisBroker, Stream]]]


@pytest.fixture
async def brokers(redis_server: RedisServer) -> AsyncIterator[Start]:
    """``broker, stream = await brokers(node, **settings)``: started on the test's Redis
    (``url=`` for another), closed at teardown."""
    started: list[RedisBroker] = []

    async def start(node: str, url: str | None = None, **settings: Any) -> tuple[RedisBroker, Stream]:
        settings.setdefault("backoff_cap", 0.2)
        broker, stream = RedisBroker(url or redis_server.url, **settings), Stream()
        broker.on_gap(stream.gap)
        await broker.start(node, stream)
        started.append(broker)
        return broker, stream

    yield start
    for broker in started:
        await broker.close()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Any]:
    client = redis_server.admin()
    await client.ping()  # a cluster client reads the slot map and the command table now, not mid-test
    yield client
    await client.aclose()


async def _state_is(broker: RedisBroker, state: LinkState, seconds: float = 10) -> None:
    async def check() -> bool:
        return broker.state is state

    await eventually(check, seconds, f"broker {state.name}")


def offsets(stream: Stream, room: str = "r") -> list[int]:
    return [offset for offset, _ in stream.messages(room)]


async def test_offsets_are_gap_free_and_one_order_on_every_broker_publisher_included(brokers: Start) -> None:
    a, got_a = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B)
    await a.subscribe("r")
    await b.subscribe("r")
    n = 300

    async def publish(broker: RedisBroker, tag: bytes) -> None:
        for i in range(n):
            await broker.publish_stream("r", b"%s%d" % (tag, i))
            if i % 7 == 0:
                await asyncio.sleep(0)  # let the other publisher in: batches interleave

    async with timeout(20):
        await asyncio.gather(publish(a, b"a"), publish(b, b"b"))
        await got_a.has(2 * n)
        await got_b.has(2 * n)
        for broker in (a, b):  # pub/sub may deliver before the publisher reads its replies
            await _published(broker, n)
    assert offsets(got_a) == list(range(1, 2 * n + 1))
    assert got_a.messages() == got_b.messages()  # the same sequence on both
    for tag in (b"a", b"b"):  # each publisher's messages in the order it published them
        assert [d for d in got_a.data() if d.startswith(tag)] == [b"%s%d" % (tag, i) for i in range(n)]
    assert got_a.gaps() == got_b.gaps() == []
    assert (a.published, b.published, a.dropped, b.dropped, a.repaired, b.repaired) == (n, n, 0, 0, 0, 0)


async def test_position_of_a_room_never_published_to_is_one_epoch_for_every_process(brokers: Start, admin: Any) -> None:
    a, _ = await brokers(NODE_A)
    b, _ = await brokers(NODE_B)
    async with timeout(10):
        first, second = await asyncio.gather(a.position("fresh"), b.position("fresh"))
        assert first == second and first[0] is not None and first[1] == 0
        # Every key of a room shares one cluster hash tag.
        await a.put_member("fresh", "m1", b"{}")
        await a.publish_stream("fresh", b"x")

        async def published() -> bool:
            return a.published == 1

        await eventually(published, 5, "the publication reaches Redis")
        keys = sorted(k.decode() for k in await admin.keys("*"))
        assert keys == [f"tether:{{r:fresh}}:{name}" for name in ("meta", "nodes", f"presence:{NODE_A}", f"seq:{a._instance}", "stream")]
        assert await b.position("fresh") == (first[0], 1)
        assert 0 < await admin.pttl("tether:{r:fresh}:meta") <= a.meta_ttl * 1000
        await admin.flushall()  # history lost: a new epoch, agreed by both
        again = await asyncio.gather(a.position("fresh"), b.position("fresh"))
        assert again[0] == again[1] and again[0][0] != first[0] and again[0][1] == 0


async def _published(broker: Any, n: int) -> None:
    """Wait until ``broker`` has placed ``n`` stream messages (the memory one does at once)."""
    if isinstance(broker, RedisBroker):

        async def check() -> bool:
            return broker.published >= n

        await eventually(check, 10, f"{n} publications reach Redis")


async def _history_scenario(broker: Any) -> list[Any]:
    """The same calls on any streams broker; what it answered (epochs masked)."""
    answers: list[Any] = []
    epoch: dict[str, str | None] = {}

    def masked(result: tuple[list[tuple[int, bytes]], Gap | None], room: str) -> Any:
        items, gap = result
        if gap is not None:
            assert gap.epoch == epoch[room]
            gap = Gap(gap.first, gap.last, gap.reason, "E")
        return items, gap

    broker.configure("count", History(5, 60))
    broker.configure("none", History(0, 60))
    for room, n in (("count", 12), ("none", 3), ("plain", 4)):
        for i in range(n):
            await broker.publish_stream(room, b"%s-%d" % (room.encode(), i + 1))
    await _published(broker, 19)
    for room in ("count", "none", "plain"):
        epoch[room] = (await broker.position(room))[0]
    calls: list[tuple[str, int, str | None, int]] = [
        ("count", 0, epoch["count"], 100),  # the count bound dropped 1..7
        ("count", 9, epoch["count"], 100),  # all there
        ("count", 12, epoch["count"], 100),  # nothing missed
        ("count", 0, epoch["count"], 3),  # more missing than the limit
        ("count", 3, "not-the-epoch", 100),  # another epoch: nothing, a gap to the head
        ("count", 3, None, 100),  # a client that never learned the epoch
        ("none", 0, epoch["none"], 100),  # no history: any miss is a gap
        ("none", 3, epoch["none"], 100),
        ("plain", 1, epoch["plain"], 100),  # the default bounds keep everything here
        ("never", 0, None, 100),  # a room never published to
    ]
    for room, after, ep, limit in calls:
        if room == "never":
            epoch[room] = (await broker.position(room))[0]
        answers.append(masked(await broker.history(room, after, ep, limit), room))
    answers.append([(await broker.position(room))[1] for room in ("count", "none", "plain", "never")])
    return answers


async def test_history_answers_as_the_memory_broker_does(brokers: Start) -> None:
    redis_broker, _ = await brokers(NODE_A)
    memory = MemoryBroker(MemoryBus())
    await memory.start(NODE_B, Stream())
    try:
        async with timeout(20):
            from_redis = await _history_scenario(redis_broker)
            from_memory = await _history_scenario(memory)
    finally:
        await memory.close()
    assert from_redis == from_memory
    # and what that is, spelled out:
    assert from_redis[0] == ([(o, b"count-%d" % o) for o in range(8, 13)], Gap(1, 7, "trimmed", "E"))
    assert from_redis[1] == ([(o, b"count-%d" % o) for o in range(10, 13)], None)
    assert from_redis[2] == ([], None)
    assert from_redis[3] == ([], Gap(1, 12, "too_many", "E"))
    # another epoch: the current one's history from its start, after an epoch gap
    assert from_redis[4] == from_redis[5] == ([(o, b"count-%d" % o) for o in range(8, 13)], Gap(0, 7, "epoch", "E"))
    assert from_redis[6] == ([], Gap(1, 3, "trimmed", "E"))
    assert from_redis[7] == ([], None)
    assert from_redis[8] == ([(o, b"plain-%d" % o) for o in range(2, 5)], None)
    assert from_redis[9] == ([], Gap(0, 0, "epoch", "E"))
    assert from_redis[10] == [12, 3, 4, 0]


async def test_history_older_than_max_age_is_an_expired_gap_as_in_memory(brokers: Start) -> None:
    redis_broker, _ = await brokers(NODE_A)
    memory = MemoryBroker(MemoryBus())
    await memory.start(NODE_B, Stream())
    age = 0.4
    try:
        async with timeout(20):
            for broker in (redis_broker, memory):
                broker.configure("aged", History(100, age))
                for i in range(3):
                    await broker.publish_stream("aged", b"%d" % (i + 1))
            await _published(redis_broker, 3)
            epochs = {b: (await b.position("aged"))[0] for b in (redis_broker, memory)}
            for broker in (redis_broker, memory):
                assert await broker.history("aged", 1, epochs[broker], 100) == ([(2, b"2"), (3, b"3")], None)
            for broker in (redis_broker, memory):

                async def gone(broker: Any = broker) -> bool:
                    return bool((await broker.history("aged", 0, epochs[broker], 100))[1])

                await eventually(gone, age + 5, "history expires")  # time itself is the condition
                assert await broker.history("aged", 0, epochs[broker], 100) == ([], Gap(1, 3, "expired", epochs[broker]))
                await broker.publish_stream("aged", b"4")  # an idle room's stream expired as a whole
            await _published(redis_broker, 4)
            for broker in (redis_broker, memory):
                assert await broker.history("aged", 1, epochs[broker], 100) == ([(4, b"4")], Gap(2, 3, "expired", epochs[broker]))
    finally:
        await memory.close()


async def test_an_old_message_in_a_live_stream_is_expired_while_a_newer_one_is_kept(brokers: Start) -> None:
    """The stream key lives on (a newer message renewed it); its oldest entry has passed
    max_age but was not trimmed yet: reading must not return it."""
    redis_broker, _ = await brokers(NODE_A)
    memory = MemoryBroker(MemoryBus())
    await memory.start(NODE_B, Stream())
    age = 2.0
    both = (redis_broker, memory)
    try:
        async with timeout(20):
            for broker in both:
                broker.configure("mixed", History(100, age))
                await broker.publish_stream("mixed", b"old")
            await _published(redis_broker, 1)
            await asyncio.sleep(age / 2)  # the age gap between the two messages is the point
            for broker in both:
                await broker.publish_stream("mixed", b"new")
            await _published(redis_broker, 2)
            epochs = {b: (await b.position("mixed"))[0] for b in both}

            async def old_expired() -> bool:
                return bool((await redis_broker.history("mixed", 0, epochs[redis_broker], 100))[1])

            await eventually(old_expired, age + 5, "the old message expires")
            answers = [await b.history("mixed", 0, epochs[b], 100) for b in both]
    finally:
        await memory.close()
    for broker, answer in zip(both, answers, strict=True):
        assert answer == ([(2, b"new")], Gap(1, 1, "expired", epochs[broker]))


async def test_flushall_is_a_new_epoch_for_resumes_and_for_live_subscribers(brokers: Start, admin: Any) -> None:
    a, got_a = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B)
    async with timeout(20):
        await a.subscribe("r")
        await b.subscribe("r")
        for i in range(3):
            await a.publish_stream("r", b"old%d" % i)
        await got_b.has(3)
        old, head = await b.position("r")
        assert head == 3
        await admin.flushall()
        assert await a.history("r", 1, old, 100) == ([], Gap(0, 0, "epoch", (await a.position("r"))[0]))
        new = (await a.position("r"))[0]
        await b.publish_stream("r", b"new1")
        await b.publish_stream("r", b"new2")
        await got_a.has(5)
        await got_b.has(5)
    for got in (got_a, got_b):
        assert got.messages() == [(1, b"old0"), (2, b"old1"), (3, b"old2"), (1, b"new1"), (2, b"new2")]
        assert got.gaps() == [Gap(0, 0, "epoch", new)]
        assert got.events[3] == ("r", Gap(0, 0, "epoch", new))  # between the old and the new


async def test_a_live_publication_lost_on_the_way_is_repaired_from_history(brokers: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    a, got_a = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B)
    await a.subscribe("r")
    await b.subscribe("r")
    _lose(monkeypatch, b, {3, 7, 8})  # B's pub/sub never hands these over
    async with timeout(20):
        for i in range(10):
            await a.publish_stream("r", b"m%d" % (i + 1))
        await got_b.has(10)
        await got_a.has(10)
    expected = [(i, b"m%d" % i) for i in range(1, 11)]
    assert got_b.messages() == got_a.messages() == expected
    # 3, 7 and 8 came from history (pub/sub never gave them); a repair reads up to the head,
    # so it may deliver some that were still on their way too (their live copies are dropped).
    assert got_b.gaps() == [] and 3 <= b.repaired <= 8 and a.repaired == 0


async def test_a_live_publication_lost_without_history_is_a_gap_in_its_place(brokers: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = await brokers(NODE_A, history=History(0, 60))
    b, got_b = await brokers(NODE_B, history=History(0, 60))
    await b.subscribe("r")
    _lose(monkeypatch, b, {2})
    async with timeout(20):
        for i in range(4):
            await a.publish_stream("r", b"m%d" % (i + 1))
        await got_b.has(3)
    epoch = (await b.position("r"))[0]
    assert got_b.events == [("r", 1, b"m1"), ("r", Gap(2, 2, "trimmed", epoch)), ("r", 3, b"m3"), ("r", 4, b"m4")]


def _lose(monkeypatch: pytest.MonkeyPatch, broker: RedisBroker, lost: set[int]) -> None:
    """Make ``broker``'s pub/sub reader drop the stream messages with these offsets."""
    real = broker._on_publication

    def lossy(channel: bytes, data: bytes) -> None:
        if data[:1] == b"\xff" and int(data[1 : data.index(b":")]) in lost:
            return
        real(channel, data)

    monkeypatch.setattr(broker, "_on_publication", lossy)


async def test_messages_missed_while_the_pubsub_connection_was_down_are_repaired_after_resubscribing(
    redis_server: RedisServer, brokers: Start, admin: Any
) -> None:
    """B's connections are killed and it may not subscribe again (ACL: SUBSCRIBE, and SSUBSCRIBE on a cluster) while A publishes; once
    allowed, B resubscribes and delivers what it missed from history, with no new traffic."""
    await admin.acl_setuser("b", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all"])
    a, got_a = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B, url=redis_server.url_as("b", "pw"))
    async with timeout(30):
        await a.subscribe("r")
        await b.subscribe("r")
        await a.publish_stream("r", b"before")
        await got_b.has(1)
        await admin.acl_setuser("b", enabled=True, keys=["*"], channels=["*"], commands=["+@all", "-subscribe", "-ssubscribe"])
        await admin.client_kill_filter(user="b")
        await _state_is(b, LinkState.DOWN)
        for i in range(5):
            await a.publish_stream("r", b"missed%d" % i)
        await got_a.has(6)
        assert len(got_b.messages()) == 1
        await admin.acl_setuser("b", enabled=True, keys=["*"], channels=["*"], commands=["+@all"])
        await got_b.has(6)
    assert got_b.messages() == got_a.messages() == [(1, b"before"), *((i + 2, b"missed%d" % i) for i in range(5))]
    assert b.repaired == 5 and got_b.gaps() == []


async def test_stream_messages_wait_in_the_outbox_while_redis_is_down_then_reach_local_members_too(
    redis_server: RedisServer, brokers: Start
) -> None:
    a, got_a = await brokers(NODE_A, max_outbox=3)
    async with timeout(30):
        await a.subscribe("r")
        await a.publish_stream("r", b"first")
        await got_a.has(1)
        redis_server.stop()
        await _state_is(a, LinkState.DOWN)
        for i in range(5):
            await a.publish_stream("r", b"queued%d" % i)  # the outbox keeps the last 3
        assert got_a.messages() == [(1, b"first")]  # no offset yet: not delivered, even here
        assert a.dropped == 2
        redis_server.start()  # empty: a new epoch
        await got_a.has(4)
    epoch = (await a.position("r"))[0]
    assert got_a.events == [
        ("r", 1, b"first"),
        ("r", Gap(0, 0, "epoch", epoch)),
        ("r", 1, b"queued2"),
        ("r", 2, b"queued3"),
        ("r", 3, b"queued4"),
    ]
    assert a.dropped == 2


async def test_history_while_redis_is_away_is_a_lost_gap_or_delivered_once_it_is_back(
    redis_server: RedisServer, brokers: Start, admin: Any
) -> None:
    """A resume needs history. B cannot reach Redis (its ACL user is disabled; Redis keeps its
    data) and answers from what it delivered: a room it delivered past the client's offset is
    a ``lost`` gap; a room it has not positioned yet starts at the client's offset, and what
    follows is delivered once Redis is reachable again."""
    await admin.acl_setuser("b", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all"])
    a, _ = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B, url=redis_server.url_as("b", "pw"))
    async with timeout(30):
        await b.subscribe("r")
        for i in range(4):
            await a.publish_stream("r", b"m%d" % (i + 1))
        for i in range(3):
            await a.publish_stream("third", b"t%d" % (i + 1))
        await got_b.has(4)
        await _published(a, 7)
        epoch, third = (await b.position("r"))[0], (await b.position("third"))[0]
        await admin.acl_setuser("b", enabled=False)
        await admin.client_kill_filter(user="b")
        await _state_is(b, LinkState.DOWN)
        assert await b.history("r", 1, epoch, 100) == ([], Gap(2, 4, "lost", epoch))
        assert await b.history("r", 4, epoch, 100) == ([], None)
        assert await b.position("r") == (epoch, 4)  # what it delivered last
        await b.subscribe("third")  # not positioned: Redis is out of reach
        assert await b.position("third") == (None, 0)
        assert await b.history("third", 1, third, 100) == ([], None)  # starts at the client's offset
        await a.publish_stream("third", b"t4")
        await _published(a, 8)
        await admin.acl_setuser("b", enabled=True)
        await got_b.has(3, "third")
    # position() told someone (a member joining) the position was unknown: positioned by the
    # resume's (epoch, offset), the room tells its members the epoch with an epoch gap first.
    assert got_b.messages("third") == [(2, b"t2"), (3, b"t3"), (4, b"t4")]
    assert got_b.gaps("third") == [Gap(0, 1, "epoch", third)]


async def test_a_stream_batch_in_a_failed_pipeline_is_sent_again_a_raw_one_is_dropped(
    redis_server: RedisServer, brokers: Start, admin: Any
) -> None:
    a, got_a = await brokers(NODE_A, command_timeout=30)
    async with timeout(30):
        await a.subscribe("r")
        await admin.client_pause(30_000)  # Redis holds every command: the pipeline cannot finish
        for i in range(3):
            await a.publish_stream("r", b"s%d" % i)
        await a.publish("r", b"raw")

        async def taken() -> bool:
            return not a._outbox  # the publisher took the batch and waits for its replies

        await eventually(taken, 5, "the publisher takes the batch")
        redis_server.stop()  # the pipeline fails with the batch in it
        await _state_is(a, LinkState.DOWN)
        redis_server.start()
        await got_a.has(3)
    assert got_a.messages() == [(1, b"s0"), (2, b"s1"), (3, b"s2")]
    assert (a.resent, a.dropped, a.published) == (3, 1, 3)


async def test_publications_that_ran_are_not_sent_again_when_their_replies_were_lost_and_redis_emptied(
    brokers: Start, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline whose scripts ran (their messages came back on pub/sub and were delivered)
    fails before its replies arrive, and Redis comes back empty: the script's memory of what
    ran is gone with the rest, so only the publisher can tell. It saw them come back: it does
    not send them again (before: each was applied twice, delivered again in the new epoch)."""
    a, got_a = await brokers(NODE_A)
    real = a._send
    failed: list[int] = []

    async def send(batch: list[tuple[str, bytes, int]]) -> list[Any]:
        results = await real(batch)
        if not failed:
            failed.append(len(batch))
            await got_a.has(3)  # they ran and came back
            await admin.flushall()  # ... and Redis lost them
            raise redis.exceptions.ConnectionError("the replies were lost")
        return results

    monkeypatch.setattr(a, "_send", send)
    async with timeout(30):
        await a.subscribe("r")
        for i in range(3):
            await a.publish_stream("r", b"s%d" % i)
        async def back() -> bool:
            return bool(failed) and a.state is LinkState.UP

        await eventually(back, 10, "the broker is back")
        await a.publish_stream("r", b"after")
        await got_a.has(4)
    assert [data for _, data in got_a.messages()] == [b"s0", b"s1", b"s2", b"after"]
    assert failed == [3] and a.resent == 0


async def test_the_publish_script_applies_a_resent_publication_once(brokers: Start, admin: Any) -> None:
    """A batch whose replies were lost is sent again whole: what ran already is not run twice."""
    a, got_a = await brokers(NODE_A)
    await a.subscribe("r")
    script = a._scripts["publish"]
    keys = [*a._stream_keys("r"), a._key("r", "seq:test")]

    async def publish(data: bytes, seq: int, again: bool = False) -> int:
        args = (a._channel("r"), data, 100, 60_000, 60_000, "e0", seq, 60_000, "1" if again else "0")
        return int(await admin.evalsha(script.sha, 3, *keys, *args))

    async with timeout(10):
        assert [await publish(b"one", 1), await publish(b"two", 2)] == [1, 2]
        assert [await publish(b"one", 1, True), await publish(b"two", 2, True)] == [0, 0]  # ran already
        assert await publish(b"three", 3, True) == 3  # sent again, but had not run

        await got_a.has(3)
        assert await admin.xlen("tether:{r:r}:stream") == 3
    assert got_a.messages() == [(1, b"one"), (2, b"two"), (3, b"three")]


async def test_redis_restarted_mid_traffic_every_message_is_delivered_or_in_a_gap(redis_server: RedisServer, brokers: Start) -> None:
    a, got_a = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B)
    await a.subscribe("r")
    await b.subscribe("r")
    published: list[bytes] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        i = 0
        while not stop.is_set():
            published.append(b"%05d" % i)
            await a.publish_stream("r", published[-1])
            i += 1
            await asyncio.sleep(0.002)  # a steady trickle, not a wait for a condition

    async def count(n: int) -> None:
        async def check() -> bool:
            return len(published) >= n

        await eventually(check, 10, f"{n} published")

    task = asyncio.ensure_future(traffic())
    try:
        async with timeout(60):
            await got_b.has(100)
            redis_server.stop()
            await _state_is(a, LinkState.DOWN)
            stopped_at = len(published)
            await count(stopped_at + 100)  # into the outbox
            redis_server.start()
            await _state_is(a, LinkState.UP)
            await _state_is(b, LinkState.UP)
            await count(len(published) + 100)
            stop.set()
            await task
            for got in (got_a, got_b):  # the last one published reaches both

                async def last_in(got: Stream = got) -> bool:
                    return published[-1] in got.data()

                await eventually(last_in, 15, "the last message delivered")
    finally:
        stop.set()
        await task
    news = []
    for got in (got_a, got_b):
        before, after = _walk(got.events)
        assert before == published[: len(before)]  # the old epoch: a prefix, in order
        assert set(published[stopped_at:]) <= set(after)  # queued while down: none lost
        assert after == sorted(after)  # the new epoch in publishing order (resent ones first)
        lost = set(published[: stopped_at]) - set(before) - set(after)
        assert all(message > before[-1] for message in lost)  # only the tail the epoch gap covers
        news.append(after)
    assert news[0] == news[1]
    print(f"\n{len(published)} published, {stopped_at} before the restart; A resent {a.resent}, B repaired {b.repaired}")


def _walk(events: list[Any]) -> tuple[list[bytes], list[bytes]]:
    """Check a stream with one restart: offsets follow each other, a gap explains every jump,
    one epoch gap separates the epochs. Returns the messages before it and after it."""
    epochs: list[list[bytes]] = [[]]
    last: int | None = None
    for event in events:
        if len(event) == 2:
            gap = event[1]
            assert last is not None and gap.first == (0 if gap.reason == "epoch" else last + 1), event
            if gap.reason == "epoch":
                epochs.append([])
            last = gap.last
        else:
            _, offset, data = event
            assert last is None or offset == last + 1, (last, event)
            last = offset
            epochs[-1].append(data)
    assert len(epochs) == 2, f"{len(epochs) - 1} epoch gaps"
    return epochs[0], epochs[1]


async def _lose_last_writes(admin: Any, room: str, keep: int) -> None:
    """What a failover to a replica that had not received the last writes leaves (Redis
    replication is asynchronous): the room's head back at ``keep``, the entries after it gone."""
    await admin.hset(f"tether:{{r:{room}}}:meta", "top", keep)
    for entry_id, _ in await admin.xrange(f"tether:{{r:{room}}}:stream"):
        if int(entry_id.split(b"-")[0]) > keep:
            await admin.xdel(f"tether:{{r:{room}}}:stream", entry_id)


async def test_a_room_behind_what_was_delivered_starts_a_new_epoch_instead_of_giving_offsets_twice(brokers: Start, admin: Any) -> None:
    """Redis lost a room's last writes. The next publication would get offsets both brokers
    delivered already (and be dropped as a copy); instead the publish script, told what its
    process delivered last, starts a new epoch: an ``epoch`` gap, then the message. Lost
    without a publication, a reconnect's repair (its read after the offset delivered last)
    starts the new epoch."""
    a, got_a = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B)
    async with timeout(30):
        await a.subscribe("r")
        await b.subscribe("r")
        for i in range(5):
            await a.publish_stream("r", b"m%d" % i)
        await got_a.has(5)
        await got_b.has(5)
        old = (await a.position("r"))[0]
        await _lose_last_writes(admin, "r", 3)
        await b.publish_stream("r", b"after")
        await got_a.has(6)
        await got_b.has(6)
        new = (await a.position("r"))[0]
        assert new != old
        for got in (got_a, got_b):
            assert got.events[5:] == [("r", Gap(0, 0, "epoch", new)), ("r", 1, b"after")]
        # Lost again, with no publication: the brokers reconnect and their repair notices.
        await _lose_last_writes(admin, "r", 0)
        await admin.client_kill_filter(_type="pubsub")
        newer: list[str] = []

        async def epoch_gaps() -> bool:
            gaps = [g for g in got_a.gaps() + got_b.gaps() if g.epoch != new]
            newer[:] = sorted({g.epoch for g in gaps if g.epoch is not None})
            return len(gaps) == 2

        await eventually(epoch_gaps, 15, "both brokers report the second epoch change")
        await a.publish_stream("r", b"later")
        await got_a.has(7)
        await got_b.has(7)
    assert len(newer) == 1 and newer[0] != new
    for got in (got_a, got_b):
        assert got.events[7:] == [("r", Gap(0, 0, "epoch", newer[0])), ("r", 1, b"later")]


async def test_subscribed_rooms_keep_their_epoch_while_quiet(brokers: Start, admin: Any) -> None:
    a, _ = await brokers(NODE_A, meta_ttl=1.0, heartbeat_interval=0.1, presence_ttl=2.0)
    async with timeout(10):
        await a.subscribe("quiet")
        epoch = (await a.position("quiet"))[0]
        start = time.monotonic()

        async def renewed_past_ttl() -> bool:
            return time.monotonic() - start > 1.5 and await admin.exists("tether:{r:quiet}:meta") == 1

        await eventually(renewed_past_ttl, 5, "the meta outlives its TTL while subscribed")
        assert (await a.position("quiet"))[0] == epoch


async def test_hub_recent_reads_the_rooms_last_broadcasts_from_redis(redis_server: RedisServer) -> None:
    publisher = tether.Hub(RedisBroker(redis_server.url))
    reader = tether.Hub(RedisBroker(redis_server.url))  # another process: nothing of it local
    try:
        async with timeout(10):
            for n in range(5):
                await publisher.broadcast("chat", "said", {"n": n})
            assert isinstance(publisher.broker, RedisBroker)
            await _published(publisher.broker, 5)
            recent = await reader.recent("chat", limit=3)
            assert await reader.recent("empty") == []
    finally:
        await publisher.close()
        await reader.close()
    assert recent == [(3, "said", {"n": 2}), (4, "said", {"n": 3}), (5, "said", {"n": 4})]


# -- through the hub: two servers on their own RedisBrokers, a client behind a cutting proxy ----
def lobby_app() -> tether.App:
    """Every connection joins "lobby"; ``shout`` n broadcasts ``said`` n to it."""
    app = tether.App()

    @app.on_connect
    async def hello(conn: tether.Conn) -> None:
        await conn.join("lobby", {"name": conn.query.get("name", "anon")})

    @app.on("shout")
    async def shout(conn: tether.Conn, n: int) -> None:
        await app.broadcast("lobby", "said", n)

    return app


class Pair:
    """Servers A and B ("two processes": one RedisBroker each, one Redis); clients reach A
    through a proxy that can cut them (tests/chaos_proxy.py)."""

    def __init__(self, redis: RedisServer, servers: list[tether.Server], apps: list[tether.App], proxy: ChaosProxy) -> None:
        self.redis, self.servers, self.apps, self.proxy = redis, servers, apps, proxy

    def client(self, name: str = "anon") -> tether.Client:
        return tether.Client(f"ws://127.0.0.1:{self.proxy.port}/app?name={name}", backoff=Backoff(base=0.01, cap=0.05))

    def broker(self, i: int) -> RedisBroker:
        broker = self.servers[i].hub.broker
        assert isinstance(broker, RedisBroker)
        return broker

    async def from_b(self, *ns: int) -> None:
        """Broadcast ``said`` n from B (no member there: only Redis carries it to A)."""
        for n in ns:
            await self.apps[1].broadcast("lobby", "said", n)

    def set_history(self, **bounds: Any) -> None:
        for server in self.servers:
            server.hub.set_history("lobby", **bounds)

    async def away(self) -> None:
        """Cut A's clients and keep them out until :meth:`back`; A has noticed once it left
        the room (the session stays parked, listed)."""
        self.proxy.block()
        self.proxy.cut_all()

        async def left() -> bool:
            return not self.servers[0].hub.local("lobby")

        await eventually(left, 5, "A notices the cut")

    def back(self) -> None:
        self.proxy.unblock()


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[Pair]:
    apps = [lobby_app(), lobby_app()]
    servers = [await tether.serve({"/app": app}, "127.0.0.1", 0, broker=RedisBroker(redis_server.url, backoff_cap=0.2)) for app in apps]
    proxy = await ChaosProxy([servers[0].port]).start()
    yield Pair(redis_server, servers, apps, proxy)
    await proxy.aclose()
    for server in servers:
        await within(server.close(), 15)


class Seen:
    """What a ``tether.Client`` handed its app, in order: ``("said", n)`` and ``("gap", room,
    first, last, reason)``."""

    def __init__(self, client: tether.Client) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.reconnects = 0
        client.on("said", lambda n: self.log.append(("said", n)))
        client.add_listener("gap", lambda *args: self.log.append(("gap", *args)))
        client.add_listener("reconnected", self._reconnected)

    def _reconnected(self) -> None:
        self.reconnects += 1

    @property
    def said(self) -> list[int]:
        return [entry[1] for entry in self.log if entry[0] == "said"]

    @property
    def gaps(self) -> list[tuple[Any, ...]]:
        return [entry[1:] for entry in self.log if entry[0] == "gap"]

    async def until(self, condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
        async def check() -> bool:
            return condition()

        await eventually(check, seconds, f"{what} (seen {self.log})")


async def _open(pair: Pair, client: tether.Client) -> Seen:
    seen = Seen(client)
    await client.wait_open()
    await eventually(lambda: _local(pair, 1), 5, "the client is in the lobby on A")
    await _published(pair.broker(0), 1)  # its presence join event is in the stream: offset 1
    return seen


async def _local(pair: Pair, n: int) -> bool:
    return len(pair.servers[0].hub.local("lobby")) == n


async def test_resume_replays_what_another_process_broadcast_while_cut_in_order(pair: Pair) -> None:
    async with timeout(20), pair.client() as client:
        seen = await _open(pair, client)
        await pair.from_b(0, 1, 2)
        await seen.until(lambda: seen.said == [0, 1, 2], "live broadcasts from B")
        await pair.away()
        await pair.from_b(*range(3, 10))  # into Redis's history; nobody on A listens
        pair.back()
        await seen.until(lambda: len(seen.said) == 10, "the replay")
        await pair.from_b(10)
        await seen.until(lambda: len(seen.said) == 11, "live again")
    assert seen.said == list(range(11)) and seen.gaps == [] and seen.reconnects == 1


async def test_resume_after_history_trimmed_is_a_trimmed_gap_then_the_rest(pair: Pair) -> None:
    pair.set_history(max_count=3)
    async with timeout(20), pair.client() as client:
        seen = await _open(pair, client)
        await pair.from_b(0)
        await seen.until(lambda: seen.said == [0], "live")
        await pair.away()
        await pair.from_b(*range(1, 11))
        pair.back()
        await seen.until(lambda: len(seen.said) == 4, "the replay")
    assert seen.said == [0, 8, 9, 10]
    ((room, first, last, reason),) = seen.gaps
    assert room == "lobby" and reason == "trimmed" and last - first == 6  # the offsets of 1..7
    assert seen.log.index(("gap", room, first, last, reason)) == 1  # before what follows it


async def test_resume_after_history_expired_is_an_expired_gap(pair: Pair) -> None:
    pair.set_history(max_count=100, max_age=0.3)
    async with timeout(20), pair.client() as client:
        seen = await _open(pair, client)
        await pair.away()
        broker = pair.broker(1)
        await pair.from_b(1)
        await _published(broker, 1)
        epoch, head = await broker.position("lobby")  # 1: this client's presence join, 2: said 1

        async def expired() -> bool:  # time passing is the condition under test
            _, gap = await broker.history("lobby", head - 1, epoch, 100)
            return gap is not None and gap.reason == "expired"

        await eventually(expired, 5, "the message expires")
        pair.back()
        await seen.until(lambda: bool(seen.gaps), "the gap")
    # the client had offset 0 (its own join event was not for it): everything after is gone
    assert seen.said == [] and seen.gaps == [("lobby", 1, head, "expired")]


async def test_resume_after_redis_flushed_is_an_epoch_gap_then_the_new_epoch(pair: Pair) -> None:
    admin = pair.redis.admin()
    try:
        async with timeout(20), pair.client() as client:
            seen = await _open(pair, client)
            await pair.from_b(1, 2)
            await seen.until(lambda: seen.said == [1, 2], "live")
            await pair.away()
            await admin.flushall()  # the room's history is lost: a new epoch
            await pair.from_b(3, 4)
            pair.back()
            await seen.until(lambda: len(seen.said) == 4, "the new epoch replayed")
            await pair.from_b(5)
            await seen.until(lambda: seen.said[-1:] == [5], "live in the new epoch")
    finally:
        await admin.aclose()
    assert seen.log == [("said", 1), ("said", 2), ("gap", "lobby", 0, 0, "epoch"), ("said", 3), ("said", 4), ("said", 5)]


async def test_resume_of_a_room_without_history_is_a_gap_for_any_miss(pair: Pair) -> None:
    pair.set_history(max_count=0)
    async with timeout(20), pair.client() as client:
        seen = await _open(pair, client)
        await pair.from_b(1)
        await seen.until(lambda: seen.said == [1], "live")
        _, head = await pair.broker(1).position("lobby")
        await pair.away()
        await pair.from_b(2, 3)
        pair.back()
        await seen.until(lambda: bool(seen.gaps), "the gap")
        await pair.from_b(4)
        await seen.until(lambda: seen.said[-1:] == [4], "live again")
    assert seen.log == [("said", 1), ("gap", "lobby", head + 1, head + 2, "trimmed"), ("said", 4)]


@pytest.mark.parametrize("kept", [True, False], ids=["history", "no-history"])
async def test_a_message_lost_between_processes_is_repaired_or_a_live_gap_event(pair: Pair, monkeypatch: pytest.MonkeyPatch, kept: bool) -> None:
    if not kept:
        pair.set_history(max_count=0)
    async with timeout(20), pair.client() as client:
        seen = await _open(pair, client)
        _, head = await pair.broker(0).position("lobby")
        _lose(monkeypatch, pair.broker(0), {head + 2})  # A's pub/sub loses B's second message
        await pair.from_b(1, 2, 3)
        await seen.until(lambda: seen.said[-1:] == [3], "the third")
    if kept:
        assert seen.log == [("said", 1), ("said", 2), ("said", 3)] and pair.broker(0).repaired >= 1
    else:  # in its place, in order with the room's messages
        assert seen.log == [("said", 1), ("gap", "lobby", head + 2, head + 2, "trimmed"), ("said", 3)]


async def test_redis_restarted_under_a_connected_client_is_an_epoch_gap_and_nothing_lost(pair: Pair) -> None:
    async with timeout(30), pair.client() as client:
        seen = await _open(pair, client)
        await pair.from_b(0, 1)
        await seen.until(lambda: seen.said == [0, 1], "live")
        pair.redis.stop()
        await _state_is(pair.broker(1), LinkState.DOWN)
        await pair.from_b(2, 3)  # waits in B's outbox: it has no offset yet
        pair.redis.start()  # empty
        await pair.from_b(4)
        await seen.until(lambda: seen.said[-1:] == [4], "everything after the restart")
    assert seen.log == [("said", 0), ("said", 1), ("gap", "lobby", 0, 0, "epoch"), ("said", 2), ("said", 3), ("said", 4)]


async def test_a_member_that_joined_while_redis_was_down_learns_the_epoch_and_resumes_without_duplicates(pair: Pair) -> None:
    """Joined while Redis was away, the client is told the room's position is unknown (no
    epoch). Room messages do not carry their epoch: without being told it when the room is
    positioned, the client resumed as one of an older epoch and got the whole stream again
    (found by the fault soak: about 50-130 deliveries twice around its Redis restarts)."""
    resumed: list[tuple[bool, int]] = []
    pair.redis.stop()
    await _state_is(pair.broker(0), LinkState.DOWN)
    async with timeout(30), pair.client() as client:
        client.add_listener("resumed", lambda *args: resumed.append(args))
        seen = Seen(client)
        await client.wait_open()
        await eventually(lambda: _local(pair, 1), 5, "the client is in the lobby on A")
        pair.redis.start()  # empty
        await _state_is(pair.broker(0), LinkState.UP)
        await _state_is(pair.broker(1), LinkState.UP)
        await pair.from_b(0, 1, 2)
        await seen.until(lambda: seen.said == [0, 1, 2], "live")
        pair.proxy.cut_all()
        await seen.until(lambda: len(resumed) == 1, "the resume")
        await pair.from_b(3)
        await seen.until(lambda: seen.said[-1:] == [3], "live after the resume")
    assert seen.said == [0, 1, 2, 3] and resumed == [(True, 0)]
    assert [gap[3] for gap in seen.gaps] == ["epoch"]  # told once, before the first message


async def test_a_session_outlives_a_redis_restart_that_emptied_the_session_store(pair: Pair) -> None:
    """The process holding a session saves it again after Redis came back empty (its copy is
    the only one left): the client's next resume is resumed, not a new session. (Found by the
    fault soak: the save wanted the kept version to be the previous one and forgot the session.)"""
    resumed: list[tuple[bool, int]] = []
    async with timeout(30), pair.client() as client:
        client.add_listener("resumed", lambda *args: resumed.append(args))
        seen = await _open(pair, client)
        pair.redis.stop()
        await _state_is(pair.broker(0), LinkState.DOWN)
        pair.redis.start()  # empty
        await _state_is(pair.broker(0), LinkState.UP)
        for cut in (1, 2):
            pair.proxy.cut_all()
            await seen.until(lambda: len(resumed) == cut, f"resume {cut}")
        await pair.from_b(0)
        await seen.until(lambda: seen.said == [0], "live after the resumes")
    assert resumed == [(True, 0), (True, 0)]


# -- two server processes ------------------------------------------------------------------------
async def test_two_processes_broadcasting_at_once_give_every_member_one_gap_free_sequence(redis_server: RedisServer, app_processes: Any) -> None:
    a, b = app_processes(redis_server.url), app_processes(redis_server.url)
    n = 60
    async with timeout(60):
        members = await open_peers(a.url, 2, "a", room="all", quiet="1") + await open_peers(b.url, 2, "b", room="all", quiet="1")
        sender_a, sender_b = await Peer.open(a.url, name="sa"), await Peer.open(b.url, name="sb")

        async def say(peer: Peer, tag: str) -> None:
            for i in range(n):
                await peer.request("say", {"room": "all", "text": f"{tag}{i}"})

        await asyncio.gather(say(sender_a, "a"), say(sender_b, "b"))
        got = []
        for member in members:
            got.append([(m["off"], m["data"]["text"]) for m in [await member.event("said") for _ in range(2 * n)]])
    first = got[0][0][0]
    assert [off for off, _ in got[0]] == list(range(first, first + 2 * n))  # gap-free
    assert all(sequence == got[0] for sequence in got)  # the same order everywhere
    for tag in "ab":
        assert [t for _, t in got[0] if t.startswith(tag)] == [f"{tag}{i}" for i in range(n)]
