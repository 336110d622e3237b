"""Fault paths: every way a connection, a handler or a client can fail ends in a bounded,
documented state (issue 11; docs/security.md, "Faults"). Real sockets on 127.0.0.1.

Each test reproduces a trigger: a peer that stops reading, a handler killed by another
connection's close, concurrent receivers, a flood of concurrent requests, a corked read whose
replies are large, a cookie header browsers send, a handler that closes its own connection
before its reply, a tick that raises.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

import tether
import tether.asgi
import tether.testing
from conftest import TIMEOUT_SCALE, ServerFactory, assert_serves, echo, timeout, url
from rawws import OP_TEXT, RawWS

S = TIMEOUT_SCALE


async def pusher(conn: tether.Conn) -> None:
    """Pushes 64 KiB messages as fast as the peer takes them (send waits while it does not)."""
    chunk = "x" * 65536
    while True:
        await conn.send(chunk)


# -- 1. a peer that stops reading is dropped ---------------------------------------------------


async def test_server_drops_a_peer_that_stops_reading_within_keepalive_plus_close_timeout(make_server: ServerFactory) -> None:
    """The client never reads: its window closes, the server's buffer fills, pings go unanswered.
    Keepalive gives up (1011), the close frame cannot be written either, and the close timeout
    aborts the TCP connection: the slot, the handler and the socket are freed."""
    interval, ping_timeout, close_timeout = 0.3, 0.3, 0.3
    server = await make_server(
        {"/socket": pusher, "/echo": echo},
        ping_interval=interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        shutdown_timeout=1.0,
    )
    ws = await RawWS.open(server.port, rcvbuf=4096)
    assert ws.status == 101
    began = time.monotonic()
    async with timeout(5):
        while not server.connections:  # the handler starts pushing
            await asyncio.sleep(0.01)
        (conn,) = server.connections
        await conn.wait_closed()
    elapsed = time.monotonic() - began
    assert elapsed < interval + ping_timeout + close_timeout + 1.0 * S
    assert (conn.close_code, conn.close_reason) == (1011, "keepalive timeout")
    assert server.connections == set()
    await assert_serves(server, "/echo")
    began = time.monotonic()
    await server.close()
    assert time.monotonic() - began < 1.0 + 0.5 * S
    ws.abort()


async def test_server_shutdown_is_bounded_with_a_peer_that_never_reads(make_server: ServerFactory) -> None:
    """Keepalive off: only the shutdown can drop the non-reader, within ``shutdown_timeout``."""
    server = await make_server({"/socket": pusher}, ping_interval=None, close_timeout=5.0, shutdown_timeout=0.5)
    ws = await RawWS.open(server.port, rcvbuf=4096)
    assert ws.status == 101
    async with timeout(5):
        while not server.connections:
            await asyncio.sleep(0.01)
    began = time.monotonic()
    async with timeout(5):
        await server.close()
    assert time.monotonic() - began < 0.5 + 0.5 * S
    assert server.connections == set()
    ws.abort()


# -- 2. a handler killed by another connection's closure ----------------------------------------


async def test_plain_handler_failing_on_another_connections_close_closes_its_own_1011(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Relaying to a peer that left raises that peer's ConnectionClosed: a handler failure, 1011."""
    peers: list[tether.Conn] = []

    async def relay(conn: tether.Conn) -> None:
        peers.append(conn)
        async for message in conn:
            for peer in list(peers):
                await peer.send(message)  # raises if that peer is gone

    caplog.set_level(logging.CRITICAL, logger="tether")
    server = await make_server({"/socket": relay})
    async with timeout(5):
        gone = await tether.connect(url(server))
        await gone.close()
        async with tether.connect(url(server)) as stays:
            while len(peers) < 2:
                await asyncio.sleep(0.01)
            await stays.send("hello")
            with pytest.raises(tether.ConnectionClosedError) as info:
                await stays.receive()
    assert (info.value.code, info.value.reason) == (1011, "internal error")


async def test_app_request_failing_on_another_connections_close_gets_an_internal_error(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    """Exactly one reply or error per request: a handler that dies relaying to a closed peer
    answers ``internal``, and its own connection stays open."""
    app = tether.App()
    left: list[tether.Conn] = []

    @app.on("quit")
    async def quit(conn: tether.Conn) -> None:
        left.append(conn)
        await conn.close()

    @app.on("relay")
    async def relay(conn: tether.Conn, text: str) -> str:
        await left[0].emit("relayed", text)
        return "sent"

    caplog.set_level(logging.CRITICAL, logger="tether")
    server = await make_server({"/app": app})
    async with timeout(5), tether.Client(url(server, "/app")) as gone, tether.Client(url(server, "/app")) as stays:
        await gone.wait_open()
        gone.send("quit")
        while not left or left[0].state is not tether.ConnState.CLOSED:
            await asyncio.sleep(0.01)
        with pytest.raises(tether.ReplyError) as info:
            await stays.request("relay", "hi")
        assert info.value.code == "internal"
        with pytest.raises(tether.ReplyError):
            await stays.request("relay", "again")  # still open, still answering


# -- 3. concurrent receive() -----------------------------------------------------------------------


async def test_second_concurrent_receive_raises_concurrency_error(echo_server: tether.Server) -> None:
    async with timeout(5), tether.connect(url(echo_server)) as conn:
        first = asyncio.ensure_future(conn.receive())
        await asyncio.sleep(0)  # let it start waiting
        with pytest.raises(tether.ConcurrencyError):
            await conn.receive()
        await conn.send("one")
        assert await first == "one"  # the first receiver is unharmed
        await conn.send("two")
        assert await conn.receive() == "two"  # and receive() works again once it is done


# -- 4. concurrent=True handlers are capped per connection ---------------------------------------


async def test_concurrent_handlers_are_capped_and_reading_pauses(make_server: ServerFactory) -> None:
    app = tether.App(max_concurrent=8)
    running = 0
    peak = 0
    release = asyncio.Event()

    @app.on("hang", concurrent=True)
    async def hang(conn: tether.Conn, n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
        finally:
            running -= 1
        return n

    server = await make_server({"/app": app})
    async with timeout(10), tether.connect(url(server, "/app")) as conn:
        assert json.loads(await conn.receive())["type"] == "welcome"
        for n in range(200):
            await conn.send(json.dumps({"type": "hang", "data": n, "id": n}))
        while running < 8:
            await asyncio.sleep(0.01)
        for _ in range(20):
            await asyncio.sleep(0)
        assert running == 8  # the others wait in the inbox (then in TCP): reading paused
        release.set()
        replies = {json.loads(await conn.receive())["id"] for _ in range(200)}
    assert replies == set(range(200)) and peak == 8


def test_app_refuses_a_concurrency_cap_below_one() -> None:
    with pytest.raises(ValueError):
        tether.App(max_concurrent=0)


# -- 5. corked replies respect backpressure ------------------------------------------------------


async def test_corked_large_replies_stop_the_app_while_the_peer_does_not_read(make_server: ServerFactory) -> None:
    """200 small requests arrive in one write; each reply is 256 KiB; the client never reads.
    The replies of one read are corked into one write, but past CORK_LIMIT they go out and
    backpressure stops the App after a few: memory is not 200 x 256 KiB."""
    app = tether.App()
    handled = 0

    @app.on("big")
    def big(conn: tether.Conn, n: int) -> str:
        nonlocal handled
        handled += 1
        return "x" * (256 * 1024)

    server = await make_server({"/app": app}, ping_interval=None)
    ws = await RawWS.open(server.port, "/app", rcvbuf=4096)
    assert ws.status == 101
    ws.writer.write(b"".join(ws.frame(OP_TEXT, json.dumps({"type": "big", "data": n, "id": n}).encode()) for n in range(200)))
    async with timeout(5):
        while not server.connections:
            await asyncio.sleep(0.01)
        (conn,) = server.connections
        while not conn._write_paused:  # the condition under test: backpressure reached the App
            await asyncio.sleep(0.01)
    assert handled < 32  # the socket's buffers take a few MiB at most; the rest wait unhandled
    ws.abort()


async def test_a_frame_that_fails_does_not_strand_the_corked_replies(make_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the middle of one read's frames (a bug, here injected) still writes the
    replies already produced for that read, before picows drops the connection."""
    app = tether.App()

    @app.on("add")
    def add(conn: tether.Conn, n: int) -> int:
        return n + 1

    real = tether.Conn.on_message
    seen = 0

    def second_fails(self: Any, message: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == 2:  # the 2nd of the read's three frames fails (raised into the picows listener)
            raise RuntimeError("injected")
        real(self, message)

    monkeypatch.setattr(tether.Conn, "on_message", second_fails)
    server = await make_server({"/app": app}, ping_interval=None)
    ws = await RawWS.open(server.port, "/app")
    ws.writer.write(b"".join(ws.frame(OP_TEXT, json.dumps({"type": "add", "data": n, "id": n}).encode()) for n in range(3)))
    async with timeout(5):
        frames = []
        while True:
            opcode, _, payload = await ws.recv_frame()
            if opcode != OP_TEXT:
                break
            frames.append(json.loads(payload))
    assert frames[0]["type"] == "welcome" and frames[1] == {"type": "reply", "data": 1, "id": 0}
    await ws.aclose()


# -- 9. cookies as browsers send them -------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('prefs={"a":1}; token=y', "y"),  # SimpleCookie stops at the first bad pair
        ("a=1;token=x;b=2", "x"),
        ('token="quoted"', "quoted"),
        ("tokens=no; token=", None),
        ("garbage", None),
    ],
)
def test_token_is_found_in_a_cookie_header_with_non_conforming_cookies(header: str, expected: str | None) -> None:
    request = tether.Request("/", {"Cookie": header}, {}, None)
    assert tether.auth.token(request) == expected


# -- 11. smaller ones -------------------------------------------------------------------------------


async def test_handler_that_closes_its_own_connection_before_its_reply_ends_cleanly(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    app = tether.App()

    @app.on("bye")
    def bye(conn: tether.Conn) -> str:
        conn.start_close(4000, "bye")
        return "too late"  # no reply can go out: dropped, not raised into the transport

    caplog.set_level(logging.INFO)
    server = await make_server({"/app": app})
    async with timeout(5), tether.connect(url(server, "/app")) as conn:
        await conn.receive()  # welcome
        await conn.send('{"type": "bye", "id": 1}')
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert info.value.code == 4000
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []


def test_a_raising_keepalive_tick_does_not_stop_the_others_in_its_bucket(caplog: pytest.LogCaptureFixture) -> None:
    from tether import wheel

    ticked: list[int] = []

    class Item:
        def __init__(self, n: int) -> None:
            self.n = n

        def keepalive_tick(self) -> None:
            ticked.append(self.n)
            if self.n == 0:
                raise RuntimeError("a bug in one connection")

    async def main() -> None:
        now = time.monotonic()
        for n in range(3):
            wheel.schedule(now, Item(n))
        while len(ticked) < 3:
            await asyncio.sleep(wheel.RESOLUTION)

    caplog.set_level(logging.CRITICAL, logger="tether")
    asyncio.run(asyncio.wait_for(main(), 5))
    assert ticked == [0, 1, 2]


async def test_asgi_message_size_limit_counts_bytes_not_characters() -> None:
    from contextlib import AsyncExitStack

    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    from transports import start_uvicorn

    async with AsyncExitStack() as stack:
        port = await start_uvicorn(stack, Starlette(routes=[WebSocketRoute("/socket", tether.asgi.asgi(echo, max_message_size=1000))]))
        async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}/socket") as conn:
            await conn.send("é" * 500)  # 500 characters, 1000 bytes: at the limit
            assert await conn.receive() == "é" * 500
            await conn.send("é" * 501)  # 1002 bytes
            with pytest.raises(tether.ConnectionClosedError) as info:
                await conn.receive()
    assert info.value.code == 1009



class RecordingBroker(tether.MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    async def start(self, node: str, deliver: Any) -> None:
        self.events.append("start")
        await super().start(node, deliver)

    async def close(self) -> None:
        self.events.append("close")
        await super().close()


async def run_with_lifespan(asgi_app: Any, broker: RecordingBroker) -> None:
    """Serve ``asgi_app`` with uvicorn (lifespan on); the broker is started while it serves."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(asgi_app, host="127.0.0.1", port=0, lifespan="on", log_level="warning"))
    async with timeout(10):
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        assert broker.events == ["start"]
        server.should_exit = True
        await serving


async def test_asgi_lifespan_starts_and_closes_the_apps_broker() -> None:
    broker = RecordingBroker()
    await run_with_lifespan(tether.App(broker=broker).asgi(), broker)
    assert broker.events == ["start", "close"]


async def test_asgi_lifespan_hook_for_a_mounting_framework() -> None:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    broker = RecordingBroker()
    asgi_app = tether.App(broker=broker).asgi()
    await run_with_lifespan(Starlette(routes=[WebSocketRoute("/ws", asgi_app)], lifespan=asgi_app.lifespan), broker)
    assert broker.events == ["start", "close"]


# -- 6. the reconnecting client ---------------------------------------------------------------------


async def test_client_params_raising_reaches_error_event_and_wait_open_then_recovers(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    from tether.proto.backoff import Backoff

    server = await make_server({"/app": tether.App()})
    attempts = 0

    def params() -> dict[str, str]:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise RuntimeError(f"token service down ({attempts})")
        return {"token": "t"}

    errors: list[BaseException] = []
    caplog.set_level(logging.CRITICAL, logger="tether.client")
    client = tether.Client(url(server, "/app"), params=params, backoff=Backoff(base=0.05 * S, cap=0.1 * S))
    client.add_listener("error", errors.append)
    async with timeout(5), client:
        with pytest.raises(RuntimeError, match="token service down"):
            await client.wait_open()
        while client.state != "open":
            try:
                await client.wait_open()
            except RuntimeError:
                continue  # the next attempt failed too: wait_open says so each time
    assert [str(e) for e in errors] == ["token service down (1)", "token service down (2)"]
    assert attempts == 3


def going_away(seconds: float) -> tether.App:
    app = tether.App()
    seen: list[tether.Conn] = []

    @app.on_connect
    def away(conn: tether.Conn) -> None:
        seen.append(conn)
        raise tether.CloseConnection(1001, f"going away; retry_after={seconds}")

    app.assigns_seen = seen  # type: ignore[attr-defined]
    return app


async def test_client_close_during_a_long_retry_after_returns_promptly(make_server: ServerFactory) -> None:
    server = await make_server({"/app": going_away(30)})
    client = tether.Client(url(server, "/app"))
    reconnecting = asyncio.Event()
    client.add_listener("reconnecting", lambda *a: reconnecting.set())
    client.start()
    async with timeout(5):
        await reconnecting.wait()
        client.wake()  # skips the backoff, not the server's retry_after: now it waits 30 s
        await asyncio.sleep(0)
        began = time.monotonic()
        await client.close()
    assert time.monotonic() - began < 0.5 * S


async def test_client_caps_a_servers_retry_after(make_server: ServerFactory) -> None:
    from tether.proto.backoff import Backoff

    app = going_away(1000)
    server = await make_server({"/app": app})
    async with timeout(5), tether.Client(url(server, "/app"), max_retry_after=0.1, backoff=Backoff(base=0.01, cap=0.02)):
        while len(app.assigns_seen) < 3:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)


async def test_client_awaited_send_waits_while_the_server_does_not_read(make_server: ServerFactory) -> None:
    app = tether.App()
    release = asyncio.Event()
    got = 0

    @app.on("hang")
    async def hang(conn: tether.Conn) -> None:
        await release.wait()  # holds the connection: its inbox fills, then reading stops

    @app.on("blob")
    def blob(conn: tether.Conn, data: str) -> None:
        nonlocal got
        got += 1

    server = await make_server({"/app": app}, max_queue=4)
    async with timeout(20), tether.Client(url(server, "/app")) as client:
        await client.wait_open()
        client.send("hang")
        sent = 0
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0 * S):
                while sent < 2000:  # 125 MiB if nothing pushed back
                    await client.send("blob", "x" * 65536)
                    sent += 1
        assert 0 < sent < 2000
        release.set()
        while got < sent:
            await asyncio.sleep(0.01)


async def test_client_handler_errors_are_logged_and_counted_and_async_ones_kept_alive(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    app = tether.App()

    @app.on("go")
    async def go(conn: tether.Conn) -> None:
        await conn.emit("ping", 1)
        await conn.emit("ping", 2)

    server = await make_server({"/app": app})
    done = asyncio.Event()
    caplog.set_level(logging.ERROR, logger="tether.client")

    def sync_handler(data: int) -> None:
        raise ValueError(f"sync {data}")

    async def async_handler(data: int) -> None:
        await asyncio.sleep(0)
        if data == 2:
            done.set()
            raise ValueError(f"async {data}")

    async with timeout(5), tether.Client(url(server, "/app")) as client:
        client.on("ping", sync_handler)
        client.on("ping", async_handler)
        client.send("go")
        await done.wait()
        while client.handler_errors < 3:
            await asyncio.sleep(0.01)
    assert client.handler_errors == 3
    messages = sorted(str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert messages == ["async 2", "sync 1", "sync 2"]


# -- 8. the room of a pushed message reaches the client ---------------------------------------------


async def test_client_handlers_get_the_room_of_a_broadcast(make_server: ServerFactory) -> None:
    app = tether.App()

    @app.on("enter")
    async def enter(conn: tether.Conn, room: str) -> None:
        await conn.join(room)

    @app.on("say")
    async def say(conn: tether.Conn, data: dict[str, str]) -> None:
        await app.broadcast(data["room"], "said", data["text"])
        await conn.emit("said", "to you only")

    server = await make_server({"/app": app})
    heard: list[tuple[str, str | None]] = []
    async with timeout(5), tether.Client(url(server, "/app")) as client:
        client.on("said", lambda text, room: heard.append((text, room)))
        only_data: list[str] = []
        client.on("said", only_data.append)
        await client.request("enter", "red")
        await client.request("enter", "blue")
        await client.request("say", {"room": "blue", "text": "hi blue"})
        await client.request("say", {"room": "red", "text": "hi red"})
    assert heard == [("hi blue", "blue"), ("to you only", None), ("hi red", "red"), ("to you only", None)]
    assert only_data == ["hi blue", "to you only", "hi red", "to you only"]


async def test_testing_client_sees_the_room_of_a_broadcast() -> None:
    app = tether.App()

    @app.on("enter")
    async def enter(conn: tether.Conn, room: str) -> None:
        await conn.join(room)
        await app.broadcast(room, "hello", "all")

    async with timeout(5), tether.testing.connect(app) as client:
        await client.send("enter", "lobby")
        message = await client.receive()
    assert (message.type, message.data, message.room) == ("hello", "all", "lobby")
