"""The client's room requests, reserved types ``join``, ``leave``, ``presence`` (docs/protocol.md).

A client may join only if the app registered ``@app.on_join`` hooks and every one of them
agrees: ``True`` keeps the client's ``meta``, any other value except ``False`` and ``None``
replaces it (the server decides what others see), ``False``/``None`` refuses with the error
code ``forbidden``; raising ``tether.ReplyError`` refuses with its code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import msgspec

from ..conn import Conn
from ..errors import ReplyError
from ..proto.envelope import FORBIDDEN, TOO_MANY_ROOMS
from ..rooms.hub import Hub, Member
from ..sessions import Session

__all__ = ["OnJoin", "client_routes"]

OnJoin = Callable[[Conn, str, Any], Any]


class JoinRequest(msgspec.Struct):
    room: str
    meta: Any = None


class RoomRequest(msgspec.Struct):
    room: str


class Position(msgspec.Struct):
    epoch: str | None = None
    offset: int = 0


class ResumeRequest(msgspec.Struct):
    """What a resuming client received of each room: ``{"rooms": {room: {epoch, offset}}}``."""

    rooms: dict[str, Position] = {}


def client_routes(on_join: list[OnJoin], hub_of: Callable[[Conn], Hub]) -> dict[str, Callable[..., Any]]:
    """Handlers of the client's room requests; ``hub_of(conn)`` is the hub they act on."""

    async def join(conn: Conn, data: JoinRequest) -> dict[str, Any]:
        if not on_join:
            raise ReplyError(FORBIDDEN, "this app does not let clients join rooms")
        hub = hub_of(conn)
        limit = hub.max_rooms
        if limit is not None and data.room not in conn.rooms and len(conn.rooms) >= limit:
            raise ReplyError(TOO_MANY_ROOMS, f"a connection may be in at most {limit} rooms")
        meta = data.meta
        for hook in on_join:
            verdict = hook(conn, data.room, meta)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if verdict is False or verdict is None:
                raise ReplyError(FORBIDDEN, f"not allowed to join {data.room!r}")
            if verdict is not True:
                meta = verdict
        await conn.join(data.room, meta)
        epoch, offset = await hub.position(data.room)
        return {"room": data.room, "id": hub.member_id(conn), "presence": await hub.presence(data.room), "epoch": epoch, "offset": offset}

    async def leave(conn: Conn, data: RoomRequest) -> None:
        await conn.leave(data.room)

    async def presence(conn: Conn, data: RoomRequest) -> list[Member]:
        if data.room not in conn.rooms:
            raise ReplyError(FORBIDDEN, f"join {data.room!r} first")
        return await hub_of(conn).presence(data.room)

    async def resume(conn: Conn, data: ResumeRequest) -> None:
        """A resumed session's rooms: back in each, with what it missed replayed first."""
        if isinstance(conn.session, Session):
            await hub_of(conn).resume(conn, {room: (p.epoch, p.offset) for room, p in data.rooms.items()})

    return {"join": join, "leave": leave, "presence": presence, "resume": resume}
