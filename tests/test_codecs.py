"""Codecs over a real connection: JSON (msgspec) into typed values, Message, custom Codec."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, TypedDict

import msgspec
import pytest

import tether
from conftest import ServerFactory, timeout, url
from rawws import OP_BINARY, OP_TEXT, RawWS


class Hello(msgspec.Struct):
    text: str = msgspec.field(name="message")  # Go: Text string `json:"message"`


class Count(msgspec.Struct):
    n: int
    tags: list[str] = []


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Movie(TypedDict):
    title: str
    year: int


Pair = tuple[tether.Conn, tether.Conn]


@pytest.fixture
async def pair(make_server: ServerFactory) -> AsyncIterator[Pair]:
    """(server-side conn, client conn) connected over a real socket."""
    opened: asyncio.Future[tether.Conn] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(conn: tether.Conn) -> None:
        opened.set_result(conn)
        await done.wait()

    server = await make_server({"/socket": handler})
    async with timeout(5):
        client = await tether.connect(url(server))
        server_conn = await opened
    yield server_conn, client
    done.set()
    async with timeout(5):
        await client.close()


async def test_json_receive_struct_with_renamed_field(pair: Pair) -> None:
    server, client = pair
    await client.send('{"message": "hello server!"}')
    async with timeout(5):
        hello = await tether.JSON.receive(server, Hello)
    assert hello == Hello(text="hello server!")


async def test_json_send_struct_uses_renamed_field_in_a_text_frame(make_server: ServerFactory) -> None:
    async def handler(conn: tether.Conn) -> None:
        await tether.JSON.send(conn, Hello("Thanks for the message!"))
        await conn.receive()

    server = await make_server({"/socket": handler})
    ws = await RawWS.open(server.port)
    async with timeout(5):
        assert await ws.recv_frame() == (OP_TEXT, True, b'{"message":"Thanks for the message!"}')
    await ws.aclose()


async def test_json_receive_dataclass_typeddict_and_dict(pair: Pair) -> None:
    server, client = pair
    await client.send('{"x": 1, "y": 2}')
    await client.send(b'{"title": "Brazil", "year": 1985}')  # binary frames decode too
    await client.send('{"any": [1, "two", null]}')
    async with timeout(5):
        assert await tether.JSON.receive(server, Point) == Point(1, 2)
        assert await tether.JSON.receive(server, Movie) == {"title": "Brazil", "year": 1985}
        assert await tether.JSON.receive(server, dict) == {"any": [1, "two", None]}


async def test_json_receive_wrong_shape_raises_decode_error_with_path_then_next_decodes(pair: Pair) -> None:
    server, client = pair
    await client.send('{"n": "three"}')
    await client.send('{"n": 3, "tags": ["a", 4]}')
    await client.send('{"tags": []}')
    await client.send('{"n": 4}')
    async with timeout(5):
        with pytest.raises(tether.DecodeError) as info:
            await tether.JSON.receive(server, Count)
        assert info.value.path == "$.n"
        assert "int" in info.value.message and "str" in info.value.message
        with pytest.raises(tether.DecodeError) as info:
            await tether.JSON.receive(server, Count)
        assert info.value.path == "$.tags[1]"
        with pytest.raises(tether.DecodeError) as info:
            await tether.JSON.receive(server, Count)
        assert "n" in info.value.message and "missing" in info.value.message.lower()
        assert await tether.JSON.receive(server, Count) == Count(4)
    assert server.state is tether.ConnState.OPEN


async def test_json_receive_invalid_json_raises_decode_error_then_next_decodes(pair: Pair) -> None:
    server, client = pair
    await client.send("{not json")
    await client.send('{"message": "ok"}')
    async with timeout(5):
        with pytest.raises(tether.DecodeError) as info:
            await tether.JSON.receive(server, Hello)
        assert isinstance(info.value, tether.TetherError) and info.value.message
        assert await tether.JSON.receive(server, Hello) == Hello("ok")


async def test_json_send_receive_round_trip_between_client_and_server(pair: Pair) -> None:
    server, client = pair
    await tether.JSON.send(client, Point(3, 4))
    await tether.JSON.send(client, {"title": "Alien", "year": 1979})
    async with timeout(5):
        assert await tether.JSON.receive(server, Point) == Point(3, 4)
        assert await tether.JSON.receive(server, Movie) == Movie(title="Alien", year=1979)


async def test_message_codec_passes_str_as_text_and_bytes_as_binary(make_server: ServerFactory) -> None:
    async def handler(conn: tether.Conn) -> None:
        await tether.Message.send(conn, "text")
        await tether.Message.send(conn, b"\x00bin")
        await conn.receive()

    server = await make_server({"/socket": handler})
    ws = await RawWS.open(server.port)
    async with timeout(5):
        assert await ws.recv_frame() == (OP_TEXT, True, b"text")
        assert await ws.recv_frame() == (OP_BINARY, True, b"\x00bin")
    await ws.aclose()


async def test_message_codec_receive_checks_the_kind(pair: Pair) -> None:
    server, client = pair
    await client.send("a")
    await client.send(b"b")
    await client.send(b"c")
    async with timeout(5):
        assert await tether.Message.receive(server, str) == "a"
        assert await tether.Message.receive(server, bytes) == b"b"
    with pytest.raises(tether.DecodeError):
        async with timeout(5):
            await tether.Message.receive(server, str)


async def test_custom_codec_marshals_and_unmarshals(pair: Pair) -> None:
    server, client = pair

    def marshal(value: tuple[int, int]) -> str:
        return f"{value[0]},{value[1]}"

    def unmarshal(message: str | bytes, type: Any) -> Any:
        text = message if isinstance(message, str) else message.decode()
        a, b = text.split(",")
        return type((int(a), int(b)))

    csv = tether.Codec(marshal, unmarshal)
    await csv.send(client, (1, 2))
    async with timeout(5):
        assert await csv.receive(server, tuple) == (1, 2)


async def test_custom_codec_text_flag_sends_bytes_as_text_frame(make_server: ServerFactory) -> None:
    upper = tether.Codec(lambda value: value.upper().encode(), lambda m, t: m, text=True)

    async def handler(conn: tether.Conn) -> None:
        await upper.send(conn, "shout")
        await conn.receive()

    server = await make_server({"/socket": handler})
    ws = await RawWS.open(server.port)
    async with timeout(5):
        assert await ws.recv_frame() == (OP_TEXT, True, b"SHOUT")
    await ws.aclose()
