"""The server over real sockets on 127.0.0.1: routing, HTTP, handshake checks, handler
lifecycle, concurrency and backpressure."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from pathlib import Path

import pytest
from conftest import ServerFactory, assert_serves, echo, timeout, url
from rawws import OP_BINARY, OP_PING, OP_PONG, OP_TEXT, RawWS, http_get

import tether

# -- echo and iteration ------------------------------------------------------------------


async def test_debug_mode_is_on_in_tests() -> None:
    assert asyncio.get_running_loop().get_debug()


async def test_server_echoes_text_as_text(echo_server: tether.Server) -> None:
    async with timeout(5), tether.connect(url(echo_server)) as conn:
        await conn.send("hello server! ünïcödé 🚀")
        reply = await conn.receive()
    assert reply == "hello server! ünïcödé 🚀" and isinstance(reply, str)


async def test_server_echoes_binary_as_binary(echo_server: tether.Server) -> None:
    data = bytes(range(256)) * 100
    async with timeout(5), tether.connect(url(echo_server)) as conn:
        await conn.send(data)
        reply = await conn.receive()
    assert reply == data and isinstance(reply, bytes)


async def test_server_echoes_frames_as_sent_to_raw_client(echo_server: tether.Server) -> None:
    ws = await RawWS.open(echo_server.port)
    await ws.send_frame(OP_TEXT, b"text")
    await ws.send_frame(OP_BINARY, b"\xff\x00")
    async with timeout(5):
        assert await ws.recv_frame() == (OP_TEXT, True, b"text")
        assert await ws.recv_frame() == (OP_BINARY, True, b"\xff\x00")
    await ws.aclose()


async def test_server_async_for_ends_on_normal_close(make_server: ServerFactory) -> None:
    got: list[object] = []
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        async for message in conn:
            got.append(message)
        ended.set_result(None)

    server = await make_server({"/socket": handler})
    async with timeout(5):
        async with tether.connect(url(server)) as conn:
            for i in range(3):
                await conn.send(f"m{i}")
        await ended
    assert got == ["m0", "m1", "m2"]
    assert conn.close_code == 1000


# -- plain HTTP on the same port -------------------------------------------------------------


async def test_server_get_health_returns_200(echo_server: tether.Server) -> None:
    status, _, body = await http_get(echo_server.port, "/health")
    assert status == 200 and body


async def test_server_get_unknown_path_returns_404(echo_server: tether.Server) -> None:
    status, _, _ = await http_get(echo_server.port, "/nope")
    assert status == 404


async def test_server_upgrade_on_unknown_path_returns_404(echo_server: tether.Server) -> None:
    ws = await RawWS.open(echo_server.port, "/nope")
    assert ws.status == 404
    await ws.aclose()


async def test_server_get_socket_path_without_upgrade_returns_426(echo_server: tether.Server) -> None:
    status, headers, body = await http_get(echo_server.port, "/socket")
    assert status == 426
    assert headers.get("upgrade", "").lower() == "websocket"
    assert b"WebSocket" in body


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """tmp/secret.txt beside tmp/www/{index.html, app.css, sub/index.html, "a b.txt"}."""
    (tmp_path / "secret.txt").write_text("top secret")
    www = tmp_path / "www"
    (www / "sub").mkdir(parents=True)
    (www / "index.html").write_text("<h1>home</h1>")
    (www / "app.css").write_text("body {}")
    (www / "sub" / "index.html").write_text("<h1>sub</h1>")
    (www / "a b.txt").write_text("spaced")
    return www


async def test_server_get_static_file_returns_it_with_content_type(make_server: ServerFactory, site: Path) -> None:
    server = await make_server({"/socket": echo}, static_dir=site)
    status, headers, body = await http_get(server.port, "/app.css")
    assert (status, body) == (200, b"body {}")
    assert headers["content-type"].startswith("text/css")


async def test_server_get_root_returns_index_html(make_server: ServerFactory, site: Path) -> None:
    server = await make_server({"/socket": echo}, static_dir=site)
    status, headers, body = await http_get(server.port, "/")
    assert (status, body) == (200, b"<h1>home</h1>")
    assert headers["content-type"].startswith("text/html")
    status, _, body = await http_get(server.port, "/sub/")
    assert (status, body) == (200, b"<h1>sub</h1>")


async def test_server_get_static_with_query_string_ignores_query(make_server: ServerFactory, site: Path) -> None:
    server = await make_server({"/socket": echo}, static_dir=site)
    status, _, body = await http_get(server.port, "/app.css?v=3")
    assert (status, body) == (200, b"body {}")


async def test_server_get_percent_encoded_static_name_returns_it(make_server: ServerFactory, site: Path) -> None:
    server = await make_server({"/socket": echo}, static_dir=site)
    status, _, body = await http_get(server.port, "/a%20b.txt")
    assert (status, body) == (200, b"spaced")


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/..%5csecret.txt",
        "//etc/passwd",
        "/%2fetc%2fpasswd",
        "/%00",
        "/app.css%00.txt",
    ],
)
async def test_server_get_path_traversal_returns_404(make_server: ServerFactory, site: Path, path: str) -> None:
    server = await make_server({"/socket": echo}, static_dir=site)
    status, _, body = await http_get(server.port, path)
    assert status == 404
    assert b"secret" not in body and b"root:" not in body
    await assert_serves(server)


async def test_server_get_without_static_dir_does_not_serve_cwd(echo_server: tether.Server) -> None:
    status, _, _ = await http_get(echo_server.port, "/pyproject.toml")
    assert status == 404


# -- handshake checks ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["8", "12", "14", None])
async def test_server_wrong_websocket_version_returns_426_naming_13(echo_server: tether.Server, version: str | None) -> None:
    """[4.2.2] Answer an unsupported version with 426 and the version we speak."""
    ws = await RawWS.connect(echo_server.port)
    status = await ws.handshake(headers={"Sec-WebSocket-Version": version})
    assert status == 426
    assert ws.headers.get("sec-websocket-version") == "13"
    await ws.aclose()


async def test_server_cross_origin_returns_403(echo_server: tether.Server) -> None:
    """[10.2] Same-origin by default: a page on another site cannot open a socket."""
    ws = await RawWS.connect(echo_server.port)
    assert await ws.handshake(headers={"Origin": "http://evil.example"}) == 403
    await ws.aclose()
    # Same host name, other port: another origin too.
    ws = await RawWS.connect(echo_server.port)
    assert await ws.handshake(headers={"Host": f"127.0.0.1:{echo_server.port}", "Origin": "http://127.0.0.1:1"}) == 403
    await ws.aclose()


async def test_server_same_origin_is_accepted(echo_server: tether.Server) -> None:
    host = f"127.0.0.1:{echo_server.port}"
    ws = await RawWS.connect(echo_server.port)
    assert await ws.handshake(headers={"Host": host, "Origin": f"http://{host}"}) == 101
    await ws.send_frame(OP_TEXT, b"same origin")
    async with timeout(5):
        assert await ws.recv_frame() == (OP_TEXT, True, b"same origin")
    await ws.aclose()


async def test_server_no_origin_is_accepted(echo_server: tether.Server) -> None:
    """Non-browser clients send no Origin."""
    ws = await RawWS.connect(echo_server.port)
    assert await ws.handshake(headers={"Origin": None}) == 101
    await ws.aclose()


async def test_server_allowed_origins_list_is_enforced(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, allowed_origins=["https://app.example"])
    for origin, expected in [("https://app.example", 101), ("https://evil.example", 403), (f"http://127.0.0.1:{server.port}", 403)]:
        ws = await RawWS.connect(server.port)
        assert await ws.handshake(headers={"Host": f"127.0.0.1:{server.port}", "Origin": origin}) == expected, origin
        await ws.aclose()


async def test_server_max_connections_returns_503_then_accepts_after_close(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, max_connections=2)
    async with timeout(5):
        first = await tether.connect(url(server))
        second = await tether.connect(url(server))
        with pytest.raises(tether.InvalidHandshake) as info:
            await tether.connect(url(server))
        assert info.value.status == 503
        ws = await RawWS.open(server.port)
        assert ws.status == 503
        await ws.aclose()
        await first.close()
        await second.close()
        await assert_serves(server)


# -- handler lifecycle ----------------------------------------------------------------------


async def test_server_handler_raises_closes_1011_logs_and_hides_details(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(conn: tether.Conn) -> None:
        await conn.receive()
        raise ValueError("db password is hunter2")

    server = await make_server({"/socket": broken, "/echo": echo})
    caplog.set_level(logging.ERROR, logger="tether")
    ws = await RawWS.open(server.port)
    await ws.send_frame(OP_TEXT, b"boom")
    async with timeout(5):
        code, reason = await ws.close_frame()
    assert (code, reason) == (1011, b"internal error")
    await ws.aclose()
    async with timeout(5), tether.connect(url(server)) as conn:
        await conn.send("again")
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert (info.value.code, info.value.reason) == (1011, "internal error")
    assert "hunter2" not in str(info.value)
    failures = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], ValueError)]
    assert len(failures) == 2
    assert "hunter2" in caplog.text and "Traceback" in caplog.text
    await assert_serves(server, "/echo")


async def test_server_handler_raises_close_connection_sends_its_code(make_server: ServerFactory) -> None:
    async def refuse(conn: tether.Conn) -> None:
        raise tether.CloseConnection(4001, "nope")

    server = await make_server({"/socket": refuse})
    async with timeout(5), tether.connect(url(server)) as conn:
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert (info.value.code, info.value.reason) == (4001, "nope")


async def test_server_handler_returns_closes_1000(make_server: ServerFactory) -> None:
    async def brief(conn: tether.Conn) -> None:
        await conn.send("bye")

    server = await make_server({"/socket": brief})
    async with timeout(5), tether.connect(url(server)) as conn:
        assert await conn.receive() == "bye"
        with pytest.raises(tether.ConnectionClosedOK) as info:
            await conn.receive()
    assert info.value.code == 1000


async def test_server_handler_returning_drops_tcp_after_close(make_server: ServerFactory) -> None:
    async def brief(conn: tether.Conn) -> None:
        return

    server = await make_server({"/socket": brief})
    ws = await RawWS.open(server.port)
    async with timeout(5):
        code, _ = await ws.close_frame()
        assert code == 1000
        await ws.send_frame(8, b"\x03\xe8")
        assert await ws.reader.read() == b""
    await ws.aclose()
    async with timeout(5):
        while server.connections:  # the server forgets the connection once TCP is gone
            await next(iter(server.connections)).wait_closed()
            await asyncio.sleep(0)


async def test_server_handler_sees_request_details(make_server: ServerFactory) -> None:
    seen: asyncio.Future[tether.Conn] = asyncio.get_running_loop().create_future()

    async def inspect(conn: tether.Conn) -> None:
        seen.set_result(conn)
        await conn.receive()

    server = await make_server({"/socket": inspect})
    ws = await RawWS.open(server.port, "/socket?room=lobby&n=2&empty=", {"X-Token": "abc123", "Origin": None})
    async with timeout(5):
        conn = await seen
    assert conn.path == "/socket"
    assert dict(conn.query) == {"room": "lobby", "n": "2", "empty": ""}
    assert conn.headers["x-token"] == "abc123" and conn.headers["X-TOKEN"] == "abc123"
    assert conn.remote_address == ws.writer.get_extra_info("sockname")
    assert conn.state is tether.ConnState.OPEN
    conn.assigns["user"] = "ada"
    assert conn.assigns == {"user": "ada"}
    await ws.aclose()


async def test_server_connections_tracks_open_conns(make_server: ServerFactory) -> None:
    opened: asyncio.Queue[tether.Conn] = asyncio.Queue()

    async def handler(conn: tether.Conn) -> None:
        await opened.put(conn)
        async for _ in conn:
            pass

    server = await make_server({"/socket": handler})
    async with timeout(5):
        async with tether.connect(url(server)):
            conn = await opened.get()
            assert server.connections == {conn}
        await conn.wait_closed()
        while server.connections:
            await asyncio.sleep(0)
    assert conn.close_code == 1000


async def test_server_keeps_no_handler_task_of_a_closed_connection(make_server: ServerFactory) -> None:
    """A long-running server does not grow with the connections it has served: once a
    connection's handler has ended, nothing of the server holds its task."""
    app = tether.App()

    @app.on("echo")
    def echo_it(conn: tether.Conn, data: str) -> str:
        return data

    def handler_tasks() -> int:
        gc.collect()
        return sum(
            1 for obj in gc.get_objects()
            if isinstance(obj, asyncio.Task) and getattr(obj.get_coro(), "__qualname__", "") == "run_handler"
        )

    server = await make_server({"/app": app})
    async with timeout(10):
        for n in range(20):
            async with tether.Client(url(server, "/app")) as client:
                assert await client.request("echo", f"n{n}") == f"n{n}"
    # Each handler ends a loop iteration or two after its connection is lost.
    deadline = asyncio.get_running_loop().time() + 5
    while (left := handler_tasks()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert left == 0, f"{left} handler tasks of closed connections are still held"


async def test_server_close_closes_clients_with_1001(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo})
    async with timeout(5):
        conn = await tether.connect(url(server))
        await conn.send("x")
        assert await conn.receive() == "x"
        await server.close()
        with pytest.raises(tether.ConnectionClosedOK) as info:
            await conn.receive()
    assert info.value.code == 1001


# -- concurrency and backpressure --------------------------------------------------------------


async def test_server_concurrent_sends_from_20_tasks_arrive_intact_and_ordered(echo_server: tether.Server) -> None:
    """Sends from many tasks share one write path: no interleaved or lost frames, and
    each task's messages keep their order. Sizes vary so backpressure kicks in midway."""
    tasks, per_task = 20, 200

    def message(t: int, i: int) -> bytes:
        return f"{t}:{i}:".encode() + bytes([t]) * ((t * 997 + i * 131) % 8000)

    async with timeout(30), tether.connect(url(echo_server)) as conn:

        async def sender(t: int) -> None:
            for i in range(per_task):
                await conn.send(message(t, i))

        async def receiver() -> list[bytes]:
            return [await conn.receive() for _ in range(tasks * per_task)]  # type: ignore[misc]

        receiving = asyncio.create_task(receiver())
        await asyncio.gather(*(sender(t) for t in range(tasks)))
        received = await receiving

    next_index = [0] * tasks
    for data in received:
        t, i, _ = data.split(b":", 2)
        t_, i_ = int(t), int(i)
        assert i_ == next_index[t_], f"task {t_} message {i_} out of order"
        assert data == message(t_, i_)
        next_index[t_] += 1
    assert next_index == [per_task] * tasks


def rss() -> int:
    """Resident set size of this process (server and client run in it) in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_server_send_to_client_not_reading_blocks_and_memory_stays_bounded(make_server: ServerFactory) -> None:
    """A client that stops reading: the handler's send awaits (the transport paused writing)
    instead of buffering; RSS stays far below what the unsent messages would take."""
    bound, size = 1000, 64 * 1024  # 62.5 MiB in all if nothing pushed back
    sent = 0
    opened: asyncio.Future[tether.Conn] = asyncio.get_running_loop().create_future()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def flood(conn: tether.Conn) -> None:
        nonlocal sent
        opened.set_result(conn)
        for i in range(bound):
            await conn.send(i.to_bytes(4, "big") * (size // 4))
            sent += 1
        done.set_result(None)
        await conn.receive()

    server = await make_server({"/socket": flood})
    before = rss()
    ws = await RawWS.open(server.port, rcvbuf=4096)
    async with timeout(10):
        conn = await opened
        # Wait (without a timer) until a send is suspended on the transport's drain.
        while not (conn._drain is not None and not conn._drain.done()):
            await asyncio.sleep(0)
    assert conn._write_paused
    blocked_at = sent
    assert blocked_at < bound // 10, f"{blocked_at} sends of 64 KiB completed without backpressure"
    for _ in range(100):  # loop iterations, not time: nothing may move while nobody reads
        await asyncio.sleep(0)
    assert sent == blocked_at and not done.done()
    grown = rss() - before
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown >> 20} MiB"

    sock = ws.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # now read at full speed
    async with timeout(60):
        i = 0
        while i < bound:
            opcode, fin, payload = await ws.recv_frame()
            if opcode in (OP_PING, OP_PONG):  # keepalive may ping meanwhile
                continue
            assert (opcode, fin, len(payload)) == (OP_BINARY, True, size)
            assert payload[:4] == i.to_bytes(4, "big") and payload[-4:] == i.to_bytes(4, "big")
            i += 1
        await done
    assert sent == bound
    await ws.aclose()


async def test_server_pages_serve_one_file_for_every_path_under_a_prefix(make_server: ServerFactory, tmp_path: Path) -> None:
    (tmp_path / "call").mkdir()
    (tmp_path / "call" / "index.html").write_bytes(b"<p>call page</p>")
    (tmp_path / "call" / "real.txt").write_bytes(b"a file of its own")
    server = await make_server({"/socket": echo}, static_dir=tmp_path, pages={"/call/": "call/index.html"})
    for path, status, body in [
        ("/call/amber-otter-1", 200, b"<p>call page</p>"),
        ("/call/a/b", 200, b"<p>call page</p>"),
        ("/call/real.txt", 200, b"a file of its own"),
        ("/other/x", 404, None),
    ]:
        got_status, _, got_body = await http_get(server.port, path)
        assert got_status == status and (body is None or got_body == body), path
