"""Replies to the frames of one read leave in one write (server side, picows transport)."""

from __future__ import annotations

import json
from typing import Any

import tether
from conftest import timeout
from rawws import RawWS


class _CountingTransport:
    """Wraps the server's asyncio transport to count write() calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.writes = inner, 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _app(counters: list[_CountingTransport]) -> tether.App:
    app = tether.App()

    @app.on_connect
    def wrap(conn: tether.Conn) -> None:
        counter = _CountingTransport(conn._transport._raw)  # type: ignore[attr-defined]
        conn._transport._raw = counter  # type: ignore[attr-defined]
        counters.append(counter)

    @app.on("echo")
    async def echo(conn: tether.Conn, n: int) -> None:
        await conn.emit("echo", n)

    @app.on("add")
    def add(conn: tether.Conn, data: list[int]) -> int:
        return sum(data)

    return app


async def test_server_writes_replies_to_one_read_in_one_write(make_server) -> None:
    counters: list[_CountingTransport] = []
    server = await make_server({"/app": _app(counters)})
    async with timeout(10):
        ws = await RawWS.open(server.port, "/app")
        assert json.loads((await ws.recv_frame())[2])["type"] == "welcome"
        frames = [ws.frame(1, json.dumps({"type": "echo", "data": i}).encode()) for i in range(16)]
        frames.append(ws.frame(1, json.dumps({"type": "add", "data": [1, 2], "id": 7}).encode()))
        ws.writer.write(b"".join(frames))  # one write: the server reads them together
        replies = [json.loads((await ws.recv_frame())[2]) for _ in range(17)]
        await ws.aclose()
    assert replies[:16] == [{"type": "echo", "data": i} for i in range(16)]
    assert replies[16] == {"type": "reply", "data": 3, "id": 7}
    # 17 replies, one write (two if the kernel split our write across two reads).
    assert 1 <= counters[0].writes <= 2


async def test_server_uncorked_single_message_and_close_keep_order(make_server) -> None:
    counters: list[_CountingTransport] = []
    server = await make_server({"/app": _app(counters)})
    async with timeout(10):
        ws = await RawWS.open(server.port, "/app")
        await ws.recv_frame()
        ws.writer.write(ws.frame(1, b'{"type": "echo", "data": 1}') + ws.frame(8, b"\x03\xe8"))
        opcode, _, payload = await ws.recv_frame()
        assert (opcode, json.loads(payload)) == (1, {"type": "echo", "data": 1})  # the reply before the close
        opcode, _, payload = await ws.recv_frame()
        assert (opcode, payload[:2]) == (8, b"\x03\xe8")
        await ws.aclose()


async def test_a_broadcast_while_corked_keeps_its_place_among_the_replies(make_server) -> None:
    # While a read's frames are handled, replies are held for one write; a broadcast to the
    # sender (or any write to it) must wait with them, not overtake them (picows writes
    # directly only while nothing is held).
    app = tether.App()

    @app.on_connect
    async def join(conn: tether.Conn) -> None:
        await conn.join("r", presence=False)

    @app.on("echo")
    async def echo(conn: tether.Conn, n: int) -> None:
        await conn.emit("echo", n)

    @app.on("shout")
    async def shout(conn: tether.Conn, n: int) -> None:
        await app.broadcast("r", "shout", n)

    server = await make_server({"/app": app})
    async with timeout(10):
        ws = await RawWS.open(server.port, "/app")
        assert json.loads((await ws.recv_frame())[2])["type"] == "welcome"
        sent = [("echo", 0), ("shout", 1), ("echo", 2), ("shout", 3), ("echo", 4)]
        ws.writer.write(b"".join(ws.frame(1, json.dumps({"type": t, "data": n}).encode()) for t, n in sent))
        got = [json.loads((await ws.recv_frame())[2]) for _ in sent]
        await ws.aclose()
    assert [(m["type"], m["data"]) for m in got] == sent
