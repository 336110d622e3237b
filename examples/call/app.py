"""The call demo's server: who is in a call, chat, and WebRTC signalling, on tether's public API.

A call is a tether room named like ``amber-otter-4821``. Video goes browser to browser (one
``RTCPeerConnection`` per pair); this app only introduces the browsers to each other. The
messages of the ``/ws`` endpoint (envelopes as in docs/protocol.md; docs/demo.md has examples):

client -> server

- ``join`` ``{"room", "meta": {"name", "mic", "cam"}}``: tether's own join request, let through
  by :func:`admit` (``@app.on_join``), which checks the room name, the meta and the call size
  and gives the member a **seat**: a number that grows with every join. The reply is tether's
  ``{"room", "id", "presence"}``; every presence meta is ``{"name", "mic", "cam", "seat"}``.
- ``state`` ``{"name", "mic", "cam"}`` (request): a new name or mic/camera state, through
  tether's presence update (``hub.update``): the others get ``presence`` ``{"event": "update",
  "id", "meta"}``, the reply is the new meta.
- ``signal`` ``{"to": member id, "description"?: {"type", "sdp"}, "candidate"?: {...}}``:
  relayed to that one member as ``signal`` ``{"from", "description" | "candidate"}``; only
  between members of the same call. A member whose client is away (its session waiting for a
  resume) gets it when it is back.
- ``chat`` ``{"text"}`` (request): everyone in the call gets ``chat`` (a :class:`Line`), a
  broadcast kept in the room's history; ``history`` (request): the call's last lines from that
  history (``hub.recent``), for late joiners and after a new session.
- ``config`` (request): ``{"iceServers": [...]}`` for ``RTCPeerConnection``.
- ``leave`` ``{"room"}``: tether's own.

server -> client: tether's ``presence`` join/update/leave events, and ``signal``, ``chat``.

**Reconnects** are tether's sessions (on by default in tether.js): a client back within the
resume window keeps its member id, its seat and its place in the call (no leave/join for the
others), and gets what it missed (chat lines, presence changes, signals) in order. A client
that does not come back leaves the call when the window ends (:data:`RESUME`).

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
import secrets
import time
from typing import Annotated, Any, Literal

import msgspec

import tether

__all__ = ["make_app", "ROOM_NAME", "MAX_CALL_SIZE", "RESUME", "CHAT_LINES", "CHAT_MAX_AGE", "IceServer", "Line"]

logger = logging.getLogger("call")

#: Call names: lowercase letters, digits and inner dashes, 3 to 64 characters
#: (``static/assets/names.js`` has the same rule).
ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,62}[a-z0-9]")
#: A mesh sends every stream to every peer: beyond ~6 people uplinks and CPUs give out.
MAX_CALL_SIZE = 6
#: Sessions: how long a member whose client vanished (no close) stays in the call waiting for
#: it to come back. Shorter than tether's default (120 s): the others see a ghost meanwhile.
RESUME = tether.Resume(window=30.0)
#: Chat scrollback: the last lines a late joiner gets, from a call's history of broadcasts
#: (presence changes are broadcasts too: up to CHAT_SCAN of them are looked through).
CHAT_LINES = 50
CHAT_SCAN = 1000
#: How long a call's broadcasts (its chat) stay in its history: tether's default, 120 s, is
#: what a resume needs; a chat's scrollback wants longer.
CHAT_MAX_AGE = 3600.0

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


class Line(msgspec.Struct, frozen=True):
    """One chat line as every client sees it: ``id`` is unique (a page merges history and live
    lines by it), ``from`` is the sender's member id, ``at`` Unix time in ms."""

    id: str
    sender: str = msgspec.field(name="from")
    name: str
    text: str
    at: int


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
    resume: tether.Resume | None = RESUME,
) -> tether.App:
    """The call app (mount it at ``/ws``). Its state (seats, sessions, the calls' history)
    lives in this process.

    ``ice_servers`` go to every browser (none are needed on one machine or a LAN; a STUN
    server, and TURN for strict NATs, across the Internet). ``resume``: the session settings
    (``None``: no sessions, every reconnect is a new member).
    """
    app = tether.App(resume=resume)
    config = Config(list(ice_servers or ()))
    seats = itertools.count(1)
    window = resume.window if resume is not None else 0.0
    #: Members whose client is away (closed without ending its session): member id -> (its
    #: latest connection, until when it may come back). ``conn.emit`` on a connection of a
    #: session reaches the client across reconnects, so a signal for it waits for it.
    away: dict[str, tuple[tether.Conn, float]] = {}

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
        if room in conn.rooms:  # joining again: keeps the seat, shows the state given now
            listed = Meta(state.name, state.mic, state.cam, conn.assigns["seat"])
            await app.hub.update(conn, room, listed)
            return listed
        if len(await app.presence(room)) >= max_call_size:  # members away keep their place
            raise tether.ReplyError("call_full", f"a call has at most {max_call_size} people")
        app.hub.set_history(room, max_count=CHAT_SCAN, max_age=CHAT_MAX_AGE)
        conn.assigns["seat"] = seat = next(seats)
        conn.assigns["name"] = state.name
        logger.info("%r joins %s (seat %d)", state.name, room, seat)
        return Meta(state.name, state.mic, state.cam, seat)

    @app.on("state")
    async def state(conn: tether.Conn, data: State) -> Meta:
        room = _call_of(conn)
        meta = Meta(data.name, data.mic, data.cam, conn.assigns["seat"])
        conn.assigns["name"] = data.name
        try:
            await app.hub.update(conn, room, meta)
        except KeyError:  # left meanwhile
            raise tether.ReplyError("not_in_call", "join a call first") from None
        return meta

    @app.on("signal")
    async def signal(conn: tether.Conn, data: Signal) -> None:
        if (data.description is None) == (data.candidate is None):
            raise tether.ReplyError("bad_signal", "a signal carries either a description or a candidate")
        room = _call_of(conn)
        sender = app.hub.member_id(conn) or ""
        target = _local(app, room, data.to) if data.to != sender else None
        if target is None and data.to != sender:
            target = await _away(app, away, room, data.to)
        if target is None:
            raise tether.ReplyError("no_such_peer", f"{data.to!r} is not in this call")
        try:
            await target.emit("signal", Relayed(sender, data.description, data.candidate))
        except tether.ConnectionClosed:
            away.pop(data.to, None)
            raise tether.ReplyError("no_such_peer", f"{data.to!r} just left") from None

    @app.on("chat")
    async def chat(conn: tether.Conn, data: Say) -> Line:
        room = _call_of(conn)
        line = Line(secrets.token_urlsafe(9), app.hub.member_id(conn) or "", conn.assigns["name"], data.text, _now_ms())
        await app.broadcast(room, "chat", line)
        return line

    @app.on("history")
    async def history(conn: tether.Conn) -> list[Line]:
        said = [data for _, type, data in await app.hub.recent(_call_of(conn), CHAT_SCAN) if type == "chat"]
        return [msgspec.convert(data, Line) for data in said[-CHAT_LINES:]]

    @app.on("config")
    def config_(conn: tether.Conn) -> Config:
        return config

    @app.on_connect
    @app.on_resume
    def watch(conn: tether.Conn) -> None:
        conn.on_close(went_away)
        member = app.hub.member_id(conn)  # resumed: until its `resume` puts it back in the
        if member is not None:  # call, signals for it go through this connection
            _keep(away, member, conn, window)

    def went_away(conn: tether.Conn) -> None:
        # Runs before tether takes the connection out of its rooms (close callbacks run in
        # order, and the rooms' comes with the join): a signal finds the member one way or
        # the other. A normal close (1000) ends the session: nobody will come back.
        member = app.hub.member_id(conn)
        if member is not None and conn.close_code != 1000 and window > 0:
            _keep(away, member, conn, window)

    for type, data_type in (("signal", Relayed), ("chat", Line)):
        app.emits(type, data_type)
    return app


def _call_of(conn: tether.Conn) -> str:
    """The call ``conn`` is in (admit lets a connection into one at a time)."""
    for room in conn.rooms:
        return room
    raise tether.ReplyError("not_in_call", "join a call first")


def _local(app: tether.App, room: str, member: str) -> tether.Conn | None:
    """The open connection of ``member`` in ``room`` on this process, if any."""
    for conn in app.hub.local(room):
        if app.hub.member_id(conn) == member:
            return conn
    return None


async def _away(app: tether.App, away: dict[str, tuple[tether.Conn, float]], room: str, member: str) -> tether.Conn | None:
    """The latest connection of ``member``, away but still listed in ``room``, if any."""
    found = away.get(member)
    if found is None or found[1] < time.monotonic():
        return None
    if all(listed.id != member for listed in await app.presence(room)):
        return None  # its session ended, or it left this call
    return found[0]


def _keep(away: dict[str, tuple[tether.Conn, float]], member: str, conn: tether.Conn, window: float) -> None:
    now = time.monotonic()
    for stale in [m for m, (_, until) in away.items() if until < now]:
        del away[stale]
    away[member] = (conn, now + window)


def _now_ms() -> int:
    return int(time.time() * 1000)
