"""Rooms across processes through a real redis-server (started on a free port per test).

Two server processes (tests/rooms_app.py) share one Redis; presence TTL 2 s, heartbeat 0.3 s.
Exactly-once is checked with ordering: one publisher's broadcasts arrive in order, so a
member that receives "one" then "two" got no second copy of "one" in between. Room streams
(offsets, history, live repair) have their own tests: tests/test_redis_streams.py.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from typing import Any, Callable

import pytest

import tether
from tether.rooms.broker import MemoryBroker
from tether.rooms.hub import is_shared, make_broker
from tests.conftest import timeout
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

Start = Callable[..., AppProcess]


async def _names(peer: Peer, room: str) -> list[str]:
    return sorted(m["meta"]["name"] for m in await peer.request("who", {"room": room}))


async def _said(peers: list[Peer], texts: list[str]) -> None:
    for peer in peers:
        got = [(await peer.event("said"))["data"]["text"] for _ in texts]
        assert got == texts, (peer, got)


async def test_broadcast_reaches_every_member_on_both_processes_exactly_once(redis_server: RedisServer, app_processes: Start) -> None:
    a, b = app_processes(redis_server.url), app_processes(redis_server.url)
    async with timeout(20):
        on_a = await open_peers(a.url, 3, "a", room="lobby")
        on_b = await open_peers(b.url, 3, "b", room="lobby")
        everyone = on_a + on_b
        assert await on_a[0].request("say", {"room": "lobby", "text": "one"}) == 3
        assert await on_a[0].request("say", {"room": "lobby", "text": "two"}) == 3
        await _said(everyone, ["one", "two"])
        # Redis has now sent "one" and "two" to every subscriber, A's own included: a copy
        # A wrongly delivered again would reach A's members before B's next message.
        assert await on_b[1].request("say", {"room": "lobby", "text": "three", "exclude": True}) == 2
        await _said([p for p in everyone if p is not on_b[1]], ["three"])
        assert await on_a[0].request("say", {"room": "lobby", "text": "end"}) == 3
        await _said(everyone, ["end"])
        assert [e for p in everyone for e in p.events if e["type"] == "said"] == []
        # presence lists agree, and name every member on both processes
        expected = sorted(f"{p}{i}" for p in "ab" for i in range(3))
        assert await _names(on_a[0], "lobby") == expected
        assert await _names(on_b[0], "lobby") == expected
        ids_a = await on_a[0].request("who", {"room": "lobby"})
        assert ids_a == await on_b[2].request("who", {"room": "lobby"})


async def test_presence_events_cross_processes_and_client_join_uses_hook(redis_server: RedisServer, app_processes: Start) -> None:
    a, b = app_processes(redis_server.url), app_processes(redis_server.url)
    async with timeout(20):
        ann = await Peer.open(a.url, name="ann")
        bob = await Peer.open(b.url, name="bob")
        reply = await ann.request("join", {"room": "chat", "meta": {"mood": "ok"}})
        assert reply["presence"] == [{"id": reply["id"], "meta": {"name": "ann", "mood": "ok"}}]
        reply = await bob.request("join", {"room": "chat"})
        assert sorted(m["meta"]["name"] for m in reply["presence"]) == ["ann", "bob"]
        joined = await ann.event("presence")
        assert joined["data"] == {"event": "join", "id": reply["id"], "meta": {"name": "bob"}}
        with pytest.raises(tether.ReplyError) as exc:
            await bob.request("join", {"room": "private-1"})
        assert exc.value.code == "forbidden"
        await bob.close()
        left = await ann.event("presence")
        assert left["data"]["event"] == "leave" and left["data"]["id"] == reply["id"]
        assert await _names(ann, "chat") == ["ann"]


async def test_killed_process_members_vanish_from_presence_within_ttl(redis_server: RedisServer, app_processes: Start) -> None:
    a, b = app_processes(redis_server.url, "--ttl", "2"), app_processes(redis_server.url, "--ttl", "2")
    async with timeout(30):
        on_a = await open_peers(a.url, 2, "a", room="lobby")
        await open_peers(b.url, 2, "b", room="lobby")
        assert await _names(on_a[0], "lobby") == ["a0", "a1", "b0", "b1"]
        b.kill()  # SIGKILL: B never withdraws its presence; its keys must expire

        async def b_gone() -> bool:
            return await _names(on_a[0], "lobby") == ["a0", "a1"]

        await eventually(b_gone, 2 + 2, "B's members expire from presence")
        assert await on_a[0].request("say", {"room": "lobby", "text": "still here"}) == 2
        await _said(on_a, ["still here"])


async def test_redis_restart_both_processes_recover_without_restarting(redis_server: RedisServer, app_processes: Start) -> None:
    a, b = app_processes(redis_server.url), app_processes(redis_server.url)
    async with timeout(40):
        on_a = await open_peers(a.url, 2, "a", room="lobby")
        on_b = await open_peers(b.url, 2, "b", room="lobby")
        await on_a[0].request("say", {"room": "lobby", "text": "before"})
        await _said(on_a + on_b, ["before"])

        redis_server.stop()
        # A room message needs its offset from Redis: while Redis is away it waits in A's
        # outbox (the call still answers with A's member count), and once Redis is back it
        # reaches every member, A's own and B's (from history if B resubscribes after A sent it).
        assert await on_a[0].request("say", {"room": "lobby", "text": "while down"}) == 2
        redis_server.start()  # same port, empty: no presence, no subscriptions, a new epoch
        await _said(on_a + on_b, ["while down"])

        n = 0

        async def flows_again() -> bool:
            nonlocal n
            n += 1
            await on_a[0].request("say", {"room": "lobby", "text": f"probe{n}"})
            await on_b[0].request("say", {"room": "lobby", "text": f"probe-b{n}"})
            got_b = [e for e in on_b[1].events if e["type"] == "said" and e["data"]["text"].startswith("probe")]
            got_a = [e for e in on_a[1].events if e["type"] == "said" and e["data"]["text"].startswith("probe-b")]
            await on_b[1].request("whoami")  # drain what has arrived so far into events
            await on_a[1].request("whoami")
            return bool(got_b) and bool(got_a)

        await eventually(flows_again, 15, "broadcasts cross processes after the Redis restart")
        expected = ["a0", "a1", "b0", "b1"]

        async def presence_back() -> bool:
            return await _names(on_a[0], "lobby") == expected and await _names(on_b[0], "lobby") == expected

        await eventually(presence_back, 5, "presence rewritten by the heartbeat")
        for peer in on_a + on_b:
            peer.events.clear()
        await on_b[0].request("say", {"room": "lobby", "text": "after-1"})
        await on_b[0].request("say", {"room": "lobby", "text": "after-2"})
        for peer in on_a + on_b:
            got = []
            while len(got) < 2:
                text = (await peer.event("said"))["data"]["text"]
                if text.startswith("after"):
                    got.append(text)
            assert got == ["after-1", "after-2"]


def test_broker_setting_selects_the_implementation() -> None:
    assert isinstance(make_broker(None), MemoryBroker)
    assert is_shared("redis://127.0.0.1:1/0") and not is_shared(None)
    from tether.redis_broker import RedisBroker

    broker = make_broker("redis://:secret@127.0.0.1:1/0")
    assert isinstance(broker, RedisBroker) and "secret" not in repr(broker)
    with pytest.raises(ValueError):
        make_broker("kafka://x")


def test_missing_redis_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    for name in ("tether.redis_broker", "tether.rooms.redis"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError, match=r"pip install 'tether\[redis\]'"):
        importlib.import_module("tether.redis_broker")
    for name in ("tether.redis_broker", "tether.rooms.redis"):
        monkeypatch.delitem(sys.modules, name, raising=False)


async def test_server_keeps_serving_when_redis_is_down_at_start() -> None:
    from tether.redis_broker import LinkState, RedisBroker
    from tests.redis_fixture import free_port

    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.5, backoff_cap=0.2)
    async with tether.serve({"/socket": _joiner}, "127.0.0.1", 0, broker=broker) as server:
        assert broker.state is LinkState.DOWN
        async with timeout(5):
            async with tether.connect(f"ws://127.0.0.1:{server.port}/socket") as conn:
                assert await conn.receive() == "joined"
                assert await server.hub.broadcast("r", "t", 1) == 1
                assert [m.meta for m in await server.hub.presence("r")] == ["me"]


async def _joiner(conn: tether.Conn) -> Any:
    await conn.join("r", "me")
    await conn.send("joined")
    await conn.wait_closed()


# -- RedisBroker fault paths, one broker in this process against a real redis-server ---------
NODE_A, NODE_B = "aaaaaaaaaaaa", "bbbbbbbbbbbb"


class Received:
    """A broker's ``deliver``: what it got, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, room: str, data: bytes) -> None:
        self.got.append((room, data))

    def data(self) -> list[bytes]:
        return [data for _, data in self.got]


async def _started(url: str, node: str, **settings: Any) -> tuple[Any, Received]:
    from tether.redis_broker import LinkState, RedisBroker

    broker, received = RedisBroker(url, **settings), Received()
    await broker.start(node, received)
    assert broker.state is LinkState.UP
    return broker, received


async def _state_is(broker: Any, state: Any, seconds: float = 5) -> None:
    async def check() -> bool:
        return bool(broker.state is state)

    await eventually(check, seconds, f"broker {state.name}")


async def test_redis_broker_counts_a_batch_lost_in_a_failed_pipeline_as_dropped(redis_server: RedisServer) -> None:
    from tether.redis_broker import LinkState

    admin = redis_server.admin()
    await admin.ping()  # a cluster client reads the slot map and the command table now, not mid-test
    broker, _ = await _started(redis_server.url, NODE_A, command_timeout=30, backoff_cap=0.2)
    try:
        async with timeout(20):
            await admin.client_pause(30_000)  # Redis holds every command: the pipeline cannot finish
            for i in range(3):
                await broker.publish("r", b"m%d" % i)

            async def taken() -> bool:
                return not broker._outbox  # the publisher took the batch and waits for its replies

            await eventually(taken, 5, "the publisher takes the batch")
            redis_server.stop()  # the pipeline fails with the batch in it
            await _state_is(broker, LinkState.DOWN)
            assert (broker.published, broker.dropped) == (0, 3)
            redis_server.start()
            await _state_is(broker, LinkState.UP, 10)
    finally:
        await broker.close()
        await admin.aclose()


class Bug(Exception):
    """Not a RedisError: what a bug in a callback or in redis-py would raise."""


async def test_redis_broker_reconnects_after_an_unexpected_error_and_delivers_again(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tether.redis_broker import LinkState

    a, to_a = await _started(redis_server.url, NODE_A, backoff_cap=0.2)
    b, _ = await _started(redis_server.url, NODE_B, backoff_cap=0.2)
    try:
        async with timeout(20):
            await a.subscribe("r")
            await b.subscribe("r")
            real = a._on_publication
            failures = []

            def once(channel: bytes, data: bytes) -> None:
                if not failures:
                    failures.append(data)
                    raise Bug("a bug inside the session")
                real(channel, data)

            monkeypatch.setattr(a, "_on_publication", once)
            with caplog.at_level(logging.WARNING, logger="tether.redis"):
                await b.publish("r", b"boom")
                n = 0

                async def delivered_again() -> bool:
                    nonlocal n
                    n += 1
                    await b.publish("r", b"after-%d" % n)
                    return any(data.startswith(b"after-") for data in to_a.data())

                await eventually(delivered_again, 10, "A delivers publications again after the unexpected error")
            assert failures == [b"boom"] and a.state is LinkState.UP
            lost = [r for r in caplog.records if r.getMessage().startswith("lost Redis")]
            assert lost and lost[0].levelno == logging.ERROR and lost[0].exc_info is not None
            assert isinstance(lost[0].exc_info[1], Bug)
            assert any(r.getMessage().startswith("reconnected to Redis") for r in caplog.records)
    finally:
        await a.close()
        await b.close()


async def _command_calls(admin: Any) -> dict[str, int]:
    stats = await admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


async def test_redis_broker_heartbeat_only_renews_ttls_and_restores_a_deleted_key(redis_server: RedisServer) -> None:
    ttl, interval = 2.0, 0.2
    admin = redis_server.admin(decode_responses=True)
    await admin.ping()  # a cluster client reads the slot map and the command table now, not mid-test
    broker, _ = await _started(redis_server.url, NODE_A, presence_ttl=ttl, heartbeat_interval=interval)
    rooms = ["r1", "r2", "r3"]
    expected = {room: {f"{room}.{m}": f'{{"m":{m}}}' for m in range(3)} for room in rooms}
    try:
        async with timeout(30):
            for room, members in expected.items():
                for member, meta in members.items():
                    await broker.put_member(room, member, meta.encode())

            async def quiet_heartbeats(seconds: float) -> dict[str, int]:
                """Reset the counters; return them after ``seconds`` of heartbeats (past the
                TTL: the keys live on only if the heartbeat renews them)."""
                await admin.config_resetstat()
                start = time.monotonic()

                async def enough() -> bool:
                    calls = await _command_calls(admin)
                    return time.monotonic() - start > seconds and calls.get("pexpire", 0) >= 2 * len(rooms) * 3

                await eventually(enough, seconds + 5, "heartbeats go on")
                return await _command_calls(admin)

            calls = await quiet_heartbeats(ttl * 1.2)
            assert calls.get("hset", 0) == calls.get("del", 0) == calls.get("sadd", 0) == 0, calls
            for room in rooms:
                assert await admin.hgetall(f"tether:{{r:{room}}}:presence:{NODE_A}") == expected[room]
                assert await admin.smembers(f"tether:{{r:{room}}}:nodes") == {NODE_A}
                assert 0 < await admin.pttl(f"tether:{{r:{room}}}:presence:{NODE_A}") <= ttl * 1000

            # A key gone anyway (evicted, or expired during a long pause) is written again.
            await admin.delete(f"tether:{{r:r2}}:presence:{NODE_A}", "tether:{r:r3}:nodes")

            async def restored() -> bool:
                return bool(
                    await admin.hgetall(f"tether:{{r:r2}}:presence:{NODE_A}") == expected["r2"]
                    and await admin.smembers("tether:{r:r3}:nodes") == {NODE_A}
                )

            await eventually(restored, 5, "the heartbeat rewrites the rooms whose keys were gone")
            assert 0 < await admin.pttl(f"tether:{{r:r2}}:presence:{NODE_A}") <= ttl * 1000
            assert 0 < await admin.pttl("tether:{r:r3}:nodes") <= ttl * 1000
            assert await broker.members("r2") == {m: v.encode() for m, v in expected["r2"].items()}
            calls = await quiet_heartbeats(interval * 4)  # and then quiet again
            assert calls.get("hset", 0) == calls.get("del", 0) == 0, calls
    finally:
        await broker.close()
        await admin.aclose()


async def test_redis_broker_presence_writes_that_failed_reach_redis_later(redis_server: RedisServer) -> None:
    from tether.redis_broker import LinkState

    admin = redis_server.admin(decode_responses=True)
    await admin.ping()  # a cluster client reads the slot map and the command table now, not mid-test
    broker, _ = await _started(redis_server.url, NODE_A, presence_ttl=2.0, heartbeat_interval=0.2, backoff_cap=0.2)
    key = f"tether:{{r:r}}:presence:{NODE_A}"

    async def listed(*members: str) -> bool:
        return bool(sorted(await admin.hkeys(key)) == sorted(members) and NODE_A in await admin.smembers("tether:{r:r}:nodes"))

    try:
        async with timeout(30):
            await broker.put_member("r", "one", b"1")
            # A join whose write fails while the session lives on (Redis refuses HSET) ...
            await admin.acl_setuser("default", enabled=True, reset_keys=False, commands=["-hset"])
            await broker.put_member("r", "two", b"2")
            assert await admin.hkeys(key) == ["one"]
            await admin.acl_setuser("default", enabled=True, reset_keys=False, commands=["+hset"])
            await eventually(lambda: listed("one", "two"), 5, "the heartbeat rewrites the room whose write failed")
            # ... and joins and leaves while Redis is away are there once it is back.
            redis_server.stop()
            await _state_is(broker, LinkState.DOWN)
            await broker.put_member("r", "three", b"3")
            await broker.drop_member("r", "one")
            redis_server.start()  # empty
            await admin.aclose()
            admin = redis_server.admin(decode_responses=True)
            await eventually(lambda: listed("two", "three"), 10, "presence rewritten after the reconnect")
    finally:
        await broker.close()
        await admin.aclose()
