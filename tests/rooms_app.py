"""A small rooms app that tests run as a separate server process.

    python tests/rooms_app.py PORT BROKER [--workers N] [--ttl S] [--heartbeat S]
                              [--max-send-queue N] [--overflow drop_oldest|close]

BROKER is ``memory`` or a ``redis://`` URL. Clients connect to ``/socket?name=...``;
``?room=R`` joins room R at connect (without presence when ``&quiet=1``). Message types:
``say`` {room, text} broadcasts ``said`` to the room (sender excluded if ``exclude``);
``blast`` {room, n, size} broadcasts n messages of ``size`` bytes, yielding every 16;
``whoami`` -> {pid, id}; ``stats`` {name} -> that connection's send stats;
``join_slow`` {name, room} puts connection ``name`` in a room;
``cpu`` -> its process CPU seconds; ``rss`` -> the server's resident memory in KiB; ``who`` {room} -> presence via the app.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import msgspec

import tether

parser = argparse.ArgumentParser()
parser.add_argument("port", type=int)
parser.add_argument("broker")
parser.add_argument("--workers", type=int, default=1)
parser.add_argument("--ttl", type=float, default=2.0)
parser.add_argument("--heartbeat", type=float, default=0.3)
parser.add_argument("--max-send-queue", type=int, default=256)
parser.add_argument("--overflow", default="drop_oldest")
args = parser.parse_args()

app = tether.App()
by_name: dict[str, tether.Conn] = {}


class Say(msgspec.Struct):
    room: str
    text: str
    exclude: bool = False


class Blast(msgspec.Struct):
    room: str
    n: int
    size: int


class Room(msgspec.Struct):
    room: str


class Name(msgspec.Struct):
    name: str


class NameRoom(msgspec.Struct):
    name: str
    room: str


@app.on_connect
async def connected(conn: tether.Conn) -> None:
    name = conn.query.get("name", "")
    by_name[name] = conn
    room = conn.query.get("room")
    if room:
        await conn.join(room, {"name": name}, presence=conn.query.get("quiet") != "1")


@app.on_disconnect
def gone(conn: tether.Conn, code: int, reason: str) -> None:
    by_name.pop(conn.query.get("name", ""), None)


@app.on_join
def may_join(conn: tether.Conn, room: str, meta: Any) -> Any:
    if room.startswith("private"):
        return False
    return {"name": conn.query.get("name", ""), **(meta or {})}


@app.on("say")
async def say(conn: tether.Conn, data: Say) -> int:
    return await app.broadcast(data.room, "said", {"text": data.text}, exclude=conn if data.exclude else None)


@app.on("blast")
async def blast(conn: tether.Conn, data: Blast) -> int:
    body = "x" * data.size
    for i in range(data.n):
        await app.broadcast(data.room, "blast", {"i": f"{i:05d}", "body": body})  # fixed size
        if i % 16 == 15:
            await asyncio.sleep(0)  # let the loop read and write like a real server would
    return data.n


@app.on("position")
async def position(conn: tether.Conn, data: Room) -> int:
    """The offset of the last message of a room (the next broadcast gets this + 1)."""
    return (await app.hub.position(data.room))[1]


@app.on("whoami")
def whoami(conn: tether.Conn) -> dict[str, Any]:
    return {"pid": os.getpid(), "id": app.hub.member_id(conn)}


@app.on("stats")
def stats(conn: tether.Conn, data: Name) -> dict[str, Any]:
    target = by_name.get(data.name)
    if target is None:
        return {"state": "gone"}
    s = target.stats
    return {"state": target.state.name, "queued": s.queued, "dropped": s.dropped, "sent": s.sent}


@app.on("join_slow")
async def join_slow(conn: tether.Conn, data: NameRoom) -> None:
    await by_name[data.name].join(data.room, presence=False)


@app.on("cpu")
def cpu(conn: tether.Conn) -> float:
    return time.process_time()


@app.on("rss")
def rss(conn: tether.Conn) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@app.on("who")
async def who(conn: tether.Conn, data: Room) -> list[tether.Member]:
    return await app.presence(data.room)


if args.broker == "memory":
    broker: Any = None
else:
    from tether.redis_broker import RedisBroker

    broker = RedisBroker(args.broker, presence_ttl=args.ttl, heartbeat_interval=args.heartbeat, backoff_cap=0.5)

tether.run(
    {"/socket": app},
    "127.0.0.1",
    args.port,
    workers=args.workers,
    broker=broker,
    max_send_queue=args.max_send_queue,
    send_overflow=args.overflow,
    ping_interval=None,
    max_connections=None,
)
