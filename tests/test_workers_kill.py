"""A worker killed mid-traffic (issue 16): ``workers=2`` on Redis, one worker SIGKILLed while a
room gets a steady feed of broadcasts; the parent restarts it.

Members on the killed worker lose their TCP connections with no close frame; their clients
(tether.Client, sessions on) come back on whichever worker the kernel picks, which asks the dead
one to let go of each session, waits RELEASE_TIMEOUT for an answer that never comes, and resumes
from what Redis kept. At the end every member has every broadcast once and in order (the
history replays what they missed), presence lists every member once under the id it had before
the kill (the dead worker's entries expire after ``presence_ttl``; the adopted sessions are put
back under their ids), and the restarted worker serves new connections.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from conftest import timeout

import tether
from tests.redis_fixture import AppProcess, RedisServer, app_processes, eventually, redis_server  # noqa: F401
from tether.proto.backoff import Backoff

BROADCASTS = 300
KILL_AT = 100
MEMBERS = 30
#: What each member's client saw: its closes, resumes and gaps.
EVENTS: dict[str, list[tuple[Any, ...]]] = {}


async def whoami(client: tether.Client) -> dict[str, Any]:
    return dict(await client.request("whoami"))


async def open_client(url: str, name: str, heard: dict[str, list[str]] | None = None) -> tether.Client:
    client = tether.Client(f"{url}?name={name}&room=lobby", backoff=Backoff(base=0.05, cap=0.3))
    if heard is not None:
        said = heard.setdefault(name, [])
        client.on("said", lambda data: said.append(data["text"]))
        events = EVENTS.setdefault(name, [])
        client.add_listener("close", lambda code, reason: events.append(("close", code)))
        client.add_listener("resumed", lambda ok, lost: events.append(("resumed", ok, lost)))
        client.add_listener("gap", lambda *args: events.append(("gap", *args)))
    client.start()
    await client.wait_open()
    return client


@pytest.mark.slow
@pytest.mark.redis
async def test_a_worker_killed_mid_feed_loses_no_broadcast_and_presence_comes_back_whole(
    redis_server: RedisServer, app_processes: Any
) -> None:
    server: AppProcess = app_processes(redis_server.url, "--workers", "2", "--ttl", "2")
    clients: list[tether.Client] = []
    heard: dict[str, list[str]] = {}
    try:
        async with timeout(90):
            sender = await open_client(server.url, "sender")
            clients.append(sender)
            sender_pid = (await whoami(sender))["pid"]
            by_pid: dict[int, list[str]] = {}
            ids: dict[str, str] = {}
            by_name: dict[str, tether.Client] = {}
            for i in range(200):  # SO_REUSEPORT spreads by hash: open until both workers have members
                name = f"m{i}"
                client = await open_client(server.url, name, heard)
                clients.append(client)
                by_name[name] = client
                me = await whoami(client)
                by_pid.setdefault(me["pid"], []).append(name)
                ids[name] = me["id"]
                if len(ids) >= MEMBERS and len(by_pid) == 2 and all(len(v) >= 5 for v in by_pid.values()):
                    break
            victim = next(pid for pid in by_pid if pid != sender_pid)
            on_victim = by_pid[victim]
            assert len(by_pid) == 2 and len(on_victim) >= 5, by_pid
            names = sorted(ids)

            for k in range(BROADCASTS):
                if k == KILL_AT:
                    os.kill(victim, signal.SIGKILL)
                    killed_at = time.monotonic()
                await sender.request("say", {"room": "lobby", "text": str(k)})
                await asyncio.sleep(0.01)  # a steady feed across the kill and the resumes

            expected = [str(k) for k in range(BROADCASTS)]

            async def all_heard() -> bool:
                return all(len(heard[name]) >= BROADCASTS for name in names)

            try:
                await eventually(all_heard, 30, "every member has every broadcast")
            except AssertionError:
                for name in names:
                    got = heard[name]
                    missing = sorted(set(expected) - set(got), key=int)
                    print(name, name in on_victim, len(got), "missing", missing[:5], len(missing), "state", by_name[name].state, EVENTS.get(name))
                raise
            for name in on_victim:  # cut once, resumed in its session: no gap, nothing lost
                assert EVENTS[name] == [("close", 1006), ("resumed", True, 0)], (name, EVENTS[name])

            async def presence_whole() -> bool:
                members = await sender.request("who", {"room": "lobby"})
                listed = sorted(m["meta"]["name"] for m in members if m["meta"]["name"] != "sender")
                return listed == names and {m["meta"]["name"]: m["id"] for m in members if m["meta"]["name"] != "sender"} == ids

            await eventually(presence_whole, 20, "presence lists every member once, under its id")

            # The parent restarted the worker: a new pid serves new connections.
            async def restarted() -> bool:
                probe = await open_client(server.url, f"probe{time.monotonic_ns()}")
                try:
                    pid = (await whoami(probe))["pid"]
                finally:
                    await probe.close()
                return pid not in (victim, sender_pid)

            await eventually(restarted, 20, "the restarted worker serves")
            # Seconds after the last broadcast: anything doubled would have come by now.
            for name in names:
                assert heard[name] == expected, (name, name in on_victim, len(heard[name]))
            for name in on_victim:  # back, on a live worker, in their sessions (same member id)
                me = await whoami(by_name[name])
                assert me["pid"] != victim and me["id"] == ids[name]
            print(
                f"\nworker {victim} killed with {len(on_victim)} of {len(names)} members; every member got "
                f"{BROADCASTS}/{BROADCASTS} broadcasts once, in order; presence whole again "
                f"{time.monotonic() - killed_at:.1f} s after the kill"
            )
    finally:
        for client in clients:
            await client.close()
