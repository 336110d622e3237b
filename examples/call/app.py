"""The call demo's server: who is in a call, chat, and WebRTC signalling, on tether's public API.

A call is a tether room named like ``amber-otter-4821``. Video goes browser to browser (one
``RTCPeerConnection`` per pair); this app only introduces the browsers to each other. The
messages of the ``/ws`` endpoint (envelopes as in docs/protocol.md; docs/demo.md has examples):

client -> server

- ``join`` ``{"room", "meta": {"name", "mic", "cam"}}``: tether's own join request, let through
  by :func:`admit` (``@app.on_join``), which checks the room name, the meta and the call size
  and gives the member a **seat**: a number that grows with every join. The reply is tether's
  ``{"room", "id", "presence"}``; every presence meta is ``{"name", "mic", "cam", "seat"}``.
- ``state`` ``{"name", "mic", "cam"}`` (request): a new name or mic/camera state; everybody in
  the call, the sender too, gets ``state`` ``{"id", "meta"}`` and presence lists show it.
- ``signal`` ``{"to": member id, "description"?: {"type", "sdp"}, "candidate"?: {...}}``:
  relayed to that one member as ``signal`` ``{"from", "description" | "candidate"}``; only
  between members of the same call.
- ``chat`` ``{"text"}`` (request): everyone in the call gets ``chat`` (a :class:`Line`);
  ``history`` (request): the call's last lines, for late joiners and after a reconnect.
- ``config`` (request): ``{"iceServers": [...]}`` for ``RTCPeerConnection``.
- ``leave`` ``{"room"}``: tether's own.

server -> client: tether's ``presence`` join/leave events, and ``state``, ``signal``, ``chat``.

**Roles for perfect negotiation** (W3C webrtc-pc, "Perfect negotiation"): of two members, the
one with the later seat is polite. The server hands out the seats, so both sides of a pair
agree on their roles whatever order they learn about each other in.

Errors (``tether.ReplyError`` codes): ``bad_room``, ``invalid_meta``, ``call_full``,
``one_call_at_a_time``, ``not_in_call``, ``no_such_peer``, ``bad_signal``; malformed data gets
tether's ``invalid_data`` with the field's path.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from typing import Annotated, Any, Literal

import msgspec

import tether

from .history import ChatHistory, Line

__all__ = ["make_app", "ROOM_NAME", "MAX_CALL_SIZE", "IceServer"]

logger = logging.getLogger("call")

#: Call names: lowercase letters, digits and inner dashes, 3 to 64 characters
#: (``static/assets/names.js`` has the same rule).
ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,62}[a-z0-9]")
#: A mesh sends every stream to every peer: beyond ~6 people uplinks and CPUs give out.
MAX_CALL_SIZE = 6

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"\S")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=1000, pattern=r"\S")]
MemberId = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Sdp = Annotated[str, msgspec.Meta(max_length=100_000)]


class State(msgspec.Struct, forbid_unknown_fields=True):
    """What a member says about itself."""

    name: Name
    mic: bool = True
    cam: bool = True


class Meta(msgspec.Struct):
    """What the others see in presence: the member's state and the seat the server gave it."""

    name: str
    mic: bool
    cam: bool
    seat: int


class Update(msgspec.Struct):
    id: str
    meta: Meta


class Description(msgspec.Struct):
    type: Literal["offer", "answer"]
    sdp: Sdp


class Candidate(msgspec.Struct, rename="camel", omit_defaults=True):
    """An ``RTCIceCandidateInit`` (what ``RTCIceCandidate.toJSON()`` gives)."""

    candidate: Annotated[str, msgspec.Meta(max_length=2000)]
    sdp_mid: str | None = None
    sdp_m_line_index: int | None = None
    username_fragment: str | None = None


class Signal(msgspec.Struct, forbid_unknown_fields=True):
    to: MemberId
    description: Description | None = None
    candidate: Candidate | None = None


class Relayed(msgspec.Struct, omit_defaults=True):
    sender: str = msgspec.field(name="from")
    description: Description | None = None
    candidate: Candidate | None = None


class Say(msgspec.Struct, forbid_unknown_fields=True):
    text: Text


class IceServer(msgspec.Struct, omit_defaults=True):
    """An ``RTCIceServer``: ``{"urls": "stun:..."}``, with credentials for TURN."""

    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class Config(msgspec.Struct, rename="camel"):
    ice_servers: list[IceServer]


def make_app(
    *,
    ice_servers: list[IceServer] | None = None,
    max_call_size: int = MAX_CALL_SIZE,
    history: ChatHistory | None = None,
) -> tether.App:
    """The call app (mount it at ``/ws``). Its state (seats, chat history) lives in this process.

    ``ice_servers`` go to every browser (none are needed on one machine or a LAN; a STUN
    server, and TURN for strict NATs, across the Internet).
    """
    app = tether.App()
    config = Config(list(ice_servers or ()))
    chat_history = history if history is not None else ChatHistory()
    seats = itertools.count(1)

    @app.on_join
    async def admit(conn: tether.Conn, room: str, meta: Any) -> Meta:
        if not ROOM_NAME.fullmatch(room):
            raise tether.ReplyError("bad_room", "a call name has 3 to 64 lowercase letters, digits and dashes")
        if conn.rooms - {room}:
            raise tether.ReplyError("one_call_at_a_time", "leave your call before joining another")
        try:
            state = msgspec.convert(meta, State)
        except msgspec.ValidationError as exc:
            raise tether.ReplyError("invalid_meta", f"meta: {exc}") from None
        if room not in conn.rooms and len(await app.presence(room)) >= max_call_size:
            raise tether.ReplyError("call_full", f"a call has at most {max_call_size} people")
        seat = conn.assigns.get("seat") if room in conn.rooms else None
        conn.assigns["seat"] = seat = seat or next(seats)
        conn.assigns["name"] = state.name
        logger.info("%r joins %s (seat %d)", state.name, room, seat)
        return Meta(state.name, state.mic, state.cam, seat)

    @app.on("state")
    async def state(conn: tether.Conn, data: State) -> Meta:
        room, member = _call_of(conn), app.hub.member_id(conn)
        assert member is not None  # every call member has one
        meta = Meta(data.name, data.mic, data.cam, conn.assigns["seat"])
        conn.assigns["name"] = data.name
        await _set_presence(app, conn, room, member, meta)
        await app.broadcast(room, "state", Update(member, meta))
        return meta

    @app.on("signal")
    async def signal(conn: tether.Conn, data: Signal) -> None:
        if (data.description is None) == (data.candidate is None):
            raise tether.ReplyError("bad_signal", "a signal carries either a description or a candidate")
        room = _call_of(conn)
        target = _member(app, room, data.to)
        if target is None or target is conn:
            raise tether.ReplyError("no_such_peer", f"{data.to!r} is not in this call")
        try:
            await target.emit("signal", Relayed(app.hub.member_id(conn) or "", data.description, data.candidate))
        except tether.ConnectionClosed:
            raise tether.ReplyError("no_such_peer", f"{data.to!r} just left") from None

    @app.on("chat")
    async def chat(conn: tether.Conn, data: Say) -> Line:
        room = _call_of(conn)
        line = chat_history.append(room, app.hub.member_id(conn) or "", conn.assigns["name"], data.text, _now_ms())
        await app.broadcast(room, "chat", line)
        return line

    @app.on("history")
    def history_(conn: tether.Conn) -> list[Line]:
        return chat_history.lines(_call_of(conn))

    @app.on("config")
    def config_(conn: tether.Conn) -> Config:
        return config

    for type, data_type in (("state", Update), ("signal", Relayed), ("chat", Line)):
        app.emits(type, data_type)
    return app


def _call_of(conn: tether.Conn) -> str:
    """The call ``conn`` is in (admit lets a connection into one at a time)."""
    for room in conn.rooms:
        return room
    raise tether.ReplyError("not_in_call", "join a call first")


def _member(app: tether.App, room: str, member: str) -> tether.Conn | None:
    """The connection of ``member`` in ``room`` on this process, if any."""
    for conn in app.hub.local(room):
        if app.hub.member_id(conn) == member:
            return conn
    return None


async def _set_presence(app: tether.App, conn: tether.Conn, room: str, member: str, meta: Meta) -> None:
    """Replace ``member``'s presence meta in place.

    tether's presence has no update yet (join and leave only, and a second join is a no-op),
    so the demo writes through the broker seam, then tells the call with its own ``state``
    event. Leaving and re-joining instead would show everybody a leave and a join.
    """
    await app.hub.broker.put_member(room, member, msgspec.json.encode(meta))
    if room not in conn.rooms:  # left (or closed) while we wrote: take the entry back out
        await app.hub.broker.drop_member(room, member)


def _now_ms() -> int:
    return int(time.time() * 1000)
