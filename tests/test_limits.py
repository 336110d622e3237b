"""Limits over real sockets: message size, handshake timeout (slowloris, idle TCP), request
header size, connection count, message rate, and the typed app's reactions to bad input.

Every hostile case ends by checking that a fresh, well-behaved client is still served; the
attacks that last a while (slowloris, rate limiting) also check that clients connected
meanwhile keep getting replies. The reactions are the ones listed in docs/security.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec
import pytest

import tether
from conftest import TIMEOUT_SCALE, ServerFactory, assert_serves, echo, timeout, url
from rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, RawWS, close_payload

# -- max_message_size ------------------------------------------------------------------------


def test_server_default_limits_are_the_documented_ones() -> None:
    server = tether.Server({"/socket": echo})
    s = server.settings
    assert (s.max_message_size, s.handshake_timeout) == (1 << 20, 5.0)
    policy = server.policy
    assert (policy.max_connections, policy.rate_limit, policy.allowed_origins, policy.auth) == (None, None, None, None)
    assert (s.conn.max_queue, s.conn.close_timeout, s.conn.ping_interval, s.conn.ping_timeout) == (32, 5.0, 20.0, 20.0)
    assert (server.shutdown_timeout, server.shutdown_spread) == (10.0, 5.0)


async def test_server_default_limit_closes_1009_past_one_mib(echo_server: tether.Server) -> None:
    """[10.4] Default max_message_size is 1 MiB: a frame header declaring 1 MiB + 1 is enough."""
    ws = await RawWS.open(echo_server.port)
    ws.writer.write(ws.frame(OP_BINARY, b"", length=(1 << 20) + 1))
    async with timeout(5):
        assert await ws.close_code() == 1009
    await ws.aclose()
    await assert_serves(echo_server)


async def test_server_default_limit_echoes_one_mib(echo_server: tether.Server) -> None:
    data = bytes(range(256)) * ((1 << 20) // 256)
    async with timeout(10), tether.connect(url(echo_server)) as conn:
        await conn.send(data)
        assert await conn.receive() == data


async def test_server_configured_limit_closes_1009_one_byte_over(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, max_message_size=1000)
    async with timeout(5), tether.connect(url(server)) as conn:
        await conn.send("x" * 1000)
        assert await conn.receive() == "x" * 1000
        await conn.send("x" * 1001)
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert info.value.code == 1009
    await assert_serves(server)


async def test_server_without_limit_accepts_4_mib(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, max_message_size=None)
    data = b"\x01" * (4 << 20)
    async with timeout(10), tether.connect(url(server), max_message_size=None) as conn:
        await conn.send(data)
        assert await conn.receive() == data


# -- handshake timeout ---------------------------------------------------------------------

HANDSHAKE_TIMEOUT = 0.5


@pytest.fixture
async def impatient(make_server: ServerFactory) -> tether.Server:
    return await make_server({"/socket": echo}, handshake_timeout=HANDSHAKE_TIMEOUT)


async def cut_after(ws: RawWS, start: float) -> float:
    """Seconds from ``start`` until the server closes TCP (discarding anything it sends)."""
    async with timeout(HANDSHAKE_TIMEOUT + 5):
        try:
            await ws.eof()
        except ConnectionResetError:  # the server closed with our bytes unread: RST, also a cut
            pass
    return time.monotonic() - start


async def test_server_slowloris_trickling_headers_is_cut_at_handshake_timeout(impatient: tether.Server) -> None:
    """A client that sends a header line every 50 ms and never the blank line is dropped at
    handshake_timeout (the timer counts from the TCP accept, not from the last byte), while a
    client connecting meanwhile is served."""
    start = time.monotonic()
    ws = await RawWS.connect(impatient.port)
    ws.writer.write(b"GET /socket HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def trickle() -> None:
        for i in range(1000):
            await asyncio.sleep(0.05)  # the attacker's pace, not a wait for a condition
            ws.writer.write(b"X-Slow-%d: x\r\n" % i)

    attack = asyncio.create_task(trickle())
    try:
        cut = asyncio.create_task(cut_after(ws, start))
        await assert_serves(impatient)
        elapsed = await cut
    finally:
        attack.cancel()
    assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed < HANDSHAKE_TIMEOUT + 2 * TIMEOUT_SCALE
    ws.abort()
    await assert_serves(impatient)


async def test_server_idle_tcp_without_a_byte_is_cut_at_handshake_timeout(impatient: tether.Server) -> None:
    idle = [(time.monotonic(), await RawWS.connect(impatient.port)) for _ in range(20)]
    cuts = [asyncio.create_task(cut_after(ws, start)) for start, ws in idle]
    await assert_serves(impatient)
    for elapsed in await asyncio.gather(*cuts):
        assert HANDSHAKE_TIMEOUT * 0.9 <= elapsed < HANDSHAKE_TIMEOUT + 2 * TIMEOUT_SCALE
    for _, ws in idle:
        ws.abort()
    await assert_serves(impatient)


async def test_server_handshake_timeout_does_not_cut_open_connections(impatient: tether.Server) -> None:
    """The timer stops at the upgrade: a connection older than handshake_timeout still works."""
    async with timeout(5), tether.connect(url(impatient)) as conn:
        await asyncio.sleep(HANDSHAKE_TIMEOUT * 2)  # let the timeout pass; nothing to wait for
        await conn.send("still here")
        assert await conn.receive() == "still here"


# -- request header size --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"X-Big": "a" * 9000}, 431, id="line_9000_bytes"),  # picows alone: 101
        pytest.param({f"X-H{i}": "v" for i in range(101)}, 431, id="101_headers"),  # tether's limit: 100
        pytest.param({f"X-H{i}": "v" for i in range(200)}, 400, id="200_headers"),  # picows: > 128
    ],
)
@pytest.mark.parametrize("path", ["/socket", "/health"])
async def test_server_oversized_request_headers_refused_4xx(echo_server: tether.Server, headers: dict[str, str], expected: int, path: str) -> None:
    ws = await RawWS.connect(echo_server.port)
    async with timeout(5):
        assert await ws.handshake(path, headers) == expected  # type: ignore[arg-type]
    assert ws.headers.get("upgrade") is None
    await ws.aclose()
    await assert_serves(echo_server)


async def test_server_request_head_over_16_kib_is_dropped_without_upgrade(echo_server: tether.Server) -> None:
    """picows stops reading a request head at 16 KiB and drops the connection."""
    ws = await RawWS.connect(echo_server.port)
    ws.writer.write(b"GET /socket HTTP/1.1\r\n" + b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 4000) for i in range(5)))
    async with timeout(5):
        try:
            head = await ws.reader.read()
        except ConnectionResetError:
            head = b""
    assert b"101" not in head
    ws.abort()
    await assert_serves(echo_server)


async def test_server_headers_at_the_limits_are_accepted(echo_server: tether.Server) -> None:
    headers = {f"X-H{i}": "v" for i in range(90)} | {"X-Big": "a" * 8000}
    ws = await RawWS.connect(echo_server.port)
    async with timeout(5):
        assert await ws.handshake("/socket", headers) == 101  # type: ignore[arg-type]
    await ws.aclose()


# -- max_connections ------------------------------------------------------------------------


async def test_server_over_max_connections_503_with_retry_after_others_unaffected(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, max_connections=3)
    async with timeout(5):
        conns = [await tether.connect(url(server)) for _ in range(3)]
        for _ in range(5):
            ws = await RawWS.open(server.port)
            assert ws.status == 503
            assert ws.headers["retry-after"] == "1"
            await ws.aclose()
        for i, conn in enumerate(conns):
            await conn.send(f"m{i}")
            assert await conn.receive() == f"m{i}"
        await conns[0].close()
        while len(server.connections) > 2:  # the server forgets it once its handler ended
            await asyncio.sleep(0)
    await assert_serves(server)
    for conn in conns[1:]:
        await conn.close()


# -- rate limit -----------------------------------------------------------------------------

# A bucket that never refills within a test: exactly `burst` messages pass.
SLOW = tether.RateLimit(rate=0.001, burst=3)


class Add(msgspec.Struct):
    a: int
    b: int


def typed_app() -> tether.App:
    app = tether.App()

    @app.on("add")
    def add(conn: tether.Conn, data: Add) -> int:
        return data.a + data.b

    return app


async def receive_json(conn: tether.Conn) -> dict[str, Any]:
    async with timeout(5):
        message = await conn.receive()
    assert isinstance(message, str)
    result: dict[str, Any] = json.loads(message)
    return result


async def open_typed(server: tether.Server, path: str = "/app") -> tether.Conn:
    conn = await tether.connect(url(server, path))
    assert (await receive_json(conn))["type"] == "welcome"
    return conn


async def assert_app_serves(server: tether.Server, path: str = "/app") -> None:
    """A fresh typed client gets a reply from ``server``."""
    conn = await open_typed(server, path)
    await conn.send('{"type": "add", "data": {"a": 40, "b": 2}, "id": 1}')
    assert await receive_json(conn) == {"type": "reply", "data": 42, "id": 1}
    await conn.close()


def add(id: int) -> str:
    return json.dumps({"type": "add", "data": {"a": id, "b": 1}, "id": id})


async def test_server_rate_limited_typed_app_error_replies_then_1008(make_server: ServerFactory) -> None:
    server = await make_server({"/app": typed_app()}, rate_limit=SLOW)
    other = await open_typed(server)
    conn = await open_typed(server)
    for i in range(6):
        await conn.send(add(i))
    got = [await receive_json(conn) for _ in range(5)]
    assert [m["type"] for m in got[:3]] == ["reply"] * 3
    # Each rejected request is answered at once, with its id: it does not wait for its timeout.
    error = {"code": "rate_limited", "message": "too many messages: slow down"}
    assert got[3:] == [{"type": "error", "data": error, "id": 3}, {"type": "error", "data": error, "id": 4}]
    with pytest.raises(tether.ConnectionClosedError) as info:
        await receive_json(conn)
    assert (info.value.code, info.value.reason) == (1008, "rate limit exceeded")
    # The other connection has its own bucket.
    await other.send(add(7))
    assert await receive_json(other) == {"type": "reply", "data": 8, "id": 7}
    await other.close()
    await assert_app_serves(server)


async def test_server_rate_limited_plain_handler_closes_1008_at_once(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, rate_limit=SLOW)
    async with timeout(5), tether.connect(url(server)) as other, tether.connect(url(server)) as conn:
        for i in range(3):
            await conn.send(f"m{i}")
            assert await conn.receive() == f"m{i}"
        await conn.send("one too many")
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
        assert info.value.code == 1008
        await other.send("unaffected")
        assert await other.receive() == "unaffected"
    await assert_serves(server)


async def test_server_rate_limit_refills_over_time(make_server: ServerFactory) -> None:
    """A client that keeps to the rate is never limited (100/s, burst 2: 10 messages 20 ms apart)."""
    server = await make_server({"/socket": echo}, rate_limit=tether.RateLimit(rate=100, burst=2))
    async with timeout(5), tether.connect(url(server)) as conn:
        for i in range(10):
            await conn.send(f"m{i}")
            assert await conn.receive() == f"m{i}"
            await asyncio.sleep(0.02)  # the client's pace
    assert conn.close_code == 1000


def test_rate_limit_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        tether.RateLimit(rate=0, burst=1)
    with pytest.raises(ValueError):
        tether.RateLimit(rate=1, burst=0)


# -- the typed app's reactions, from a raw client ---------------------------------------------


@pytest.fixture
async def app_server(make_server: ServerFactory) -> tether.Server:
    return await make_server({"/app": typed_app()})


async def raw_typed(server: tether.Server) -> RawWS:
    ws = await RawWS.open(server.port, "/app")
    assert ws.status == 101
    async with timeout(5):
        opcode, _, payload = await ws.recv_frame()
    assert opcode == OP_TEXT and json.loads(payload)["type"] == "welcome"
    return ws


@pytest.mark.parametrize(
    ("opcode", "payload", "code"),
    [
        pytest.param(OP_TEXT, b'{"type": "add", "data": "caf\xc3"}', 1007, id="invalid_utf8"),
        pytest.param(OP_BINARY, b'{"type": "add", "data": {"a": 1, "b": 2}, "id": 1}', 1003, id="binary"),
    ],
)
async def test_typed_app_receives_bad_frame_closes(app_server: tether.Server, opcode: int, payload: bytes, code: int) -> None:
    ws = await raw_typed(app_server)
    await ws.send_frame(opcode, payload)
    async with timeout(5):
        assert (await ws.close_frame())[0] == code
        await ws.send_frame(OP_CLOSE, close_payload(code))  # 1003 is a closing handshake
        assert await ws.eof()
    await ws.aclose()
    await assert_app_serves(app_server)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        pytest.param(b'{"type": "add", "id": 3, "data": {"a": 1,', {"code": "bad_json"}, id="bad_json"),
        pytest.param(b"[]", {"code": "bad_envelope"}, id="bad_envelope"),
        pytest.param(b'{"type": "nope", "id": 3}', {"code": "unknown_type", "id": 3}, id="unknown_type"),
        pytest.param(b'{"type": "add", "id": 3, "data": {"a": "x", "b": 1}}', {"code": "invalid_data", "id": 3, "path": "$.data.a"}, id="invalid_data"),
    ],
)
async def test_typed_app_receives_bad_message_error_reply_and_stays_open(app_server: tether.Server, payload: bytes, error: dict[str, Any]) -> None:
    ws = await raw_typed(app_server)
    await ws.send_frame(OP_TEXT, payload)
    async with timeout(5):
        opcode, _, reply = await ws.recv_frame()
    message = msgspec.json.decode(reply)
    assert opcode == OP_TEXT and message["type"] == "error"
    assert message["data"]["code"] == error["code"]
    assert message.get("id") == error.get("id")
    assert message["data"].get("path") == error.get("path")
    # The same connection still works, and so does a fresh one.
    await ws.send_frame(OP_TEXT, add(5).encode())
    async with timeout(5):
        _, _, reply = await ws.recv_frame()
    assert json.loads(reply) == {"type": "reply", "data": 6, "id": 5}
    await ws.aclose()
    await assert_app_serves(app_server)


# -- ping flood -------------------------------------------------------------------------------


def rss() -> int:
    """Resident set size of this process (the server runs in it) in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_server_20000_pings_whose_pongs_are_never_read_memory_bounded(echo_server: tether.Server) -> None:
    """[5.5.2] 20,000 pings of 125 bytes from a client that never reads its pongs: the server
    stays responsive to others and its memory grows by no more than a few MiB (the pongs
    waiting in its write buffer: 20,000 x 127 bytes = 2.4 MiB at most)."""
    ws = await RawWS.open(echo_server.port, rcvbuf=4096)
    assert ws.status == 101
    before = rss()
    payload = b"p" * 125
    frames = [ws.frame(OP_PING, payload) for _ in range(1000)]
    for _ in range(20):
        ws.writer.write(b"".join(frames))
        async with timeout(10):
            await ws.writer.drain()
        await assert_serves(echo_server)
    grown = rss() - before
    assert grown < 16 << 20, f"RSS grew by {grown >> 20} MiB"
    ws.abort()
    await assert_serves(echo_server)


# -- close timeout ----------------------------------------------------------------------------


async def test_server_closing_peer_that_never_answers_drops_tcp_after_close_timeout(make_server: ServerFactory) -> None:
    async def brief(conn: tether.Conn) -> None:
        return  # close with 1000 at once

    server = await make_server({"/socket": brief, "/echo": echo}, close_timeout=0.3)
    ws = await RawWS.open(server.port)
    start = time.monotonic()
    async with timeout(5):
        assert (await ws.close_frame())[0] == 1000
        assert await ws.eof()  # we never answer the close frame
    assert 0.25 <= time.monotonic() - start < 0.3 + 2 * TIMEOUT_SCALE
    await ws.aclose()
    await assert_serves(server, "/echo")
