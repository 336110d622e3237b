"""A small chat: two message types from the client (``nick``, ``say``), pushes to everyone.

Run alone with ``python -m examples.chat.app`` (port 8001) or as part of ``make demo``.
Rooms that span processes come with tether's broker; this example keeps everyone in one
process-local set.
"""

from __future__ import annotations

import itertools

import msgspec

import tether

app = tether.App()
members: set[tether.Conn] = set()
_guest = itertools.count(1)


class Nick(msgspec.Struct):
    name: str


class Say(msgspec.Struct):
    text: str


class Said(msgspec.Struct):
    name: str
    text: str


class Joined(msgspec.Struct):
    name: str


app.emits("said", Said)
app.emits("arrived", Joined)


@app.on_connect
async def arrived(conn: tether.Conn) -> None:
    conn.assigns["name"] = f"guest{next(_guest)}"
    members.add(conn)
    await _everyone("arrived", Joined(conn.assigns["name"]))


@app.on_disconnect
def left(conn: tether.Conn, code: int, reason: str) -> None:
    members.discard(conn)


@app.on("nick")
def nick(conn: tether.Conn, data: Nick) -> str:
    if not 1 <= len(data.name) <= 32:
        raise tether.ReplyError("bad_name", "a name has 1 to 32 characters")
    conn.assigns["name"] = data.name
    return data.name


@app.on("say")
async def say(conn: tether.Conn, data: Say) -> None:
    await _everyone("said", Said(conn.assigns["name"], data.text))


async def _everyone(type: str, data: object) -> None:
    for member in list(members):
        try:
            await member.emit(type, data)
        except tether.ConnectionClosed:
            members.discard(member)


if __name__ == "__main__":
    tether.run({"/chat": app}, "127.0.0.1", 8001)
