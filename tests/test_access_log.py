"""Structured logs: one ``tether.access`` line per connection opened and closed (path, remote
address, close code, duration, messages in and out), handler errors with their message type,
JSON when asked; nothing is done per connection unless the level is enabled."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from tests.conftest import ServerFactory, echo, make_server, timeout  # noqa: F401
from tests.test_forwarded import open_from
from tests.tether_run import Typed
from tether.server.logs import ACCESS, JSONFormatter, configure


def access(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tether.access" and getattr(r, "event", None) == event]


async def test_open_and_close_lines_carry_path_remote_code_and_duration(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, "tether.access")
    server = await make_server({"/ws": echo})
    async with timeout(5):
        conn = await tether.connect(f"ws://127.0.0.1:{server.port}/ws")
        local = conn._transport._raw.get_extra_info("sockname")  # type: ignore[attr-defined]
        await conn.send("hi")
        await conn.receive()
        await conn.close(4000, "done")
        while not access(caplog, "close"):
            await tether_yield()
    (opened,), (closed,) = access(caplog, "open"), access(caplog, "close")
    remote = f"127.0.0.1:{local[1]}"
    assert (opened.path, opened.remote) == ("/ws", remote)  # type: ignore[attr-defined]
    assert opened.getMessage() == f"open /ws {remote}"
    assert (closed.path, closed.remote, closed.code) == ("/ws", remote, 4000)  # type: ignore[attr-defined]
    assert 0 <= closed.duration_seconds < 5  # type: ignore[attr-defined]
    assert closed.getMessage().startswith(f"close /ws {remote} code=4000 ")


async def tether_yield() -> None:
    import asyncio

    await asyncio.sleep(0.01)  # polling the condition: the close line is logged on the loop


async def test_access_lines_show_the_client_behind_a_trusted_proxy(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, "tether.access")
    server = await make_server({"/ws": echo}, forwarded_allow_ips="127.0.0.1")
    ws = await open_from("127.0.0.1", server.port, additional_headers={"X-Forwarded-For": "203.0.113.7"})
    await ws.close()
    async with timeout(5):
        while not access(caplog, "close"):
            await tether_yield()
    assert access(caplog, "open")[0].remote == "203.0.113.7:0"  # type: ignore[attr-defined]


async def test_nothing_is_logged_or_kept_per_connection_when_the_level_is_off(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, "tether.access")
    opened: list[tether.Conn] = []

    async def handler(conn: tether.Conn) -> None:
        opened.append(conn)
        await echo(conn)

    server = await make_server({"/ws": handler})
    async with timeout(5), tether.connect(f"ws://127.0.0.1:{server.port}/ws") as conn:
        await conn.send("x")
        await conn.receive()
        # the connection's close callbacks: the policy's only (no log, no metrics)
        assert len(opened[0]._close_callbacks or ()) == 1  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.name == "tether.access"]


def record(message: str, *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    made = logging.LogRecord("tether.access", logging.INFO, __file__, 1, message, args, info)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def test_json_formatter_writes_one_object_with_the_extra_fields() -> None:
    line = JSONFormatter().format(record("close %s code=%d", "/ws", 1000, event="close", code=1000, remote="1.2.3.4:5"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "close /ws code=1000" and entry["level"] == "info" and entry["logger"] == "tether.access"
    assert (entry["event"], entry["code"], entry["remote"]) == ("close", 1000, "1.2.3.4:5")
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    failed = json.loads(JSONFormatter().format(record("handler failed", exc=True, type="chat")))
    assert failed["type"] == "chat" and "ValueError: boom" in failed["exception"] and "\n" in failed["exception"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, access_level = root.handlers[:], root.level, ACCESS.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ACCESS.setLevel(access_level)


def test_configure_sets_level_format_and_access_log(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("warning", "json", access_log=True)
    logging.getLogger("tether").warning("careful", extra={"path": "/ws"})
    logging.getLogger("tether").info("not shown")
    err = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in err] == ["careful"] and json.loads(err[0])["path"] == "/ws"
    configure("info", "text", access_log=False)
    assert not ACCESS.isEnabledFor(logging.INFO) and logging.getLogger("tether").isEnabledFor(logging.INFO)
    with pytest.raises(ValueError, match="log level"):
        configure("loud")
    with pytest.raises(ValueError, match="log format"):
        configure("info", "xml")




async def test_close_line_counts_messages_in_and_out(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, "tether.access")
    app = tether.App()

    @app.on("echo")
    def echo_typed(conn: tether.Conn, data: Any) -> Any:
        return data

    server = await make_server({"/ws": app})
    async with timeout(5):
        async with tether.connect(f"ws://127.0.0.1:{server.port}/ws") as conn:
            client = Typed(conn)
            assert await client.request("echo", 1) == 1
            assert await client.request("echo", 2) == 2
        while not access(caplog, "close"):
            await tether_yield()
    (closed,) = access(caplog, "close")
    assert (closed.messages_in, closed.messages_out) == (2, 3)  # type: ignore[attr-defined]  # welcome + 2 replies
    assert closed.getMessage().endswith(" in=2 out=3")


async def test_handler_error_log_names_the_message_type(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    app = tether.App()

    @app.on("explode")
    def explode(conn: tether.Conn) -> None:
        raise RuntimeError("on purpose")

    server = await make_server({"/ws": app})
    async with timeout(5), tether.connect(f"ws://127.0.0.1:{server.port}/ws") as conn:
        with pytest.raises(tether.ReplyError):
            await Typed(conn).request("explode")
    (failed,) = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert getattr(failed, "type", None) == "explode" and "explode" in failed.getMessage()
