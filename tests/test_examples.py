"""The examples, end to end: the tutorial's conversation over real sockets and in Chromium."""

from __future__ import annotations

import base64
import hashlib
import logging

import msgspec
import pytest

import tether
from examples.hello.server import ROUTES, STATIC, Message
from tests.browser import chromium
from tests.rawws import OP_CLOSE, OP_TEXT, RawWS, close_payload


@pytest.fixture
async def demo():
    async with tether.serve(ROUTES, "127.0.0.1", 0, static_dir=STATIC) as server:
        yield server


async def test_hello_socket_tutorial_conversation(demo, caplog):
    caplog.set_level(logging.INFO, logger="hello")
    async with tether.connect(f"ws://127.0.0.1:{demo.port}/socket") as conn:
        await conn.send('{"message": "hello server!"}')
        assert msgspec.json.decode(await conn.receive()) == {"message": "Thanks for the message!"}
    assert "Received message: hello server!" in caplog.messages


async def test_hello_socket_tutorial_conversation_over_a_raw_socket(demo, caplog):
    """The same conversation with no WebSocket library: RFC 6455 handshake and frames by hand."""
    caplog.set_level(logging.INFO, logger="hello")
    key = base64.b64encode(b"tether raw hello").decode()
    ws = await RawWS.connect(demo.port)
    try:
        assert await ws.handshake("/socket", {"Sec-WebSocket-Key": key}) == 101
        assert ws.headers["upgrade"].lower() == "websocket"
        guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
        accept = base64.b64encode(hashlib.sha1(key.encode() + guid).digest()).decode()
        assert ws.headers["sec-websocket-accept"] == accept

        await ws.send_frame(OP_TEXT, b'{"message": "hello server!"}')  # masked: RawWS masks client frames
        opcode, fin, payload = await ws.recv_frame()  # recv_frame asserts the server's frame is unmasked
        assert (opcode, fin) == (OP_TEXT, True)
        assert msgspec.json.decode(payload) == {"message": "Thanks for the message!"}
        assert "Received message: hello server!" in caplog.messages

        await ws.send_frame(OP_CLOSE, close_payload(1000))
        assert await ws.close_code() == 1000  # then the server closes TCP
    finally:
        await ws.aclose()

async def test_hello_socket_bad_message_then_good_one(demo, caplog):
    async with tether.connect(f"ws://127.0.0.1:{demo.port}/socket") as conn:
        await conn.send('{"message": 42}')
        await tether.JSON.send(conn, Message("hello server!"))
        assert await tether.JSON.receive(conn, Message) == Message("Thanks for the message!")
    assert any("Bad message" in m and "$.message" in m for m in caplog.messages)


async def test_hello_typed_request_gets_reply_and_push(demo):
    async with tether.connect(f"ws://127.0.0.1:{demo.port}/typed") as conn:
        assert msgspec.json.decode(await conn.receive())["type"] == "welcome"
        await conn.send('{"type": "hello", "data": {"message": "hello server!"}, "id": 1}')
        push = msgspec.json.decode(await conn.receive())
        reply = msgspec.json.decode(await conn.receive())
    assert push == {"type": "hello", "data": {"message": "Thanks for the message!"}}
    assert reply == {"type": "reply", "id": 1, "data": {"message": "Thanks for the message!"}}


async def test_chat_say_reaches_every_member(demo):
    url = f"ws://127.0.0.1:{demo.port}/chat"
    async with tether.connect(url) as alice, tether.connect(url) as bob:
        for conn in (alice, bob):
            while msgspec.json.decode(await conn.receive())["type"] != "welcome":
                pass
        await alice.send('{"type": "nick", "data": {"name": "alice"}, "id": 1}')
        while (reply := msgspec.json.decode(await alice.receive()))["type"] != "reply":
            pass
        assert reply["data"] == "alice"
        await alice.send('{"type": "say", "data": {"text": "hi bob"}}')
        while (said := msgspec.json.decode(await bob.receive()))["type"] != "said":
            pass
    assert said["data"] == {"name": "alice", "text": "hi bob"}


@pytest.fixture(params=["examples.hello at /", "make demo at /hello"])
async def hello_page(request, tmp_path):
    """The tutorial's page: on its own server at ``/``, and in the call demo at ``/hello``."""
    if request.param == "examples.hello at /":
        async with tether.serve(ROUTES, "127.0.0.1", 0, static_dir=STATIC) as server:
            yield f"http://127.0.0.1:{server.port}/"
    else:
        from examples.call.server import build_site, make_routes

        async with tether.serve(make_routes(), "127.0.0.1", 0, static_dir=build_site(tmp_path / "site")) as server:
            yield f"http://127.0.0.1:{server.port}/hello"


@pytest.mark.browser
async def test_hello_page_in_chromium_runs_the_tutorial_conversation(hello_page, caplog):
    caplog.set_level(logging.INFO, logger="hello")
    async with chromium() as browser:
        page = await browser.new_page()
        console: list[str] = []
        page.on("console", lambda msg: console.append(msg.text))
        await page.goto(hello_page)
        await page.wait_for_function(
            "document.getElementById('plain').textContent.includes('Thanks for the message!')", timeout=10_000
        )
        await page.wait_for_function(
            "document.getElementById('typed').textContent.includes('Reply:')", timeout=10_000
        )
        typed = await page.text_content("#typed")
    assert 'Received: {"message":"Thanks for the message!"}' in console
    assert 'Reply: {"message":"Thanks for the message!"}' in typed
    assert caplog.messages.count("Received message: hello server!") == 2
