"""The Redis broker on a Redis Cluster: a local one of 3 masters with a replica each
(tests/redis_fixture.py's ``redis_cluster``: 6 real redis-server processes on free ports).

The suites of tests/test_redis.py and tests/test_redis_streams.py run on it too (their
``redis_server`` is either); here: what only a cluster has. Every key of a room, and the two
keys of a session, in one slot; a room's traffic on its shard only (SSUBSCRIBE/SPUBLISH, no
PUBLISH); sessions and release requests between processes on node channels; and failovers
(slow): a master SIGKILLed and its replica promoted, a manual CLUSTER FAILOVER, with what
happens to rooms (the brokers reconnect, resubscribe on the new master, repair or report
gaps) and to presence (rewritten after the reconnect).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.crc import key_slot

import tether
from tether.proto.resume import Gap
from tether.redis_broker import LinkState, RedisBroker
from tether.rooms.hub import is_shared, make_broker
from tether.rooms.redis import cluster_settings
from tests.conftest import timeout
from tests.redis_fixture import (  # noqa: F401  (fixtures)
    AppProcess,
    Peer,
    RedisClusterServer,
    app_processes,
    close_peers,
    eventually,
    free_port,
    open_peers,
    redis_cluster,
    redis_cluster_session,
    redis_server,
)

pytestmark = pytest.mark.redis

NODE_A, NODE_B = "aaaaaaaaaaaa", "bbbbbbbbbbbb"


class Stream:
    """What a broker hands its hub, in order: ``(room, offset, data)`` and ``(room, Gap)``."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, room: str, data: bytes, offset: int | None = None) -> None:
        self.events.append((room, offset, data))

    def gap(self, room: str, gap: Gap) -> None:
        self.events.append((room, gap))

    def of(self, room: str) -> list[Any]:
        return [event for event in self.events if event[0] == room]

    def data(self, room: str) -> list[bytes]:
        return [event[2] for event in self.of(room) if len(event) == 3]


Start = Callable[..., Awaitable[tuple[RedisBroker, Stream]]]


@pytest.fixture
async def brokers(redis_cluster: RedisClusterServer) -> AsyncIterator[Start]:
    started: list[RedisBroker] = []

    async def start(node: str, **settings: Any) -> tuple[RedisBroker, Stream]:
        settings.setdefault("backoff_cap", 0.2)
        broker, stream = RedisBroker(redis_cluster.url, **settings), Stream()
        broker.on_gap(stream.gap)
        await broker.start(node, stream)
        assert broker.state is LinkState.UP
        started.append(broker)
        return broker, stream

    yield start
    for broker in started:
        await broker.close()


@pytest.fixture
async def admin(redis_cluster: RedisClusterServer) -> AsyncIterator[Any]:
    client = redis_cluster.admin()
    yield client
    await client.aclose()


def rooms_on_every_shard(cluster: RedisClusterServer, per_shard: int = 1) -> dict[str, list[str]]:
    """Room names whose slots are on each master (by port): ``{port: [room, ...]}``."""
    found: dict[str, list[str]] = {}
    i = 0
    while len(found) < cluster.masters or any(len(rooms) < per_shard for rooms in found.values()):
        room = f"room{i}"
        port = str(cluster.master_of(f"{{r:{room}}}").port)
        if len(found.setdefault(port, [])) < per_shard:
            found[port].append(room)
        i += 1
        assert i < 10_000
    return found


async def _state_is(broker: RedisBroker, state: LinkState, seconds: float = 20) -> None:
    async def check() -> bool:
        return broker.state is state

    await eventually(check, seconds, f"broker {state.name}")


# -- selection ----------------------------------------------------------------------------------
def test_cluster_url_selects_a_cluster_broker_and_parses_its_seeds() -> None:
    assert is_shared("redis+cluster://127.0.0.1:7000") and is_shared("rediss+cluster://h:1")
    broker = make_broker("redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7001")
    assert isinstance(broker, RedisBroker) and broker.cluster
    assert "secret" not in repr(broker) and "10.0.0.2:7001" in repr(broker)
    assert not RedisBroker("redis://127.0.0.1:6379/0").cluster
    assert RedisBroker("redis://127.0.0.1:7000", cluster=True).cluster  # the option
    nodes, settings = cluster_settings("rediss+cluster://user:p%40ss@a:1,b:2/0")
    assert nodes == [("a", 1), ("b", 2)]
    assert settings == {"ssl": True, "username": "user", "password": "p@ss"}
    assert cluster_settings("redis+cluster://a")[0] == [("a", 6379)]
    with pytest.raises(ValueError):
        RedisBroker("redis+cluster://a:1", cluster=False)
    with pytest.raises(ValueError, match="database 0"):
        RedisBroker("redis+cluster://a:1/3")
    with pytest.raises(ValueError, match="host:port"):
        RedisBroker("redis+cluster://a:x")


async def test_a_cluster_out_of_reach_at_start_is_retried_and_the_server_serves_its_own() -> None:
    broker = RedisBroker(f"redis+cluster://127.0.0.1:{free_port()}", connect_timeout=0.5, backoff_cap=0.2)
    async with tether.serve({"/socket": _joiner}, "127.0.0.1", 0, broker=broker) as server:
        assert broker.state is LinkState.DOWN
        async with timeout(5), tether.connect(f"ws://127.0.0.1:{server.port}/socket") as conn:
            assert await conn.receive() == "joined"
            assert await server.hub.broadcast("r", "t", 1) == 1
            assert [m.meta for m in await server.hub.presence("r")] == ["me"]


async def _joiner(conn: tether.Conn) -> Any:
    await conn.join("r", "me")
    await conn.send("joined")
    await conn.wait_closed()


# -- slots and shards -------------------------------------------------------------------------
async def test_every_key_of_a_room_and_of_a_session_is_in_one_slot(brokers: Start, admin: Any, redis_cluster: RedisClusterServer) -> None:
    """Each room's keys (meta, stream, seq, presence hashes, node set) and its channel share
    one slot, on every shard; a session's state and version keys share one too."""
    a, got_a = await brokers(NODE_A)
    b, _ = await brokers(NODE_B)
    shards = rooms_on_every_shard(redis_cluster, per_shard=2)
    rooms = [room for names in shards.values() for room in names]
    async with timeout(20):
        for room in rooms:
            await a.subscribe(room)
            await a.put_member(room, f"{room}.a", b"{}")
            await b.put_member(room, f"{room}.b", b"{}")
            await a.publish_stream(room, b"hello " + room.encode())
        assert await a.save_session("tok1", b"state", 30, 1)

        async def delivered() -> bool:
            return all(got_a.data(room) for room in rooms)

        await eventually(delivered, 10, "every room's publication delivered")
        keys = [key.decode() for key in await admin.keys("tether:*")]
    by_room: dict[str, set[int]] = {}
    for key in keys:
        tag = key[key.index("{") + 1 : key.index("}")]
        by_room.setdefault(tag, set()).add(key_slot(key.encode()))
    for room in rooms:
        kinds = {key.rsplit(":", 1)[-1] if "presence" not in key else "presence" for key in keys if f"{{r:{room}}}" in key}
        assert {"meta", "stream", "nodes", "presence"} <= kinds, (room, kinds)
        assert by_room[f"r:{room}"] == {key_slot(a._channel(room))}, room
        assert a._channel(room) == f"tether:{{r:{room}}}:room".encode()
    assert sorted(key for key in keys if "{s:" in key) == ["tether:{s:tok1}", "tether:{s:tok1}:v"]
    assert len(by_room["s:tok1"]) == 1
    assert len({slot for tag, slots in by_room.items() if tag.startswith("r:") for slot in slots}) == len(rooms)


async def test_room_traffic_stays_on_its_shard(brokers: Start, admin: Any, redis_cluster: RedisClusterServer) -> None:
    """SSUBSCRIBE on the room's master only, SPUBLISH from the publish script and for raw
    messages, never PUBLISH (which a cluster broadcasts to every node)."""
    a, got_a = await brokers(NODE_A)
    b, got_b = await brokers(NODE_B)
    shards = rooms_on_every_shard(redis_cluster)
    async with timeout(20):
        for rooms in shards.values():
            for room in rooms:
                await a.subscribe(room)
                await b.subscribe(room)
        await admin.config_resetstat()
        for rooms in shards.values():
            for room in rooms:
                await a.publish_stream(room, b"stream")
                await a.publish(room, b"raw")

        async def delivered() -> bool:
            return all(got_b.data(room) == [b"stream", b"raw"] for rooms in shards.values() for room in rooms)

        await eventually(delivered, 10, "both kinds reach B in every room")
        for port, rooms in shards.items():
            for room in rooms:
                channel = a._channel(room)
                for node in redis_cluster.nodes:  # A and B on the room's master, nobody elsewhere
                    expected = 2 if node.port == int(port) else 0
                    assert node.call("PUBSUB", "SHARDNUMSUB", channel) == [channel, expected], (room, node.name)
        stats = await admin.info("commandstats")
    assert "cmdstat_publish" not in stats, stats.get("cmdstat_publish")
    assert stats["cmdstat_spublish"]["calls"] >= 2 * len(shards)  # the scripts' and the raw ones
    assert [e for e in got_a.events if len(e) == 2] == []


async def test_sessions_and_release_requests_between_processes_on_a_cluster(brokers: Start, admin: Any, redis_cluster: RedisClusterServer) -> None:
    """The session store's compare-and-set (its two keys in one slot) and the release request
    from one process to another on their node channels (shard channels too)."""
    a, _ = await brokers(NODE_A)
    b, _ = await brokers(NODE_B)
    released: list[str] = []

    async def release(token: str, stamp: int) -> None:
        released.append(token)
        assert await b.save_session(token, b"from-b", 30, 2)  # B saves it once more as it lets go

    b.on_release(release)
    async with timeout(20):
        assert await b.save_session("tok", b"v1", 30, 1)
        assert not await a.save_session("tok", b"stale", 30, 1)  # not after the copy kept
        assert await a.load_session("tok") == b"v1"
        await a.release_session(NODE_B, "tok", 5)  # B answers on A's node channel
        assert released == ["tok"]
        assert await a.load_session("tok") == b"from-b"
        assert await a.save_session("tok", b"a-took-it", 30, 3)
        assert not await b.save_session("tok", b"late", 30, 3)  # B let it go: a late save changes nothing
        assert await b.load_session("tok") == b"a-took-it"
        await a.delete_session("tok")
        assert await b.load_session("tok") is None
        assert await admin.keys("tether:{s:*") == []
    assert key_slot(a._node_channel(NODE_B)) == key_slot(f"{{n:{NODE_B}}}".encode())


async def test_rooms_on_every_shard_across_two_processes(redis_cluster: RedisClusterServer, app_processes: Any) -> None:
    """Two server processes (tests/rooms_app.py) on one cluster URL: broadcasts, presence in
    rooms whose slots are on each of the three masters."""
    a, b = app_processes(redis_cluster.url), app_processes(redis_cluster.url)
    shards = rooms_on_every_shard(redis_cluster)
    rooms = [names[0] for names in shards.values()]
    async with timeout(30):
        for room in rooms:
            on_a = await open_peers(a.url, 2, f"a-{room}-", room=room)
            on_b = await open_peers(b.url, 2, f"b-{room}-", room=room)
            assert await on_a[0].request("say", {"room": room, "text": f"hi {room}"}) == 2
            for peer in on_a + on_b:
                assert (await peer.event("said"))["data"]["text"] == f"hi {room}"
            names = sorted(m["meta"]["name"] for m in await on_b[0].request("who", {"room": room}))
            assert names == sorted([f"a-{room}-0", f"a-{room}-1", f"b-{room}-0", f"b-{room}-1"])


# -- failovers ------------------------------------------------------------------------------------
def walk(events: list[Any]) -> tuple[list[list[bytes]], list[Gap]]:
    """Check one room's stream as a broker delivered it: each offset follows the last or a gap
    explains the jump (a lost range; an epoch gap starts offsets again). Returns the messages
    of each epoch, and the gaps."""
    epochs: list[list[bytes]] = [[]]
    gaps: list[Gap] = []
    last: int | None = None
    for event in events:
        if len(event) == 2:
            gap = event[1]
            gaps.append(gap)
            assert last is not None and gap.first == (0 if gap.reason == "epoch" else last + 1), (last, event)
            if gap.reason == "epoch":
                epochs.append([])
            last = gap.last
        else:
            _, offset, data = event
            assert last is None or offset == last + 1, (last, event)
            last = offset
            epochs[-1].append(data)
    return epochs, gaps


async def _traffic(brokers: list[RedisBroker], rooms: list[str], published: dict[str, list[bytes]], stop: asyncio.Event) -> None:
    """A steady trickle to every room from every broker in turn, until ``stop``."""
    i = 0
    while not stop.is_set():
        for room in rooms:
            data = b"%s-%05d" % (room.encode(), i)
            published[room].append(data)
            await brokers[i % len(brokers)].publish_stream(room, data)
        i += 1
        await asyncio.sleep(0.005)  # a steady trickle, not a wait for a condition


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "manual"])
async def test_a_master_failover_rooms_reconnect_and_go_on_presence_is_rewritten(
    brokers: Start, admin: Any, redis_cluster: RedisClusterServer, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two brokers, traffic in a room on the master that fails and in a room on another one.

    ``kill``: the master is SIGKILLed; after NODE_TIMEOUT_MS its replica is elected. Meanwhile
    the brokers' sessions end (the pub/sub connection to it drops, and the whole cluster refuses
    commands once the master is marked failed: cluster-require-full-coverage), broadcasts wait
    in the outbox; then they read the new slot map, SSUBSCRIBE on the new master, repair every
    room from the offset they delivered last, rewrite their presence and send what they queued.
    Replication being asynchronous, the replica may lack the last writes of the killed master:
    the room then starts a new epoch (an ``epoch`` gap, never an offset given twice); else its
    offsets go on. ``manual``: CLUSTER FAILOVER (the replica catches up first; the old master
    answers SUNSUBSCRIBE): the offsets go on, nothing is lost.
    Every message queued while the shard was away is delivered, each broker delivers one
    sequence per room with every jump explained by a gap, and both deliver the same.
    """
    ttl = 3.0
    a, got_a = await brokers(NODE_A, presence_ttl=ttl, heartbeat_interval=0.3)
    b, got_b = await brokers(NODE_B, presence_ttl=ttl, heartbeat_interval=0.3)
    victim_room = "lobby"
    failing = redis_cluster.master_of(f"{{r:{victim_room}}}")
    other_room = next(room for rooms in rooms_on_every_shard(redis_cluster).values() for room in rooms if redis_cluster.master_of(f"{{r:{room}}}") is not failing)
    rooms = [victim_room, other_room]
    for broker in (a, b):
        for room in rooms:
            await broker.subscribe(room)
    await a.put_member(victim_room, "ann", b'{"n":"ann"}')
    await b.put_member(victim_room, "bob", b'{"n":"bob"}')
    await a.put_member(other_room, "ann", b'{"n":"ann"}')
    published: dict[str, list[bytes]] = {room: [] for room in rooms}
    stop = asyncio.Event()
    task = asyncio.ensure_future(_traffic([a, b], rooms, published, stop))
    try:
        async with timeout(90):

            async def flowing(n: int) -> bool:
                return all(len(got.data(room)) >= n for got in (got_a, got_b) for room in rooms)

            await eventually(lambda: flowing(50), 15, "traffic flows")
            before = {room: len(published[room]) for room in rooms}
            at_kill = {room: len(published[room]) for room in rooms}
            with caplog.at_level(logging.INFO, logger="tether.redis"):
                started = time.monotonic()
                if how == "kill":
                    old, new = await redis_cluster.kill_master(f"{{r:{victim_room}}}")
                else:
                    old, new = await redis_cluster.failover(f"{{r:{victim_room}}}")
                assert redis_cluster.master_of(f"{{r:{victim_room}}}") is new
                at_failover = {room: len(published[room]) for room in rooms}  # the promotion
                # The brokers come back on the new master and traffic flows again.
                promoted = time.monotonic()
                for broker in (a, b):
                    await _state_is(broker, LinkState.UP, 30)
                up = time.monotonic()

                async def past_failover() -> bool:
                    marks = {room: published[room][at_failover[room] + 20] for room in rooms if len(published[room]) > at_failover[room] + 20}
                    return len(marks) == len(rooms) and all(mark in got.data(room) for got in (got_a, got_b) for room, mark in marks.items())

                await eventually(past_failover, 30, "messages published after the failover reach both brokers")
            stop.set()
            await task
            last = {room: published[room][-1] for room in rooms}

            async def all_in() -> bool:
                return all(last[room] in got.data(room) for got in (got_a, got_b) for room in rooms)

            await eventually(all_in, 20, "the last message of every room reaches both brokers")

            # Presence: each broker's members listed again on the new master (rewritten after
            # the reconnect; a killed master's replica may have had them, or not).
            async def presence_back() -> bool:
                return [set(await broker.members(victim_room)) for broker in (a, b)] == [{"ann", "bob"}] * 2

            await eventually(presence_back, 10, "presence rewritten on the new master")
            assert set(await b.members(other_room)) == {"ann"}
    finally:
        stop.set()
        await task
    reconnected = [r for r in caplog.records if r.getMessage().startswith("reconnected to Redis")]
    assert reconnected, "the brokers reconnected"
    report = []
    for room in rooms:
        sequences = []
        for name, got in (("A", got_a), ("B", got_b)):
            epochs, gaps = walk(got.of(room))
            delivered = [m for epoch in epochs for m in epoch]
            for epoch in epochs:  # once each; across an epoch gap a message may come again
                assert len(epoch) == len(set(epoch)), f"{name} delivered a message twice in {room}"
            # Nothing published from the kill on is lost: the outbox held it, or the pipeline
            # that had it on the failed master sent it again.
            assert set(published[room][at_kill[room] :]) <= set(delivered), (name, room)
            # What is missing was confirmed by the old master before the kill, not replicated,
            # not received live: a gap covers it.
            missing = set(published[room]) - set(delivered)
            assert not missing or gaps, (name, room, sorted(missing)[:5])
            if room == other_room or how == "manual":
                assert [g for g in gaps if g.reason == "epoch"] == [], (name, room, gaps)
            sequences.append(epochs[-1])
            report.append(f"{name} {room}: {len(delivered)} delivered, {len(missing)} lost, gaps {[(g.reason, g.first, g.last) for g in gaps]}")
        tail = min(len(sequences[0]), len(sequences[1]))
        assert sequences[0][-tail:] == sequences[1][-tail:], f"A and B disagree in {room}"
    print(f"\n{how}: replica promoted after {promoted - started:.1f}s, both brokers up after {up - started:.1f}s")
    print(f"{how}: {before} published before, resent A {a.resent} B {b.resent}, repaired A {a.repaired} B {b.repaired}\n" + "\n".join(report))


@pytest.mark.slow
async def test_a_failover_under_server_processes_clients_keep_their_rooms(redis_cluster: RedisClusterServer, app_processes: Any) -> None:
    """Two server processes on the cluster, members in a room on the master that is killed:
    once the replica is promoted, broadcasts cross processes again and presence lists every
    member on both (no restart of the servers, no reconnect of the clients)."""
    room = "lobby"
    a, b = app_processes(redis_cluster.url, "--ttl", "3"), app_processes(redis_cluster.url, "--ttl", "3")
    async with timeout(90):
        on_a = await open_peers(a.url, 2, "a", room=room)
        on_b = await open_peers(b.url, 2, "b", room=room)
        assert await on_a[0].request("say", {"room": room, "text": "before"}) == 2
        for peer in on_a + on_b:
            assert (await peer.event("said"))["data"]["text"] == "before"
        await redis_cluster.kill_master(f"{{r:{room}}}")
        n = 0

        async def flows_again() -> bool:
            nonlocal n
            n += 1
            await on_a[0].request("say", {"room": room, "text": f"probe{n}"})
            await on_b[1].request("whoami")  # what has arrived so far, into events
            return any(e["type"] == "said" and e["data"]["text"].startswith("probe") for e in on_b[1].events)

        await eventually(flows_again, 30, "broadcasts cross processes after the failover")
        expected = ["a0", "a1", "b0", "b1"]

        async def presence_back() -> bool:
            names = [sorted(m["meta"]["name"] for m in await peer.request("who", {"room": room})) for peer in (on_a[0], on_b[0])]
            return names == [expected, expected]

        await eventually(presence_back, 10, "presence lists every member on both processes")
        for peer in on_a + on_b:
            peer.events.clear()
        await on_b[0].request("say", {"room": room, "text": "after"})
        for peer in on_a + on_b:
            while (await peer.event("said"))["data"]["text"] != "after":
                pass
