"""A typed app for the operations tests, served by the ``tether run`` command.

    tether run --app-dir tests/servers ops_app:app [options]
    tether run --app-dir tests/servers ops_app:make_app --factory

Clients connect to ``/ws`` (``?room=R`` joins room R at connect). Message types:

- ``whoami`` -> ``{"pid", "remote": [host, port], "origin", "metrics_dir"}`` (the server
  process, who the connection says its client is, the shared metrics directory of workers);
- ``echo`` data -> data;
- ``say`` ``{"room", "text"}`` broadcasts ``said`` ``{"text", "pid"}`` to the room;
- ``fail`` raises (an ``internal`` error reply); ``refuse`` raises ``ReplyError("nope", ...)``.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

import tether


class Say(msgspec.Struct):
    room: str
    text: str


def make_app() -> dict[str, tether.App]:
    app = tether.App()

    @app.on_connect
    async def joined(conn: tether.Conn) -> None:
        room = conn.query.get("room")
        if room:
            await conn.join(room)

    @app.on("whoami")
    def whoami(conn: tether.Conn) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "remote": conn.remote_address,
            "origin": conn.headers.get("Origin"),
            "metrics_dir": os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
        }

    @app.on("echo")
    def echo(conn: tether.Conn, data: Any) -> Any:
        return data

    @app.on("say")
    async def say(conn: tether.Conn, data: Say) -> int:
        return await app.broadcast(data.room, "said", {"text": data.text, "pid": os.getpid()})

    @app.on("fail")
    def fail(conn: tether.Conn) -> None:
        raise RuntimeError("this handler fails on purpose")

    @app.on("refuse")
    def refuse(conn: tether.Conn) -> None:
        raise tether.ReplyError("nope", "refused on purpose")

    return {"/ws": app}


app = make_app()
