"""N worker processes on one port (SO_REUSEPORT) sharing rooms through Redis."""

from __future__ import annotations

from typing import Callable

import pytest

import tether
from tether.rooms.broker import MemoryBroker
from tests.conftest import timeout
from tests.redis_fixture import AppProcess, Peer, RedisServer, app_processes, close_peers, redis_server  # noqa: F401
from tests.test_redis import _names, _said

Start = Callable[..., AppProcess]


@pytest.mark.redis
async def test_workers_share_one_port_and_rooms(redis_server: RedisServer, app_processes: Start) -> None:
    server = app_processes(redis_server.url, "--workers", "2")
    async with timeout(30):
        peers: list[Peer] = []
        pids: set[int] = set()
        for i in range(40):  # SO_REUSEPORT spreads connections by hash: both workers appear soon
            peer = await Peer.open(server.url, name=f"w{i}", room="lobby")
            pids.add((await peer.request("whoami"))["pid"])
            peers.append(peer)
            if len(pids) == 2 and i >= 5:
                break
        assert len(pids) == 2
        await peers[0].request("say", {"room": "lobby", "text": "one"})
        await peers[0].request("say", {"room": "lobby", "text": "two"})
        await _said(peers, ["one", "two"])
        assert await _names(peers[0], "lobby") == sorted(f"w{i}" for i in range(len(peers)))


def test_workers_without_shared_broker_are_refused() -> None:
    with pytest.raises(ValueError, match="shared broker"):
        tether.run(lambda conn: conn.close(), port=0, workers=2)
    with pytest.raises(ValueError, match="shared broker"):
        tether.serve_workers({"/": tether.App()}, port=0, workers=2, broker=MemoryBroker())
