"""Rooms across processes through a real redis-server (started on a free port per test).

Two server processes (tests/rooms_app.py) share one Redis; presence TTL 2 s, heartbeat 0.3 s.
Exactly-once is checked with ordering: one publisher's broadcasts arrive in order, so a
member that receives "one" then "two" got no second copy of "one" in between.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

import pytest

import tether
from tether.rooms.broker import MemoryBroker
from tether.rooms.hub import is_shared, make_broker
from tests.conftest import timeout
from tests.redis_fixture import AppProcess, Peer, RedisServer, app_processes, close_peers, eventually, open_peers, redis_server  # noqa: F401

pytestmark = pytest.mark.redis

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
        # Local delivery keeps working while Redis is away.
        assert await on_a[0].request("say", {"room": "lobby", "text": "local"}) == 2
        await _said(on_a, ["local"])
        redis_server.start()  # same port, empty: no presence, no subscriptions

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
