"""Typed apps (``tether.App``) end to end, on the three transports: tether's own picows server,
Starlette under uvicorn through ``app.asgi()``, and the memory transport of ``tether.testing``
(tests/transports.py). The client is a raw ``tether.Conn`` on each."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any, TypedDict

import msgspec
import pytest

import tether
from conftest import timeout
from tether.app import RESERVED_TYPES
from transports import Served, Start, start, start_uvicorn  # noqa: F401  (fixture; test_asgi imports start_uvicorn)


# -- the three transports: tests/transports.py ------------------------------------------


class Peer:
    """A ``tether.connect`` connection that speaks envelopes."""

    def __init__(self, conn: tether.Conn) -> None:
        self.conn = conn

    async def send(self, type: str, data: Any = None, id: Any = None) -> None:
        envelope: dict[str, Any] = {"type": type, "data": data}
        if id is not None:
            envelope["id"] = id
        await self.conn.send(json.dumps(envelope))

    async def receive(self) -> dict[str, Any]:
        async with timeout(5):
            message = await self.conn.receive()
        assert isinstance(message, str)
        result: dict[str, Any] = json.loads(message)
        return result

    async def request(self, type: str, data: Any = None, id: Any = 1) -> dict[str, Any]:
        await self.send(type, data, id)
        return await self.receive()


class connected:
    """``async with connected(served) as peer``: open, check the welcome, close at the end."""

    def __init__(self, served: Served, target: str = "/app", **kwargs: Any) -> None:
        self._connect = served.connect(target, **kwargs)

    async def __aenter__(self) -> Peer:
        async with timeout(5):
            peer = Peer(await self._connect.__aenter__())
        assert (await peer.receive())["type"] == "welcome"
        return peer

    async def __aexit__(self, *exc: object) -> None:
        async with timeout(5):
            await self._connect.__aexit__(*exc)


# -- the app under test ------------------------------------------------------------------


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class PointDC:
    x: int
    y: int


class PointTD(TypedDict):
    x: int
    y: int


class Add(msgspec.Struct):
    a: int
    b: int


def make_app() -> tether.App:
    app = tether.App()

    @app.on("struct")
    def on_struct(conn: tether.Conn, data: Point) -> Any:
        assert isinstance(data, Point)
        return {"kind": "Point", "sum": data.x + data.y}

    @app.on("dataclass")
    def on_dataclass(conn: tether.Conn, data: PointDC) -> Any:
        assert isinstance(data, PointDC)
        return {"kind": "PointDC", "sum": data.x + data.y}

    @app.on("typeddict")
    def on_typeddict(conn: tether.Conn, data: PointTD) -> Any:
        assert type(data) is dict
        return {"kind": "dict", "sum": data["x"] + data["y"]}

    @app.on("str")
    def on_str(conn: tether.Conn, data: str) -> Any:
        return {"kind": type(data).__name__, "sum": data.upper()}

    @app.on("dict")
    def on_dict(conn: tether.Conn, data: dict[str, int]) -> Any:
        return {"kind": type(data).__name__, "sum": sum(data.values())}

    @app.on("list")
    def on_list(conn: tether.Conn, data: list[int]) -> Any:
        return {"kind": type(data).__name__, "sum": sum(data)}

    @app.on("add")
    def add(conn: tether.Conn, data: Add) -> int:
        return data.a + data.b

    @app.on("add_async")
    async def add_async(conn: tether.Conn, data: Add) -> int:
        await asyncio.sleep(0)
        return data.a + data.b

    @app.on("boom")
    def boom(conn: tether.Conn) -> None:
        raise ValueError("secret database password is hunter2")

    @app.on("find")
    def find(conn: tether.Conn, data: str) -> None:
        raise tether.ReplyError("not_found", f"no user {data}")

    @app.on("emit")
    async def emit(conn: tether.Conn, data: Point) -> None:
        await conn.emit("point", data)

    return app


# -- welcome and typed data --------------------------------------------------------------


async def test_server_sends_welcome_first(start: Start) -> None:
    served = await start(make_app())
    async with timeout(5), served.connect() as conn:
        first = json.loads(await conn.receive())
    assert first["type"] == "welcome" and set(first["data"]["heartbeat"]) == {"interval", "timeout"}


@pytest.mark.parametrize(
    ("type", "data", "expected"),
    [
        ("struct", {"x": 1, "y": 2}, {"kind": "Point", "sum": 3}),
        ("dataclass", {"x": 1, "y": 2}, {"kind": "PointDC", "sum": 3}),
        ("typeddict", {"x": 1, "y": 2}, {"kind": "dict", "sum": 3}),
        ("str", "hi", {"kind": "str", "sum": "HI"}),
        ("dict", {"a": 1, "b": 2}, {"kind": "dict", "sum": 3}),
        ("list", [1, 2, 3], {"kind": "list", "sum": 6}),
    ],
)
async def test_server_decodes_data_into_the_annotated_type(start: Start, type: str, data: Any, expected: Any) -> None:
    async with connected(await start(make_app())) as peer:
        reply = await peer.request(type, data, id=7)
    assert reply == {"type": "reply", "data": expected, "id": 7}


@pytest.mark.parametrize("type", ["add", "add_async"])
@pytest.mark.parametrize("id", [1, 0, "req-🚀", ""])
async def test_server_replies_to_request_with_same_id(start: Start, type: str, id: Any) -> None:
    async with connected(await start(make_app())) as peer:
        reply = await peer.request(type, {"a": 2, "b": 3}, id=id)
        again = await peer.request(type, {"a": 4, "b": 5}, id=id)
    assert reply == {"type": "reply", "data": 5, "id": id}
    assert again == {"type": "reply", "data": 9, "id": id}


async def test_server_sends_no_reply_without_id(start: Start) -> None:
    async with connected(await start(make_app())) as peer:
        await peer.send("add", {"a": 1, "b": 1})
        reply = await peer.request("add", {"a": 2, "b": 2}, id="after")
    assert reply == {"type": "reply", "data": 4, "id": "after"}


# -- errors as data: each one leaves the connection usable --------------------------------

ERROR_CASES = [
    pytest.param('{"type": "nope", "data": 1, "id": 5}', "unknown_type", None, 5, id="unknown_type"),
    pytest.param('{"type": "add", "data": {"a": 1,', "bad_json", None, None, id="bad_json"),
    pytest.param("[1, 2]", "bad_envelope", None, None, id="array"),
    pytest.param('"add"', "bad_envelope", None, None, id="string"),
    pytest.param('{"data": {"a": 1, "b": 2}, "id": 6}', "bad_envelope", None, 6, id="missing_type"),
    pytest.param('{"type": 5, "id": 6}', "bad_envelope", None, 6, id="type_not_string"),
    pytest.param('{"type": "add", "data": {"a": 1, "b": 2}, "id": [1]}', "bad_envelope", "$.id", None, id="bad_id"),
    pytest.param('{"type": "add", "data": {"a": 1, "b": 2}, "id": 1.5}', "bad_envelope", "$.id", None, id="float_id"),
    pytest.param('{"type": "add", "data": {"a": 1, "b": "x"}, "id": 8}', "invalid_data", "$.data.b", 8, id="invalid_field"),
    pytest.param('{"type": "add", "data": {"a": 1}, "id": 8}', "invalid_data", "$.data", 8, id="missing_field"),
    pytest.param('{"type": "struct", "id": 8}', "invalid_data", None, 8, id="missing_data"),
    pytest.param('{"type": "find", "data": "bob", "id": 9}', "not_found", None, 9, id="app_reply_error"),
]


@pytest.mark.parametrize(("raw", "code", "path", "id"), ERROR_CASES)
async def test_server_receives_bad_message_replies_error_and_stays_open(
    start: Start, raw: str, code: str, path: str | None, id: Any
) -> None:
    async with connected(await start(make_app())) as peer:
        await peer.conn.send(raw)
        error = await peer.receive()
        after = await peer.request("add", {"a": 20, "b": 22}, id="next")
    assert error["type"] == "error"
    assert error["data"]["code"] == code
    assert isinstance(error["data"]["message"], str) and error["data"]["message"]
    assert error["data"].get("path") == path
    assert error.get("id") == id
    assert after == {"type": "reply", "data": 42, "id": "next"}


async def test_server_handler_raises_replies_internal_without_leaking(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tether")
    async with connected(await start(make_app())) as peer:
        error = await peer.request("boom", None, id=3)
        after = await peer.request("add", {"a": 1, "b": 2}, id=4)
    assert error == {"type": "error", "data": {"code": "internal", "message": "internal error"}, "id": 3}
    assert "hunter2" not in json.dumps(error)
    assert after == {"type": "reply", "data": 3, "id": 4}
    logged = [r for r in caplog.records if r.name == "tether" and r.exc_info]
    assert logged and "hunter2" in str(logged[0].exc_info[1])  # type: ignore[index]


async def test_server_handler_raises_without_id_still_errors(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="tether")
    async with connected(await start(make_app())) as peer:
        await peer.send("boom")
        error = await peer.receive()
        after = await peer.request("add", {"a": 1, "b": 2}, id=4)
    assert error == {"type": "error", "data": {"code": "internal", "message": "internal error"}}
    assert after["data"] == 3


async def test_server_receives_binary_on_typed_app_closes_1003(start: Start) -> None:
    async with connected(await start(make_app())) as peer:
        await peer.conn.send(b'{"type": "add", "data": {"a": 1, "b": 2}, "id": 1}')
        async with timeout(5):
            await peer.conn.wait_closed()
    assert peer.conn.close_code == 1003


# -- ordering and concurrency -------------------------------------------------------------


async def test_server_keeps_order_when_handler_awaits(start: Start) -> None:
    app = tether.App()
    done: list[str] = []

    @app.on("slow")
    async def slow(conn: tether.Conn) -> str:
        await asyncio.sleep(0.05)  # real work taking a while, not a wait for a condition
        done.append("slow")
        return "slow"

    @app.on("fast")
    def fast(conn: tether.Conn) -> str:
        done.append("fast")
        return "fast"

    async with connected(await start(app)) as peer:
        await peer.send("slow", id=1)
        await peer.send("fast", id=2)
        replies = [await peer.receive(), await peer.receive()]
    assert [(r["id"], r["data"]) for r in replies] == [(1, "slow"), (2, "fast")]
    assert done == ["slow", "fast"]


async def test_server_concurrent_handler_overlaps_later_messages(start: Start) -> None:
    app = tether.App()
    released = asyncio.Event()

    @app.on("wait", concurrent=True)
    async def wait(conn: tether.Conn) -> str:
        await released.wait()  # only the next message can release it: needs overlap
        return "waited"

    @app.on("release")
    def release(conn: tether.Conn) -> str:
        released.set()
        return "released"

    async with connected(await start(app)) as peer:
        await peer.send("wait", id=1)
        await peer.send("release", id=2)
        replies = [await peer.receive(), await peer.receive()]
    assert [(r["id"], r["data"]) for r in replies] == [(2, "released"), (1, "waited")]


# -- lifecycle hooks ----------------------------------------------------------------------


async def test_server_on_connect_rejects_with_close_code(start: Start) -> None:
    app = make_app()

    @app.on_connect
    def reject(conn: tether.Conn) -> None:
        if conn.headers.get("authorization") != "Bearer good":
            raise tether.CloseConnection(4001, "unauthorized")

    served = await start(app)
    async with timeout(5), served.connect() as conn:
        with pytest.raises(tether.ConnectionClosed) as caught:
            await conn.receive()
    assert caught.value.code == 4001 and conn.close_code == 4001
    async with connected(served, headers={"Authorization": "Bearer good"}) as peer:
        assert (await peer.request("add", {"a": 1, "b": 1}))["data"] == 2


async def test_server_on_connect_assigns_reach_handlers(start: Start) -> None:
    app = tether.App()

    @app.on_connect
    async def login(conn: tether.Conn) -> None:
        await asyncio.sleep(0)
        conn.assigns["user"] = conn.headers["X-USER"]
        conn.assigns["room"] = conn.query.get("room")

    @app.on("whoami")
    def whoami(conn: tether.Conn) -> dict[str, Any]:
        return {"user": conn.assigns["user"], "room": conn.assigns["room"], "path": conn.path}

    served = await start(app)
    async with connected(served, "/app?room=lobby", headers={"x-user": "ada"}) as peer:
        reply = await peer.request("whoami")
    assert reply["data"] == {"user": "ada", "room": "lobby", "path": "/app"}


async def test_server_on_disconnect_gets_code_after_client_close(start: Start) -> None:
    app = make_app()
    seen: asyncio.Future[tuple[int, str, str]] = asyncio.get_running_loop().create_future()

    @app.on_connect
    def hello(conn: tether.Conn) -> None:
        conn.assigns["name"] = "first"

    @app.on_disconnect
    def bye(conn: tether.Conn, code: int, reason: str) -> None:
        seen.set_result((code, reason, conn.assigns["name"]))

    async with connected(await start(app)) as peer:
        assert (await peer.request("add", {"a": 1, "b": 1}))["data"] == 2
        assert not seen.done()
    async with timeout(5):
        code, _, name = await seen
    assert (code, name) == (1000, "first")


async def test_server_emits_struct(start: Start) -> None:
    async with connected(await start(make_app())) as peer:
        await peer.send("emit", {"x": 3, "y": 4}, id=1)
        pushed = await peer.receive()
        reply = await peer.receive()
    assert pushed == {"type": "point", "data": {"x": 3, "y": 4}}
    assert reply == {"type": "reply", "id": 1}  # data None is left out (absent = null)


# -- registration (no transport) -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RESERVED_TYPES))
def test_app_rejects_reserved_type_at_registration(name: str) -> None:
    app = tether.App()
    with pytest.raises(ValueError, match="reserved"):
        app.on(name)
    assert name not in app.routes


def test_app_rejects_duplicate_type() -> None:
    app = tether.App()
    app.on("chat")(lambda conn: None)
    with pytest.raises(ValueError):
        app.on("chat")


async def test_server_handler_runs_in_a_task_so_asyncio_timeout_works(start: Start) -> None:
    """Handlers run inline but inside the connection's task: asyncio.timeout, current_task work,
    before and after the handler suspends, and a timeout cancels only that handler."""
    app = tether.App()
    tasks: list[asyncio.Task[Any] | None] = []

    @app.on("quick")
    async def quick(conn: tether.Conn) -> str:
        async with asyncio.timeout(5):  # entered without suspending
            tasks.append(asyncio.current_task())
        return "quick"

    @app.on("sleepy")
    async def sleepy(conn: tether.Conn, seconds: float) -> str:
        tasks.append(asyncio.current_task())
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(seconds)  # suspends inside the timeout
        except TimeoutError:
            return "timed out"
        finally:
            tasks.append(asyncio.current_task())
        return "slept"

    async with connected(await start(app)) as peer:
        await peer.send("quick", id=1)
        await peer.send("sleepy", 10.0, id=2)
        await peer.send("sleepy", 0.0, id=3)
        await peer.send("quick", id=4)
        replies = [await peer.receive() for _ in range(4)]
    assert [(r["id"], r["data"]) for r in replies] == [(1, "quick"), (2, "timed out"), (3, "slept"), (4, "quick")]
    assert all(t is not None for t in tasks)
    assert len(set(map(id, tasks))) == 1  # one task: the connection's, before and after suspending


def test_app_refuses_to_declare_a_reserved_type_it_would_send() -> None:
    app = tether.App()
    with pytest.raises(ValueError):
        app.emits("joined", dict)
