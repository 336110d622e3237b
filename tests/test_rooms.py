"""Rooms, broadcast, presence and per-connection send queues (in-memory broker).

Frames and the send queue are checked without sockets (a fake Wire); rooms over real
sockets in-process; the slow consumer among 1,000 connections against a server process,
whose RSS is read from /proc.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec
import pytest

import tether
from tether.conn import Conn, ConnSettings, make_request
from tether.proto.envelope import encode_message, with_offset
from tether.proto.frames import OP_BINARY, OP_TEXT, encode_frame, frame_header
from tether.rooms.hub import pack, unpack
from tests.conftest import ServerFactory, timeout, url
from tests.redis_fixture import AppProcess, Peer, app_processes, close_peers, eventually, open_peers  # noqa: F401
from tests.rawws import RawWS

# -- frames: RFC 6455 section 5.2, bytes only ---------------------------------------------


@pytest.mark.parametrize(
    "length, header",
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
        (2**32 + 5, b"\x81\x7f" + struct.pack("!Q", 2**32 + 5)),
    ],
)
def test_frame_header_encodes_length_in_7_16_or_64_bits(length: int, header: bytes) -> None:
    assert frame_header(OP_TEXT, length) == header


def test_frame_header_sets_fin_and_opcode_and_never_masks() -> None:
    first, second = frame_header(OP_BINARY, 3)
    assert first == 0x82 and second & 0x80 == 0
    assert encode_frame(OP_TEXT, b"hi") == b"\x81\x02hi"


def test_broker_message_round_trips_origin_opcode_exclude_payload() -> None:
    data = pack("abcdef012345", OP_BINARY, b"\x00payload")
    assert unpack(data) == ("abcdef012345", OP_BINARY, "", b"\x00payload")
    data = pack("abcdef012345", OP_TEXT, b"{}", exclude="session-1")
    assert unpack(data) == ("abcdef012345", OP_TEXT, "session-1", b"{}")
    for short in (b"short", b"abcdef012345\x01\x09abc"):
        with pytest.raises(ValueError):
            unpack(short)


# -- the send queue, with a fake wire --------------------------------------------------------


class FakeWire:
    """A Transport that records writes."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.frames: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.on_frame: Any = None  # called after each write_frame

    def write(self, opcode: int, payload: bytes) -> None:
        self.writes.append((opcode, payload))

    def write_frame(self, frame: bytes, opcode: int, payload: bytes) -> None:
        self.frames.append(frame)
        if self.on_frame is not None:
            self.on_frame()

    def write_close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def ping(self, payload: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def disconnect(self) -> None: ...
    def abort(self) -> None: ...


def make_conn(wire: Any, **kw: Any) -> Conn:
    return Conn(wire, make_request("/"), ConnSettings(ping_interval=None, **kw))


def frames(n: int) -> list[tuple[bytes, int, bytes]]:
    return [(encode_frame(OP_TEXT, b"%d" % i), OP_TEXT, b"%d" % i) for i in range(n)]


async def test_conn_writes_shared_frame_bytes_when_socket_has_room() -> None:
    wire = FakeWire()
    conn = make_conn(wire)
    frame = encode_frame(OP_TEXT, b"x")
    conn.write_broadcast(frame, OP_TEXT, b"x")
    assert wire.frames == [frame] and wire.frames[0] is frame
    assert conn.stats == tether.SendStats(queued=0, dropped=0, sent=1)


async def test_paused_conn_queues_then_flushes_in_order_on_resume() -> None:
    wire = FakeWire()
    conn = make_conn(wire, max_send_queue=8)
    conn.on_pause_writing()
    for f in frames(5):
        conn.write_broadcast(*f)
    assert wire.frames == [] and conn.stats.queued == 5
    conn.on_resume_writing()
    assert wire.frames == [f[0] for f in frames(5)]
    assert conn.stats == tether.SendStats(queued=0, dropped=0, sent=5)


async def test_full_queue_drop_oldest_keeps_newest_and_counts_drops() -> None:
    wire = FakeWire()
    conn = make_conn(wire, max_send_queue=3)
    conn.on_pause_writing()
    for f in frames(10):
        conn.write_broadcast(*f)
    assert conn.stats == tether.SendStats(queued=3, dropped=7, sent=0)
    conn.on_resume_writing()
    assert wire.frames == [f[0] for f in frames(10)[-3:]]


async def test_full_queue_close_policy_closes_slow_consumer_with_1013() -> None:
    wire = FakeWire()
    conn = make_conn(wire, max_send_queue=2, send_overflow=tether.Overflow.CLOSE)
    conn.on_pause_writing()
    for f in frames(3):
        conn.write_broadcast(*f)
    assert wire.closes == [(1013, "try again later")]
    assert conn.state is tether.ConnState.CLOSING and conn.stats.queued == 0
    conn.write_broadcast(*frames(1)[0])  # closing: ignored, no error
    conn.on_lost()


async def test_zero_send_queue_drops_everything_while_paused() -> None:
    wire = FakeWire()
    conn = make_conn(wire, max_send_queue=0)
    conn.on_pause_writing()
    conn.write_broadcast(*frames(1)[0])
    assert conn.stats == tether.SendStats(queued=0, dropped=1, sent=0)


async def test_resume_stops_flushing_when_socket_fills_again() -> None:
    wire = FakeWire()
    conn = make_conn(wire, max_send_queue=8)
    conn.on_pause_writing()
    for f in frames(4):
        conn.write_broadcast(*f)
    wire.on_frame = lambda: len(wire.frames) == 2 and conn.on_pause_writing()
    conn.on_resume_writing()
    assert len(wire.frames) == 2 and conn.stats.queued == 2


def test_server_refuses_unknown_overflow_policy() -> None:
    with pytest.raises(ValueError):
        tether.Server({"/": lambda conn: asyncio.sleep(0)}, send_overflow="block")


# -- rooms over sockets, in-process ------------------------------------------------------------


def chat_app(**kw: Any) -> tether.App:
    app = tether.App(**kw)

    @app.on_connect
    async def hello(conn: tether.Conn) -> None:
        room = conn.query.get("room")
        if room:
            await conn.join(room, {"name": conn.query.get("name")}, presence=conn.query.get("quiet") != "1")

    @app.on("say")
    async def say(conn: tether.Conn, data: dict[str, Any]) -> int:
        return await app.broadcast(data["room"], "said", data["text"], exclude=conn if data.get("exclude") else None)

    @app.on("rooms")
    def rooms(conn: tether.Conn) -> list[str]:
        return sorted(conn.rooms)

    return app


async def test_broadcast_reaches_each_member_once_and_skips_excluded(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": chat_app()})
    async with timeout(10):
        peers = await open_peers(url(server), 3, room="lobby", quiet="1")
        outsider = await Peer.open(url(server), name="out")
        assert await peers[0].request("say", {"room": "lobby", "text": "hi", "exclude": True}) == 2
        assert await peers[0].request("say", {"room": "lobby", "text": "all"}) == 3
        for peer in peers[1:]:
            said = await peer.event("said")
            assert said == {"type": "said", "data": "hi", "room": "lobby", "off": said["off"]}
        for peer in peers:
            assert (await peer.event("said"))["data"] == "all"
        assert [e for p in peers for e in p.events if e["type"] == "said"] == []
        assert await outsider.request("rooms") == []
        assert outsider.events == []


async def test_server_hub_hands_every_receiver_the_same_bytes(make_server: ServerFactory) -> None:
    # Encoded once: every member's send gets the one payload object (picows adds the header).
    server = await make_server({"/socket": chat_app()})
    async with timeout(10):
        peers = await open_peers(url(server), 3, room="r", quiet="1")
        handed: list[bytes] = []
        for member in server.hub.local("r"):
            send = member._transport._transport.send  # what the listener handed the Conn

            def spy(opcode: int, payload: bytes, send: Any = send) -> None:
                handed.append(payload)
                send(opcode, payload)

            member.write_directly(spy)
        await server.hub.broadcast("r", "t", {"n": 1})
        assert len(handed) == 3 and handed[0] is handed[1] is handed[2]
        for peer in peers:
            assert (await peer.event("t"))["data"] == {"n": 1}


async def test_closed_connection_leaves_every_room_and_presence(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": chat_app()})
    async with timeout(10):
        a = await Peer.open(url(server), name="a", room="lobby")
        b = await Peer.open(url(server), name="b", room="lobby")
        assert sorted(m.meta["name"] for m in await server.hub.presence("lobby")) == ["a", "b"]
        a_id = server.hub.local("lobby")[0].hub.member_id(server.hub.local("lobby")[0])  # type: ignore[union-attr]
        await a.close()
        leave = await b.event("presence")
        while leave["data"]["event"] != "leave":
            leave = await b.event("presence")
        assert leave["room"] == "lobby" and leave["data"]["id"] == a_id
        assert [m.meta["name"] for m in await server.hub.presence("lobby")] == ["b"]
        assert len(server.hub.local("lobby")) == 1


async def test_presence_join_event_carries_member_id_and_meta(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": chat_app()})
    async with timeout(10):
        a = await Peer.open(url(server), name="a", room="lobby")
        b = await Peer.open(url(server), name="b", room="lobby")
        event = await a.event("presence")  # the joiner itself gets no event about itself
        assert event["data"]["event"] == "join" and event["data"]["meta"] == {"name": "b"}
        assert event["data"]["id"] == server.hub.member_id(server.hub.local("lobby")[1])
        assert event["data"]["id"].startswith(server.hub.node + ".")
        assert [e for e in a.events + b.events if e["type"] == "presence"] == []


async def test_client_cannot_join_without_on_join_hook(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": chat_app()})
    async with timeout(10):
        peer = await Peer.open(url(server), name="a")
        with pytest.raises(tether.ReplyError) as exc:
            await peer.request("join", {"room": "lobby"})
        assert exc.value.code == "forbidden"
        assert await peer.request("rooms") == []


async def test_client_join_leave_through_on_join_hook(make_server: ServerFactory) -> None:
    app = chat_app()

    @app.on_join
    def decide(conn: tether.Conn, room: str, meta: Any) -> Any:
        if room == "secret":
            return False
        if room == "vip":
            raise tether.ReplyError("vip_only", "members only")
        return {"name": conn.query["name"], "said": meta}

    server = await make_server({"/socket": app})
    async with timeout(10):
        peer = await Peer.open(url(server), name="ann")
        reply = await peer.request("join", {"room": "lobby", "meta": "hello"})
        assert reply["room"] == "lobby" and reply["presence"] == [{"id": reply["id"], "meta": {"name": "ann", "said": "hello"}}]
        assert await peer.request("presence", {"room": "lobby"}) == reply["presence"]
        for room, code in [("secret", "forbidden"), ("vip", "vip_only")]:
            with pytest.raises(tether.ReplyError) as exc:
                await peer.request("join", {"room": room})
            assert exc.value.code == code
        with pytest.raises(tether.ReplyError) as exc:
            await peer.request("presence", {"room": "secret"})
        assert exc.value.code == "forbidden"
        assert await peer.request("rooms") == ["lobby"]
        assert await peer.request("leave", {"room": "lobby"}) is None
        assert await peer.request("rooms") == []
        assert await server.hub.presence("lobby") == []


async def test_client_join_beyond_max_rooms_replies_too_many_rooms(make_server: ServerFactory) -> None:
    app = chat_app()
    app.on_join(lambda conn, room, meta: True)
    server = await make_server({"/socket": app}, max_rooms=2)
    async with timeout(10):
        peer = await Peer.open(url(server), name="ann")
        for room in ("a", "b", "a"):  # joining a room it is in already does not count twice
            assert (await peer.request("join", {"room": room}))["room"] == room
        with pytest.raises(tether.ReplyError) as exc:
            await peer.request("join", {"room": "c"})
        assert exc.value.code == "too_many_rooms"
        assert await peer.request("leave", {"room": "a"}) is None
        assert (await peer.request("join", {"room": "c"}))["room"] == "c"  # the connection is still fine
        assert sorted(await peer.request("rooms")) == ["b", "c"]


async def test_app_cannot_register_reserved_room_types() -> None:
    app = tether.App()
    for name in ("join", "leave", "presence"):
        with pytest.raises(ValueError):
            app.on(name)


async def test_plain_handler_uses_server_hub_with_raw_messages(make_server: ServerFactory) -> None:
    async def handler(conn: tether.Conn) -> None:
        await conn.join("raw", presence=False)
        async for message in conn:
            await server.hub.send("raw", message, exclude=conn)

    server = await make_server({"/socket": handler})
    async with timeout(10):
        a = await tether.connect(url(server))
        b = await tether.connect(url(server))
        await eventually(lambda: _ready(server.hub, "raw", 2), 5, "both joined")
        await a.send(b"\x01bin")
        assert await b.receive() == b"\x01bin"
        await a.close()
        await b.close()


async def _ready(hub: tether.Hub, room: str, n: int) -> bool:
    return len(hub.local(room)) == n


async def test_two_hubs_on_a_shared_memory_bus_deliver_once_per_member(make_server: ServerFactory) -> None:
    bus = tether.MemoryBus()
    s1 = await make_server({"/socket": chat_app()}, broker=tether.MemoryBroker(bus))
    s2 = await make_server({"/socket": chat_app()}, broker=tether.MemoryBroker(bus))
    async with timeout(10):
        p1 = await open_peers(url(s1), 2, room="lobby")
        p2 = await open_peers(url(s2), 2, room="lobby", prefix="q")
        assert len(await s1.hub.presence("lobby")) == 4
        assert await p1[0].request("say", {"room": "lobby", "text": "one"}) == 2
        assert await p1[0].request("say", {"room": "lobby", "text": "two"}) == 2
        for peer in p1 + p2:
            said = [(await peer.event("said"))["data"] for _ in range(2)]
            assert said == ["one", "two"]  # "two" right after "one": no duplicate of "one"


# -- a slow consumer among 1,000 ---------------------------------------------------------------

N_CONNS = 1000
N_MSGS = 300
SIZE = 2000
#: Every "blast" frame has the same size but for its offset (rooms_app pads the counter), so
#: readers count bytes.
BLAST = encode_message("blast", {"i": "00000", "body": "x" * SIZE}, room="all")
BLAST_FRAME = len(encode_frame(OP_TEXT, BLAST))


def blast_bytes(after: int, n: int) -> int:
    """Bytes of ``n`` blast frames of room "all" with offsets after ``after``."""
    return sum(len(encode_frame(OP_TEXT, with_offset(BLAST, offset))) for offset in range(after + 1, after + n + 1))


async def _raw_member(port: int, name: str) -> RawWS:
    ws = await RawWS.open(port, f"/socket?name={name}&room=all&quiet=1")
    assert ws.status == 101
    opcode, _, welcome = await ws.recv_frame()
    assert b'"welcome"' in welcome
    return ws


async def _receive_bytes(ws: RawWS, total: int) -> None:
    got = 0
    while got < total:
        chunk = await ws.reader.read(1 << 16)
        assert chunk, "server closed a fast reader"
        got += len(chunk)
    assert got == total


async def _raw_members(port: int, n: int) -> list[RawWS]:
    members: list[RawWS] = []
    for start in range(0, n, 50):  # the listen backlog is finite
        members += await asyncio.gather(*(_raw_member(port, f"f{i}") for i in range(start, min(n, start + 50))))
    return members


@pytest.mark.parametrize("policy", ["drop_oldest", "close"])
async def test_slow_consumer_in_room_of_1000_is_capped_and_others_get_everything(
    app_processes: Any, policy: str
) -> None:
    server: AppProcess = app_processes("memory", "--max-send-queue", "64", "--overflow", policy)
    fast: list[RawWS] = []
    slow = await RawWS.open(server.port, "/socket?name=slow&room=all&quiet=1", rcvbuf=4096)
    try:
        async with timeout(60):
            fast = await _raw_members(server.port, N_CONNS - 1)
            control = await Peer.open(server.url, name="control")
            # Fill the slow one's socket buffers first, through a room of its own.
            assert await control.request("join_slow", {"name": "slow", "room": "solo"}) is None
            assert await control.request("blast", {"room": "solo", "n": 2000, "size": SIZE}) == 2000
            before = await control.request("stats", {"name": "slow"})
            rss_before = await control.request("rss")
            head = await control.request("position", {"room": "all"})
            readers = [asyncio.ensure_future(_receive_bytes(ws, blast_bytes(head, N_MSGS))) for ws in fast]
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await control.request("blast", {"room": "all", "n": N_MSGS, "size": SIZE}) == N_MSGS
            await asyncio.gather(*readers)
            elapsed = loop.time() - started
            stats = await control.request("stats", {"name": "slow"})
            rss_after = await control.request("rss")
            await control.close()
    finally:
        for ws in [slow, *fast]:
            ws.abort()
    deliveries = N_MSGS * (N_CONNS - 1)
    print(
        f"\n{policy}: {N_MSGS} x {BLAST_FRAME} B to {N_CONNS - 1} readers in {elapsed:.2f}s"
        f" ({deliveries / elapsed:,.0f} deliveries/s); slow {before} -> {stats}; RSS {rss_before} -> {rss_after} KiB"
    )
    if policy == "drop_oldest":
        assert stats["state"] == "OPEN" and stats["queued"] == 64 and stats["dropped"] >= N_MSGS
        assert stats["sent"] + stats["queued"] + stats["dropped"] == N_MSGS + 2000
    else:
        assert before["state"] in ("CLOSING", "CLOSED", "gone")
    # Queued frames are shared with every other receiver: the slow one costs references only.
    assert rss_after - rss_before < 20_000, (rss_before, rss_after)
