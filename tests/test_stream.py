"""``conn.stream()``: the byte-stream view, like Go's ``ws.Read(buf)`` / ``ws.Write(b)``."""

from __future__ import annotations

import asyncio

import tether
from conftest import ServerFactory, timeout, url
from rawws import OP_BINARY, OP_CLOSE, OP_TEXT, RawWS, close_payload


async def test_stream_read_continues_across_message_boundaries(make_server: ServerFactory) -> None:
    got: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        stream = conn.stream()
        chunks = [await stream.read(4) for _ in range(4)]
        got.set_result(chunks)
        await conn.receive()

    server = await make_server({"/socket": handler})
    async with timeout(5), tether.connect(url(server)) as conn:
        await conn.send(b"abcdef")
        await conn.send("ghij")  # text messages read as their UTF-8 bytes
        await conn.send(b"klmnop")
        assert await got == [b"abcd", b"ef", b"ghij", b"klmn"]


async def test_stream_read_returns_partial_and_keeps_the_rest(make_server: ServerFactory) -> None:
    got: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        stream = conn.stream()
        got.set_result([await stream.read(3), await stream.read(100), await stream.read(-1), await stream.read()])
        await conn.receive()

    server = await make_server({"/socket": handler})
    async with timeout(5), tether.connect(url(server)) as conn:
        await conn.send(b"0123456789")
        await conn.send(b"second")
        await conn.send("thïrd")
        assert await got == [b"012", b"3456789", b"second", "thïrd".encode()]


async def test_stream_write_sends_one_frame_per_call(make_server: ServerFactory) -> None:
    async def handler(conn: tether.Conn) -> None:
        stream = conn.stream()
        assert await stream.write(b"one") == 3
        await stream.write(bytearray(b"two"))
        await conn.stream(text=True).write("drei".encode())
        await conn.receive()

    server = await make_server({"/socket": handler})
    ws = await RawWS.open(server.port)
    async with timeout(5):
        assert await ws.recv_frame() == (OP_BINARY, True, b"one")
        assert await ws.recv_frame() == (OP_BINARY, True, b"two")
        assert await ws.recv_frame() == (OP_TEXT, True, b"drei")
    await ws.aclose()


async def test_stream_read_returns_empty_after_normal_close(make_server: ServerFactory) -> None:
    got: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        stream = conn.stream()
        got.set_result([await stream.read(), await stream.read(), await stream.read()])

    server = await make_server({"/socket": handler})
    ws = await RawWS.open(server.port)
    await ws.send_frame(OP_BINARY, b"last words")
    await ws.send_frame(OP_CLOSE, close_payload(1000))
    async with timeout(5):
        assert await got == [b"last words", b"", b""]
        assert await ws.close_code() == 1000
    await ws.aclose()


async def test_stream_read_after_abnormal_close_raises(make_server: ServerFactory) -> None:
    raised: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        try:
            await conn.stream().read()
        except tether.ConnectionClosed as exc:
            raised.set_result(exc)

    server = await make_server({"/socket": handler})
    ws = await RawWS.open(server.port)
    ws.abort()  # TCP gone without a close frame: not a normal end of stream
    async with timeout(5):
        exc = await raised
    assert isinstance(exc, tether.ConnectionClosedError) and exc.code == 1006
