"""Hostile input over a real socket, byte by byte, from a hand-written RFC 6455 client.

Each case checks the server's reaction (close code, RFC 6455 section in the test's docstring)
and then that the same server still serves a fresh, well-behaved client.
"""

from __future__ import annotations

import asyncio

import pytest

import tether
from conftest import ServerFactory, assert_serves, echo, timeout
from rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWS, close_payload

LIMIT = 64 * 1024


@pytest.fixture
async def server(make_server: ServerFactory) -> tether.Server:
    return await make_server({"/socket": echo}, max_message_size=LIMIT)


async def raw(server: tether.Server) -> RawWS:
    ws = await RawWS.open(server.port)
    assert ws.status == 101
    return ws


async def expect_close(server: tether.Server, ws: RawWS, code: int) -> None:
    """The server sends a close frame with ``code``, drops TCP, and still serves others."""
    async with timeout(5):
        assert await ws.close_code() == code
    await ws.aclose()
    await assert_serves(server)


async def test_server_receives_invalid_utf8_text_closes_1007(server: tether.Server) -> None:
    """[8.1] Invalid UTF-8 in a text message fails the connection with 1007."""
    ws = await raw(server)
    await ws.send_frame(OP_TEXT, b"caf\xc3")
    await expect_close(server, ws, 1007)


async def test_server_receives_invalid_utf8_in_first_fragment_closes_1007_before_final(server: tether.Server) -> None:
    """[8.1] Fail fast: 1007 as soon as a fragment cannot be the start of valid UTF-8,
    without waiting for the final fragment (which is never sent)."""
    ws = await raw(server)
    await ws.send_frame(OP_TEXT, "κόσμε".encode(), fin=False)
    await ws.send_frame(OP_CONT, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80", fin=False)
    await expect_close(server, ws, 1007)


async def test_server_receives_utf8_split_across_fragments_reassembles(server: tether.Server) -> None:
    """A valid code point split between two fragments is not an error [5.4, 8.1]."""
    ws = await raw(server)
    data = "€uro".encode()
    await ws.send_frame(OP_TEXT, data[:1], fin=False)
    await ws.send_frame(OP_CONT, data[1:2], fin=False)
    await ws.send_frame(OP_CONT, data[2:])
    async with timeout(5):
        assert await ws.recv_frame() == (OP_TEXT, True, data)
    await ws.aclose()


async def test_server_receives_surrogate_split_across_fragments_closes_1007_before_final(server: tether.Server) -> None:
    """ED A0.. can never become valid UTF-8 (a UTF-16 surrogate): 1007 after the 2nd byte."""
    ws = await raw(server)
    await ws.send_frame(OP_TEXT, b"ok\xed", fin=False)
    await ws.send_frame(OP_CONT, b"\xa0", fin=False)
    await expect_close(server, ws, 1007)


@pytest.mark.parametrize("rsv", [4, 2, 1])
async def test_server_receives_reserved_bit_closes_1002(server: tether.Server, rsv: int) -> None:
    """[5.2] RSV1-3 must be 0: no extension is negotiated."""
    ws = await raw(server)
    await ws.send_frame(OP_TEXT, b"hello", rsv=rsv)
    await expect_close(server, ws, 1002)


async def test_server_receives_reserved_bit_on_binary_closes_1002(server: tether.Server) -> None:
    ws = await raw(server)
    await ws.send_frame(OP_BINARY, b"\x00\x01", rsv=4)
    await expect_close(server, ws, 1002)


async def test_server_receives_continuation_without_start_closes_1002(server: tether.Server) -> None:
    """[5.4] A continuation frame must follow a non-final data frame."""
    ws = await raw(server)
    await ws.send_frame(OP_CONT, b"orphan")
    await expect_close(server, ws, 1002)


async def test_server_receives_text_during_fragmented_message_closes_1002(server: tether.Server) -> None:
    """[5.4] Fragments of one message must not be interleaved with another data message."""
    ws = await raw(server)
    await ws.send_frame(OP_BINARY, b"part one", fin=False)
    await ws.send_frame(OP_TEXT, b"intruder")
    await expect_close(server, ws, 1002)


@pytest.mark.parametrize("opcode", [3, 7, 0xB, 0xF])
async def test_server_receives_reserved_opcode_closes_1002(server: tether.Server, opcode: int) -> None:
    """[5.2] Opcodes 3-7 and B-F are reserved."""
    ws = await raw(server)
    await ws.send_frame(opcode, b"?")
    await expect_close(server, ws, 1002)


async def test_server_receives_fragmented_ping_closes_1002(server: tether.Server) -> None:
    """[5.5] Control frames must not be fragmented."""
    ws = await raw(server)
    await ws.send_frame(OP_PING, b"a", fin=False)
    await expect_close(server, ws, 1002)


async def test_server_receives_unmasked_frame_closes_1002(server: tether.Server) -> None:
    """[5.1] A client must mask every frame it sends."""
    ws = await raw(server)
    await ws.send_frame(OP_TEXT, b"plain", mask=False)
    await expect_close(server, ws, 1002)


async def test_server_receives_header_over_limit_closes_1009_before_payload(server: tether.Server) -> None:
    """[10.4] The header alone (length > max_message_size) is enough: 1009 at once, while
    the client has sent nothing of the payload."""
    ws = await raw(server)
    ws.writer.write(ws.frame(OP_BINARY, b"", length=LIMIT + 1))
    await expect_close(server, ws, 1009)


async def test_server_receives_message_of_exactly_the_limit_echoes_it(server: tether.Server) -> None:
    ws = await raw(server)
    data = bytes(range(256)) * (LIMIT // 256)
    await ws.send_frame(OP_BINARY, data)
    async with timeout(5):
        assert await ws.recv_frame() == (OP_BINARY, True, data)
    await ws.aclose()


async def test_server_receives_fragments_summing_past_limit_closes_1009(server: tether.Server) -> None:
    """Each fragment is small; their sum crosses the limit: 1009 on the fragment that crosses."""
    ws = await raw(server)
    chunk = b"x" * 1000
    await ws.send_frame(OP_BINARY, chunk, fin=False)
    for _ in range(LIMIT // len(chunk)):
        await ws.send_frame(OP_CONT, chunk, fin=False)
    await expect_close(server, ws, 1009)


async def test_server_receives_many_text_fragments_summing_past_limit_closes_1009(server: tether.Server) -> None:
    ws = await raw(server)
    await ws.send_frame(OP_TEXT, b"", fin=False)
    for _ in range(LIMIT // 10 + 1):
        await ws.send_frame(OP_CONT, b"0123456789", fin=False)
    await expect_close(server, ws, 1009)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
async def test_server_receives_invalid_close_code_closes_1002(server: tether.Server, code: int) -> None:
    """[7.4.1, 7.4.2] Reserved, unassigned and never-sent codes are protocol errors."""
    ws = await raw(server)
    await ws.send_frame(OP_CLOSE, close_payload(code))
    await expect_close(server, ws, 1002)


async def test_server_receives_one_byte_close_payload_closes_1002(server: tether.Server) -> None:
    """[5.5.1] A close body starts with a 2-byte code."""
    ws = await raw(server)
    await ws.send_frame(OP_CLOSE, b"\x03")
    await expect_close(server, ws, 1002)


async def test_server_receives_close_reason_invalid_utf8_closes_1007(server: tether.Server) -> None:
    """[5.5.1, 8.1] The close reason is UTF-8."""
    ws = await raw(server)
    await ws.send_frame(OP_CLOSE, close_payload(1000, b"bye \xff"))
    await expect_close(server, ws, 1007)


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4999])
async def test_server_receives_valid_close_echoes_code(server: tether.Server, code: int) -> None:
    """[5.5.1] The server answers a close with the same code and then closes TCP [7.1.1]."""
    ws = await raw(server)
    await ws.send_frame(OP_CLOSE, close_payload(code, b"done"))
    await expect_close(server, ws, code)


async def test_server_receives_empty_close_answers_1000(server: tether.Server) -> None:
    """An empty close means 1005 (no status), which may not be sent back: answer 1000."""
    ws = await raw(server)
    await ws.send_frame(OP_CLOSE, b"")
    await expect_close(server, ws, 1000)


async def test_server_receives_fragmented_message_with_ping_interleaved(server: tether.Server) -> None:
    """[5.4] Control frames may come between fragments: the ping is answered (with its own
    payload [5.5.3]) and the message is reassembled."""
    ws = await raw(server)
    await ws.send_frame(OP_TEXT, b"Hello, ", fin=False)
    await ws.send_frame(OP_PING, b"ping-1")
    await ws.send_frame(OP_CONT, b"wor", fin=False)
    await ws.send_frame(OP_PONG, b"unsolicited")
    await ws.send_frame(OP_CONT, b"ld!")
    async with timeout(5):
        assert await ws.recv_frame() == (OP_PONG, True, b"ping-1")
        assert await ws.recv_frame() == (OP_TEXT, True, b"Hello, world!")
    await ws.send_frame(OP_CLOSE, close_payload(1000))
    await expect_close(server, ws, 1000)


async def test_server_receives_close_keeps_tcp_open_server_closes_tcp(server: tether.Server) -> None:
    """[7.1.1] The server closes TCP first after the closing handshake, even if the client
    never closes its side."""
    ws = await raw(server)
    await ws.send_frame(OP_CLOSE, close_payload(1000))
    async with timeout(2):  # well under the 5 s close_timeout
        assert await ws.close_frame() == (1000, b"")
        assert await ws.reader.read() == b""
    await ws.aclose()
    await assert_serves(server)


async def test_server_receives_data_after_close_ignores_it(server: tether.Server) -> None:
    """[5.5.1] Nothing after a close frame is delivered to the handler."""
    received: list[object] = []

    async def record(conn: tether.Conn) -> None:
        async for message in conn:
            received.append(message)

    srv = await tether.serve({"/socket": record}, "127.0.0.1", 0)
    async with srv:
        ws = await RawWS.open(srv.port)
        ws.writer.write(ws.frame(OP_TEXT, b"before") + ws.frame(OP_CLOSE, close_payload(1000)) + ws.frame(OP_TEXT, b"after"))
        async with timeout(5):
            assert await ws.close_code() == 1000
        await ws.aclose()
    assert received == ["before"]


async def test_server_receives_2000_pings_without_reading_pongs_stays_healthy(server: tether.Server) -> None:
    """[5.5.2] A flood of pings whose pongs are never read does not hurt the server."""
    ws = await RawWS.open(server.port, rcvbuf=4096)
    assert ws.status == 101
    for i in range(2000):
        ws.writer.write(ws.frame(OP_PING, b"p%d" % i))
        if i % 100 == 0:
            async with timeout(10):
                await ws.writer.drain()
    await assert_serves(server)
    # The flooded connection itself still works once it reads its pongs.
    await ws.send_frame(OP_TEXT, b"after the flood")
    async with timeout(10):
        while True:
            opcode, _, payload = await ws.recv_frame()
            if opcode != OP_PONG:
                break
    assert (opcode, payload) == (OP_TEXT, b"after the flood")
    ws.abort()


async def test_server_receives_handshake_without_key_refuses(server: tether.Server) -> None:
    ws = await RawWS.connect(server.port)
    status = await ws.handshake(headers={"Sec-WebSocket-Key": None})
    assert 400 <= status < 500
    await ws.aclose()
    await assert_serves(server)


async def test_server_peer_drops_tcp_mid_message_cleans_up(make_server: ServerFactory) -> None:
    """A client vanishing mid-fragment ends the handler with ConnectionClosedError (1006)."""
    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        try:
            await conn.receive()
        except tether.ConnectionClosed as exc:
            outcome.set_result(exc)
            raise

    server = await make_server({"/socket": handler, "/echo": echo})
    ws = await RawWS.open(server.port)
    await ws.send_frame(OP_TEXT, b"half", fin=False)
    ws.abort()
    async with timeout(5):
        exc = await outcome
    assert isinstance(exc, tether.ConnectionClosedError) and exc.code == 1006
    await assert_serves(server, "/echo")
