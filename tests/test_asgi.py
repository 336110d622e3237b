"""ASGI-specific behaviour of ``tether.asgi``: plain handlers under Starlette and FastAPI (uvicorn),
Mount, request details, close codes, message size, and the wire's queue and flow control
(unit tests on ``ASGIWire`` with fake ``receive``/``send``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, WebSocketRoute

import tether
from conftest import echo, timeout
from tether.asgi import ASGIApp, ASGIWire, asgi
from tether.conn import Conn, ConnSettings, make_request
from tether.proto.frames import OP_BINARY, OP_TEXT
from transports import start_uvicorn


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def info(conn: tether.Conn) -> None:
    """Answer every message with what the handler sees of the request."""
    async for message in conn:
        await conn.send(
            repr(
                (
                    message,
                    conn.path,
                    conn.headers.get("x-token"),
                    conn.headers.get("X-TOKEN"),
                    conn.query.getall("tag", []),  # type: ignore[attr-defined]
                    conn.remote_address is not None and conn.remote_address[0],
                )
            )
        )


# -- under uvicorn ------------------------------------------------------------------------


async def test_asgi_plain_handler_echoes_under_starlette(stack: AsyncExitStack) -> None:
    port = await start_uvicorn(stack, Starlette(routes=[WebSocketRoute("/socket", asgi(echo))]))
    async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}/socket") as conn:
        await conn.send("hello ünïcödé 🚀")
        assert await conn.receive() == "hello ünïcödé 🚀"
        await conn.send(b"\x00\xffbinary")
        assert await conn.receive() == b"\x00\xffbinary"
    assert conn.close_code == 1000


async def test_asgi_handler_sees_path_headers_query_and_client(stack: AsyncExitStack) -> None:
    web = Starlette(routes=[WebSocketRoute("/socket", asgi(info)), Mount("/live", asgi(info))])
    port = await start_uvicorn(stack, web)
    base = f"ws://127.0.0.1:{port}"
    async with timeout(5):
        async with tether.connect(f"{base}/socket?tag=a&tag=b", headers={"X-Token": "t1"}) as conn:
            await conn.send("m")
            assert await conn.receive() == repr(("m", "/socket", "t1", "t1", ["a", "b"], "127.0.0.1"))
        async with tether.connect(f"{base}/live/room/1") as conn:
            await conn.send("n")
            assert await conn.receive() == repr(("n", "/live/room/1", None, None, [], "127.0.0.1"))


async def test_asgi_typed_app_under_fastapi(stack: AsyncExitStack) -> None:
    fastapi = pytest.importorskip("fastapi")
    app = tether.App()

    @app.on("add")
    def add(conn: tether.Conn, data: dict[str, int]) -> int:
        return data["a"] + data["b"]

    api = fastapi.FastAPI()
    api.router.routes.append(WebSocketRoute("/ws", app.asgi()))
    api.mount("/mounted", app.asgi())
    port = await start_uvicorn(stack, api)
    for path in ("/ws", "/mounted/x"):
        async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}{path}") as conn:
            assert '"welcome"' in str(await conn.receive())
            await conn.send('{"type": "add", "data": {"a": 1, "b": 2}, "id": "r"}')
            assert await conn.receive() == '{"type":"reply","data":3,"id":"r"}'


@pytest.mark.parametrize(
    ("exc", "code"),
    [(tether.CloseConnection(4003, "forbidden"), 4003), (ValueError("secret"), 1011)],
)
async def test_asgi_handler_exception_becomes_close_code(
    stack: AsyncExitStack, caplog: pytest.LogCaptureFixture, exc: Exception, code: int
) -> None:
    caplog.set_level("CRITICAL", logger="tether")

    async def handler(conn: tether.Conn) -> None:
        await conn.receive()
        raise exc

    port = await start_uvicorn(stack, Starlette(routes=[WebSocketRoute("/socket", asgi(handler))]))
    async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}/socket") as conn:
        await conn.send("go")
        with pytest.raises(tether.ConnectionClosed) as caught:
            await conn.receive()
    assert caught.value.code == code
    assert "secret" not in caught.value.reason


async def test_asgi_message_over_max_size_closes_1009(stack: AsyncExitStack) -> None:
    port = await start_uvicorn(stack, Starlette(routes=[WebSocketRoute("/socket", asgi(echo, max_message_size=10))]))
    async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}/socket") as conn:
        await conn.send("0123456789")
        assert await conn.receive() == "0123456789"
        await conn.send("0123456789!")
        with pytest.raises(tether.ConnectionClosed) as caught:
            await conn.receive()
    assert caught.value.code == 1009


# uvicorn's legacy "websockets" implementation is deprecated (and warns), so it is left out.
@pytest.mark.parametrize("ws", ["websockets-sansio", "wsproto"])
async def test_asgi_close_codes_on_each_uvicorn_websocket_implementation(stack: AsyncExitStack, ws: str) -> None:
    app = tether.App()
    closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    @app.on("quit")
    def quit(conn: tether.Conn) -> None:
        raise tether.CloseConnection(4003, "bye")

    @app.on_disconnect
    def bye(conn: tether.Conn, code: int, reason: str) -> None:
        closed.set_result(code)

    port = await start_uvicorn(stack, Starlette(routes=[WebSocketRoute("/ws", app.asgi())]), ws=ws)
    async with timeout(5), tether.connect(f"ws://127.0.0.1:{port}/ws") as conn:
        await conn.receive()  # welcome
        await conn.send('{"type": "quit"}')
        await conn.wait_closed()
    assert conn.close_code == 4003
    async with timeout(5):
        assert await closed == 4003


# -- direct ASGI calls ----------------------------------------------------------------------


async def test_asgi_http_request_gets_426() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    await asgi(echo)({"type": "http", "path": "/socket", "headers": []}, receive, send)
    assert sent[0]["status"] == 426 and (b"upgrade", b"websocket") in sent[0]["headers"]


async def test_asgi_lifespan_completes() -> None:
    events = asyncio.Queue[dict[str, Any]]()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        events.put_nowait({"type": kind})
    sent: list[str] = []

    async def send(message: Any) -> None:
        sent.append(message["type"])

    async with timeout(5):
        await asgi(echo)({"type": "lifespan"}, events.get, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_app_asgi_returns_an_asgi_class_instance() -> None:
    wrapped = tether.App().asgi()
    # A class instance, so Starlette routes call it as raw ASGI, not as endpoint(websocket).
    assert isinstance(wrapped, ASGIApp) and not asyncio.iscoroutinefunction(wrapped)


# -- the wire: one writer, bounded queue, reading flow control ------------------------------


class FakeASGI:
    """``receive``/``send`` of an ASGI server whose ``send`` can be held, to fill the queue."""

    def __init__(self) -> None:
        self.incoming = asyncio.Queue[dict[str, Any]]()
        self.receives = 0
        self.sent: list[dict[str, Any]] = []
        self.open = asyncio.Event()
        self.open.set()
        self.sending = 0
        self.max_sending = 0

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        return await self.incoming.get()

    async def send(self, message: Any) -> None:
        self.sending += 1
        self.max_sending = max(self.max_sending, self.sending)
        try:
            await self.open.wait()
            self.sent.append(message)
        finally:
            self.sending -= 1


async def settle() -> None:
    """Let every ready task run (to show that something does *not* happen)."""
    for _ in range(20):
        await asyncio.sleep(0)


def wire_conn(fake: FakeASGI, **settings: Any) -> tuple[ASGIWire, Conn]:
    wire = ASGIWire(fake.receive, fake.send, **settings)
    conn = Conn(wire, make_request("/"), ConnSettings(max_queue=4, ping_interval=None))
    wire.start(conn)
    return wire, conn


async def test_wire_pauses_writers_over_limit_and_resumes_when_drained() -> None:
    fake = FakeASGI()
    fake.open.clear()  # the peer does not read
    wire, conn = wire_conn(fake, write_limit=100)
    conn.write(OP_TEXT, b"x" * 60)
    conn.write(OP_BINARY, b"y" * 30)
    assert not conn._write_paused and wire.pending == 90
    conn.write(OP_TEXT, b"z" * 20)
    assert conn._write_paused and wire.pending == 110
    sender = asyncio.create_task(conn.send("after"))
    await settle()
    assert not sender.done()  # send() waits while the queue is over the limit
    fake.open.set()
    async with timeout(5):
        await sender
    assert not conn._write_paused
    assert [m.get("text", m.get("bytes")) for m in fake.sent] == ["x" * 60, b"y" * 30, "z" * 20, "after"]
    assert fake.max_sending == 1  # one writer task: sends never overlap
    await wire.aclose()


async def test_wire_pause_reading_stops_pulling_receive() -> None:
    fake = FakeASGI()
    wire, conn = wire_conn(fake)
    for i in range(10):
        fake.incoming.put_nowait({"type": "websocket.receive", "text": str(i)})
    await settle()
    # max_queue=4: the inbox filled, Conn paused reading, the reader stopped pulling.
    assert len(conn._inbox) == 4 and fake.incoming.qsize() == 6
    assert await conn.receive() == "0"
    assert await conn.receive() == "1"  # inbox down to half: reading resumes
    await settle()
    assert fake.incoming.qsize() < 6
    received = [await conn.receive() for _ in range(8)]
    assert received == [str(i) for i in range(2, 10)]
    await wire.aclose()


async def test_wire_disconnect_event_closes_conn_with_peer_code() -> None:
    fake = FakeASGI()
    wire, conn = wire_conn(fake)
    fake.incoming.put_nowait({"type": "websocket.receive", "bytes": b"last"})
    fake.incoming.put_nowait({"type": "websocket.disconnect", "code": 4002, "reason": "expired"})
    async with timeout(5):
        await conn.wait_closed()
    assert (conn.close_code, conn.close_reason) == (4002, "expired")
    assert await conn.receive() == b"last"
    with pytest.raises(tether.ConnectionClosedError):
        await conn.receive()
    assert fake.sent == []  # no close echoed to a peer that is gone
    await wire.aclose()


async def test_wire_server_close_sends_close_then_waits_for_disconnect() -> None:
    fake = FakeASGI()
    wire, conn = wire_conn(fake)
    await conn.send("bye")
    closing = asyncio.create_task(conn.close(4000, "done"))
    await settle()
    assert fake.sent == [{"type": "websocket.send", "text": "bye"}, {"type": "websocket.close", "code": 4000, "reason": "done"}]
    assert not closing.done()
    fake.incoming.put_nowait({"type": "websocket.disconnect", "code": 4000})
    async with timeout(5):
        await closing
    assert conn.close_code == 4000
    await wire.aclose()


async def test_wire_send_after_peer_left_marks_conn_lost() -> None:
    fake = FakeASGI()

    async def send(message: Any) -> None:
        raise OSError("client disconnected")

    wire = ASGIWire(fake.receive, send)
    conn = Conn(wire, make_request("/"), ConnSettings(ping_interval=None))
    wire.start(conn)
    conn.write(OP_TEXT, b"lost")
    async with timeout(5):
        await conn.wait_closed()
    assert conn.close_code == 1006
    await wire.aclose()


async def test_asgi_typed_app_announces_and_sends_heartbeats(stack: AsyncExitStack) -> None:
    """Under uvicorn pings are uvicorn's; the App still sends heartbeat messages browsers can see."""
    app = tether.App()
    route = WebSocketRoute("/ws", app.asgi(heartbeat_interval=0.1, heartbeat_timeout=1.0))
    port = await start_uvicorn(stack, Starlette(routes=[route]))
    async with tether.connect(f"ws://127.0.0.1:{port}/ws") as conn:
        async with timeout(5):
            welcome = await conn.receive()
            heartbeat = await conn.receive()
    assert '"heartbeat":{"interval":0.1,"timeout":1.0}' in welcome
    assert heartbeat.startswith('{"type":"heartbeat","data":{"t":')
