"""``tether.testing``: drive handlers in-process through a MemoryWire pair, no network."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import msgspec
import pytest

import tether
import tether.testing
from conftest import echo, timeout


class Add(msgspec.Struct):
    a: int
    b: int


class Point(msgspec.Struct):
    x: int
    y: int


def make_app() -> tether.App:
    app = tether.App()

    @app.on_connect
    def login(conn: tether.Conn) -> None:
        if conn.headers.get("authorization") == "Bearer bad":
            raise tether.CloseConnection(4001, "unauthorized")
        conn.assigns["user"] = conn.query.get("user", "anon")

    @app.on("add")
    def add(conn: tether.Conn, data: Add) -> int:
        return data.a + data.b

    @app.on("slow_add")
    async def slow_add(conn: tether.Conn, data: Add) -> int:
        await asyncio.sleep(0.02)  # work that takes a while
        return data.a + data.b

    @app.on("whoami")
    def whoami(conn: tether.Conn) -> dict[str, Any]:
        return {"user": conn.assigns["user"], "path": conn.path, "agent": conn.headers.get("USER-AGENT")}

    @app.on("find")
    def find(conn: tether.Conn, data: str) -> None:
        raise tether.ReplyError("not_found", f"no {data}")

    @app.on("boom")
    def boom(conn: tether.Conn) -> None:
        raise RuntimeError("hunter2")

    @app.on("move")
    async def move(conn: tether.Conn, data: Point) -> str:
        await conn.emit("moved", data)
        await conn.emit("moved", Point(data.x + 1, data.y + 1))
        return "ok"

    return app


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prove the helper never opens a socket."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tether.testing opened a socket")

    for method in ("bind", "connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, method, refuse)


async def test_testing_request_returns_reply_data() -> None:
    async with timeout(5), tether.testing.connect(make_app()) as client:
        assert client.welcome is not None and client.welcome.type == "welcome"
        assert await client.request("add", {"a": 1, "b": 2}) == 3
        assert await client.request("slow_add", {"a": 2, "b": 2}, id="s-1") == 4
        assert await client.request("add", Add(5, 5)) == 10


async def test_testing_request_error_reply_raises_reply_error() -> None:
    async with timeout(5), tether.testing.connect(make_app()) as client:
        with pytest.raises(tether.ReplyError) as caught:
            await client.request("find", "bob")
        assert (caught.value.code, caught.value.message) == ("not_found", "no bob")
        with pytest.raises(tether.testing.ErrorReply) as invalid:
            await client.request("add", {"a": 1, "b": "x"})
        assert (invalid.value.code, invalid.value.path) == ("invalid_data", "$.data.b")
        with pytest.raises(tether.ReplyError, match="unknown_type"):
            await client.request("nope")
        assert await client.request("add", {"a": 1, "b": 1}) == 2  # still open


async def test_testing_internal_error_is_logged_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tether")
    async with timeout(5), tether.testing.connect(make_app()) as client:
        with pytest.raises(tether.ReplyError) as caught:
            await client.request("boom")
    assert (caught.value.code, caught.value.message) == ("internal", "internal error")
    assert any("hunter2" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_testing_receives_emitted_messages_in_order() -> None:
    async with timeout(5), tether.testing.connect(make_app()) as client:
        # The pushes arrive before the reply: request() keeps them for receive().
        assert await client.request("move", {"x": 1, "y": 2}) == "ok"
        first, second = await client.receive(), await client.receive()
        await client.send("move", {"x": 0, "y": 0})
        third = await client.receive()
    assert (first.type, first.data) == ("moved", {"x": 1, "y": 2})
    assert (second.type, second.data) == ("moved", {"x": 2, "y": 3})
    assert (third.type, third.data, third.id) == ("moved", {"x": 0, "y": 0}, None)


async def test_testing_send_raw_gets_error_and_connection_stays_open() -> None:
    async with timeout(5), tether.testing.connect(make_app()) as client:
        await client.send_raw("{bad")
        error = await client.receive()
        assert (error.type, error.data["code"]) == ("error", "bad_json")
        assert await client.request("add", {"a": 2, "b": 3}) == 5


async def test_testing_binary_to_typed_app_closes_1003() -> None:
    async with timeout(5), tether.testing.connect(make_app()) as client:
        await client.send_raw(b"{}")
        with pytest.raises(tether.ConnectionClosed) as caught:
            await client.receive()
    assert caught.value.code == 1003 == client.close_code


async def test_testing_request_details_reach_the_handler() -> None:
    app = make_app()
    headers = {"User-Agent": "pytest"}
    async with timeout(5), tether.testing.connect(app, "/ws?user=ada", headers=headers) as client:
        assert await client.request("whoami") == {"user": "ada", "path": "/ws", "agent": "pytest"}
        assert client.server_conn.assigns["user"] == "ada"
    async with timeout(5), tether.testing.connect(app, query={"user": "bob"}) as client:
        assert (await client.request("whoami"))["user"] == "bob"


async def test_testing_on_connect_rejection_raises_connection_closed() -> None:
    with pytest.raises(tether.ConnectionClosed) as caught:
        async with timeout(5), tether.testing.connect(make_app(), headers={"Authorization": "Bearer bad"}):
            pytest.fail("connected")
    assert (caught.value.code, caught.value.reason) == (4001, "unauthorized")


async def test_testing_exit_closes_1000_and_runs_on_disconnect() -> None:
    app = make_app()
    seen: list[tuple[int, str]] = []

    @app.on_disconnect
    def bye(conn: tether.Conn, code: int, reason: str) -> None:
        seen.append((code, conn.assigns["user"]))

    async with timeout(5), tether.testing.connect(app) as client:
        assert seen == []
    assert seen == [(1000, "anon")]  # the handler has finished when the block exits
    assert client.server_conn.state is tether.ConnState.CLOSED


async def test_testing_plain_handler_echo() -> None:
    async with timeout(5), tether.testing.connect(echo) as client:
        assert client.welcome is None
        await client.send_raw("hi")
        await client.send_raw(b"\x00bin")
        assert await client.receive_raw() == "hi"
        assert await client.receive_raw() == b"\x00bin"


async def test_testing_keeps_per_connection_order() -> None:
    async with timeout(5), tether.testing.connect(make_app()) as client:
        await client.send("slow_add", {"a": 1, "b": 1}, id=1)
        await client.send("add", {"a": 2, "b": 2}, id=2)
        replies = [await client.receive(), await client.receive()]
    assert [(r.id, r.data) for r in replies] == [(1, 2), (2, 4)]


async def test_testing_receive_times_out() -> None:
    async with tether.testing.connect(make_app(), timeout=0.05) as client:
        with pytest.raises(TimeoutError):
            await client.receive()


async def test_memory_wire_applies_backpressure_to_a_fast_writer() -> None:
    total = 200
    finished = asyncio.Event()

    async def flood(conn: tether.Conn) -> None:
        for i in range(total):
            await conn.send(f"{i:04d}" + "x" * 96)
        finished.set()
        await conn.receive()

    async with tether.testing.connect(flood, max_queue=4, write_limit=1000) as client:
        for _ in range(20):
            await asyncio.sleep(0)  # let the handler run as far as it can
        # The client read nothing: its inbox filled, it stopped reading, the writer waits.
        assert client.server_conn._write_paused and not finished.is_set()
        received = [await client.receive_raw() for _ in range(total)]
        assert finished.is_set()
    assert [str(m)[:4] for m in received] == [f"{i:04d}" for i in range(total)]


def bearer(request: tether.Request) -> tether.Identity | None:
    return tether.Identity("ada") if tether.auth.token(request) == "good" else None


async def test_testing_applies_the_auth_hook_like_the_server() -> None:
    app = make_app()

    @app.on("subject")
    def subject(conn: tether.Conn) -> str:
        return str(conn.identity.subject)

    with pytest.raises(tether.InvalidHandshake) as refused:
        async with timeout(5), tether.testing.connect(app, auth=bearer):
            pytest.fail("connected")
    assert refused.value.status == 401
    async with timeout(5), tether.testing.connect(app, auth=bearer, headers={"Authorization": "Bearer good"}) as client:
        assert await client.request("subject") == "ada"


async def test_testing_a_server_uses_its_routes_policy_and_hub() -> None:
    app = make_app()
    server = tether.Server({"/ws": app}, auth=bearer, allowed_origins=["https://app.example"])
    good = {"Authorization": "Bearer good"}
    for path, headers, status in [("/nope", good, 404), ("/ws", {}, 401), ("/ws", {**good, "Origin": "https://evil.example"}, 403)]:
        with pytest.raises(tether.InvalidHandshake) as refused:
            async with timeout(5), tether.testing.connect(server, path, headers=headers):
                pytest.fail("connected")
        assert refused.value.status == status
    async with timeout(5), tether.testing.connect(server, "/ws?user=ada", headers={**good, "Origin": "https://app.example"}) as client:
        assert (await client.request("whoami"))["user"] == "ada"
        assert client.server_conn.hub is server.hub and client.server_conn in server.connections
    assert server.connections == set()
