"""The Python client (``tether.connect``) against tether's server and, for frames tether's
server never sends (fragments), against the ``websockets`` library's server."""

from __future__ import annotations

import asyncio

import pytest
import websockets.asyncio.server

import tether
from conftest import ServerFactory, echo, timeout, url


async def test_client_connect_to_unknown_path_raises_invalid_handshake_404(echo_server: tether.Server) -> None:
    async with timeout(5):
        with pytest.raises(tether.InvalidHandshake) as info:
            await tether.connect(url(echo_server, "/nope"))
    assert info.value.status == 404
    assert isinstance(info.value, tether.TetherError)


async def test_client_connect_refused_by_origin_raises_invalid_handshake_403(echo_server: tether.Server) -> None:
    async with timeout(5):
        with pytest.raises(tether.InvalidHandshake) as info:
            await tether.connect(url(echo_server), headers={"Origin": "http://evil.example"})
    assert info.value.status == 403


async def test_client_sends_headers_and_query_the_handler_sees(make_server: ServerFactory) -> None:
    seen: asyncio.Future[tuple[str, dict[str, str], str]] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        seen.set_result((conn.path, dict(conn.query), conn.headers["Authorization"]))
        await conn.receive()

    server = await make_server({"/socket": handler})
    async with timeout(5), tether.connect(url(server, "/socket?room=1"), headers={"Authorization": "Bearer t"}):
        assert await seen == ("/socket", {"room": "1"}, "Bearer t")


async def test_client_close_runs_handshake_server_sees_1000(make_server: ServerFactory) -> None:
    closed: asyncio.Future[tuple[int | None, str]] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        async for message in conn:
            await conn.send(message)
        closed.set_result((conn.close_code, conn.close_reason))

    server = await make_server({"/socket": handler})
    async with timeout(5):
        conn = await tether.connect(url(server))
        await conn.send("hi")
        assert await conn.receive() == "hi"
        await conn.close()
        assert await closed == (1000, "")
    assert conn.state is tether.ConnState.CLOSED and conn.close_code == 1000
    with pytest.raises(tether.ConnectionClosedOK):
        await conn.receive()
    with pytest.raises(tether.ConnectionClosedOK):
        await conn.send("after close")


async def test_client_close_with_code_server_handler_sees_code_and_reason(make_server: ServerFactory) -> None:
    raised: asyncio.Future[tether.ConnectionClosed] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        try:
            await conn.receive()
        except tether.ConnectionClosed as exc:
            raised.set_result(exc)

    server = await make_server({"/socket": handler})
    async with timeout(5):
        conn = await tether.connect(url(server))
        await conn.close(4000, "leaving")
        exc = await raised
    assert isinstance(exc, tether.ConnectionClosedError)
    assert (exc.code, exc.reason) == (4000, "leaving")


async def test_client_server_closes_4003_receive_raises_connection_closed_error(make_server: ServerFactory) -> None:
    async def handler(conn: tether.Conn) -> None:
        await conn.close(4003, "forbidden")

    server = await make_server({"/socket": handler})
    async with timeout(5), tether.connect(url(server)) as conn:
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
        assert (info.value.code, info.value.reason) == (4003, "forbidden")
        assert conn.close_code == 4003
        # async for re-raises abnormal closes instead of ending quietly.
        with pytest.raises(tether.ConnectionClosedError):
            async for _ in conn:
                pass


async def test_client_receives_fragmented_message_reassembled() -> None:
    async def handler(ws: websockets.asyncio.server.ServerConnection) -> None:
        await ws.send(["Hel", "lo, ", "wörld"])  # one text message in three frames
        await ws.send([b"\x00\x01", b"", b"\x02"])  # one binary message, an empty fragment
        await ws.send(("é" for _ in range(3)))
        await ws.wait_closed()

    async with websockets.asyncio.server.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}/") as conn:
            assert await conn.receive() == "Hello, wörld"
            assert await conn.receive() == b"\x00\x01\x02"
            assert await conn.receive() == "ééé"


async def test_client_receives_fragments_over_max_message_size_fails_1009() -> None:
    closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def handler(ws: websockets.asyncio.server.ServerConnection) -> None:
        await ws.send([b"x" * 600, b"y" * 600])
        await ws.wait_closed()
        closed.set_result(ws.close_code)

    async with websockets.asyncio.server.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}/", max_message_size=1000) as conn:
            with pytest.raises(tether.ConnectionClosedError) as info:
                await conn.receive()
            assert info.value.code == 1009
            assert await closed == 1009


async def test_client_receives_single_frame_over_max_message_size_fails_1009(echo_server: tether.Server) -> None:
    async with timeout(5), tether.connect(url(echo_server), max_message_size=1000) as conn:
        await conn.send("small")
        assert await conn.receive() == "small"
        await conn.send("x" * 1001)  # the server echoes it; too big for this client
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert info.value.code == 1009


async def test_client_receives_from_tether_server_in_order(echo_server: tether.Server) -> None:
    async with timeout(5), tether.connect(url(echo_server)) as conn:
        for i in range(100):
            await conn.send(str(i) if i % 2 else str(i).encode())
        got = [await conn.receive() for _ in range(100)]
    assert got == [str(i) if i % 2 else str(i).encode() for i in range(100)]


async def test_client_emit_sends_typed_envelope(make_server: ServerFactory) -> None:
    got: asyncio.Future[str | bytes] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        got.set_result(await conn.receive())

    server = await make_server({"/socket": handler})
    async with timeout(5), tether.connect(url(server)) as conn:
        await conn.emit("greet", {"message": "hi"})
        message = await got
    import msgspec

    assert msgspec.json.decode(message) == {"type": "greet", "data": {"message": "hi"}}


async def test_client_and_server_share_the_conn_type(make_server: ServerFactory) -> None:
    server_conn: asyncio.Future[tether.Conn] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        server_conn.set_result(conn)
        await echo(conn)

    server = await make_server({"/socket": handler})
    async with timeout(5), tether.connect(url(server)) as conn:
        assert type(conn) is type(await server_conn) is tether.Conn
        assert conn.is_client and not (await server_conn).is_client
