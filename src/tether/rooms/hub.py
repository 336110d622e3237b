"""Rooms, broadcast and presence: :class:`Hub`.

.. code-block:: python

    app = tether.App(broker="redis://127.0.0.1:6379/0")   # or no broker: in-memory

    @app.on_connect
    async def hello(conn: tether.Conn) -> None:
        await conn.join("lobby", {"name": conn.query.get("name")})

    @app.on("chat")
    async def chat(conn: tether.Conn, data: Chat) -> None:
        await app.broadcast("lobby", "chat", data, exclude=conn)

A room is a name; a connection is in any number of rooms and leaves them all when it
closes. ``broadcast`` encodes the message **once** and builds the WebSocket frame **once**
(server frames are unmasked, so the bytes are the same for every receiver), then writes
those bytes to each member without awaiting any of them; a member whose socket is full gets
the frame in its bounded send queue instead (``Conn.stats``; see docs/rooms.md for the
overflow policy). The broker (:mod:`tether.rooms.broker`) carries each broadcast once to the
other processes serving the room, and keeps presence: who is in a room, with app metadata.

Rooms are **streams** when the broker has them (the in-memory one does): each broadcast gets
the room's next offset (``"off"`` in the message) and stays in the room's bounded history, so
a client that resumes its session (tether.sessions) gets what it missed, in order, or an
explicit ``gap`` event saying what and why. A session's memberships outlive its connection:
while the client is away it stays listed in presence (no leave/join flapping on a reconnect);
only when the session expires does it leave.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from ..conn import OPEN, Conn
from ..metrics import Metrics
from ..proto.envelope import decode, encode, encode_message, with_offset
from ..proto.frames import OP_BINARY, OP_TEXT, encode_frame
from ..proto.resume import Gap, merge
from ..sessions import Membership, Session
from .broker import Broker, History, MemoryBroker

__all__ = ["Hub", "Member", "History", "make_broker", "is_shared", "pack", "unpack"]

logger = logging.getLogger("tether.rooms")

_now = time.monotonic

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


def make_broker(setting: str | Broker | None) -> Broker:
    """The broker for a ``broker=`` setting.

    ``None`` or ``"memory://"`` -> :class:`MemoryBroker`; ``"redis://..."`` or
    ``"rediss://..."`` -> :class:`tether.rooms.redis.RedisBroker` (needs
    ``pip install 'tether[redis]'``), on a Redis Cluster with ``"redis+cluster://host:port[,...]"``
    or ``"rediss+cluster://..."``; a :class:`Broker` instance is used as is.
    Raises ``ValueError`` for any other string.
    """
    if setting is None or setting == "memory://":
        return MemoryBroker()
    if isinstance(setting, Broker):
        return setting
    if isinstance(setting, str) and setting.startswith(_REDIS_SCHEMES):
        from .redis import RedisBroker  # redis is an optional extra: import it only when asked

        return RedisBroker(setting)
    raise ValueError(f"unknown broker {setting!r}: use None, 'memory://', 'redis://host:port/db', 'redis+cluster://host:port' or a Broker")


def is_shared(setting: str | Broker | None) -> bool:
    """Whether a ``broker=`` setting reaches other processes (without connecting anything)."""
    if isinstance(setting, Broker):
        return setting.shared
    return isinstance(setting, str) and setting.startswith(_REDIS_SCHEMES)


# -- what travels between processes (pure) --------------------------------------------------
_NODE_LEN = 12  # secrets.token_hex(6)


def pack(node: str, opcode: int, payload: bytes, exclude: str = "") -> bytes:
    """A broker message: origin node (12 ASCII bytes), opcode (1 byte), the length of the
    excluded member's key (1 byte) and the key, then the payload."""
    key = exclude.encode()
    return b"%s%c%c%s%s" % (node.encode(), opcode, len(key), key, payload)


def unpack(data: bytes) -> tuple[str, int, str, bytes]:
    """The inverse of :func:`pack`. Raises ``ValueError`` on a message too short."""
    if len(data) < _NODE_LEN + 2:
        raise ValueError("broker message too short")
    start = _NODE_LEN + 2 + data[_NODE_LEN + 1]
    if len(data) < start:
        raise ValueError("broker message too short")
    return data[:_NODE_LEN].decode(), data[_NODE_LEN], data[_NODE_LEN + 2 : start].decode(), data[start:]


#: Messages a resume replays per room at most; more missing is a gap ``too_many``.
MAX_REPLAY = 1000


# -- the hub ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Member:
    """One presence entry: a connection's member ``id`` and the ``meta`` its app gave."""

    id: str
    meta: Any


class Hub:
    """Rooms of local connections, fan-out, and presence through a broker.

    ``broker`` is a :class:`tether.Broker`, ``None`` (in-memory) or a URL such as
    ``"redis://127.0.0.1:6379/0"``. A server makes one per process (``server.hub``); an
    :class:`tether.App` uses its server's, or its own if given ``broker=``. The hub starts
    on first use (or ``await hub.start()``); ``await hub.close()`` withdraws its presence.
    """

    def __init__(self, broker: str | Broker | None = None, *, node: str | None = None, max_rooms: int | None = 100) -> None:
        self.broker = make_broker(broker)
        #: Rooms one connection may join by its own request (``join`` messages); None = no limit.
        self.max_rooms = max_rooms
        #: Where fan-out is counted (tether.metrics; set by the server), or None: off.
        self.metrics: Metrics | None = None
        #: This process's id in presence and between brokers (12 hex digits).
        self.node = node if node is not None else secrets.token_hex(_NODE_LEN // 2)
        if len(self.node) != _NODE_LEN or not self.node.isascii():
            raise ValueError(f"node must be {_NODE_LEN} ASCII characters")
        self._rooms: dict[str, dict[Conn, str | None]] = {}  # room -> conn -> member id
        # conn -> its rooms: a tuple (a member is in a few rooms; an empty set costs 216 bytes
        # per connection, a 1-tuple 48)
        self._of: dict[Conn, tuple[str, ...]] = {}
        self._on_conn_closed = self._conn_closed  # one bound method for every member (64 bytes each)
        self._ids: dict[Conn, str] = {}  # member ids of connections without a session
        self._keys: dict[Conn, str] = {}  # what names a connection in an ``exclude``
        self._by_key: dict[str, Conn] = {}
        self._catching_up: dict[str, dict[Conn, list[tuple[int, bytes]]]] = {}  # room -> resuming conn -> live buffer
        self._replay: dict[str, int] = {}  # room -> messages a resume replays at most (set_history)
        self._counter = itertools.count(1)
        self._subs: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._start: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the broker (once; later calls return at once)."""
        if self._start is None:
            self.broker.on_gap(self._lost)
            self._start = asyncio.get_running_loop().create_task(self.broker.start(self.node, self._deliver))
        if not self._start.done():
            await asyncio.shield(self._start)

    async def close(self) -> None:
        """Let pending leave bookkeeping finish, then close the broker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        if self._start is not None:
            await self.broker.close()

    # -- membership --------------------------------------------------------------------
    def rooms_of(self, conn: Conn) -> frozenset[str]:
        """The rooms ``conn`` is in."""
        return frozenset(self._of.get(conn, ()))

    def local(self, room: str) -> list[Conn]:
        """This process's connections in ``room``."""
        return list(self._rooms.get(room, ()))

    @property
    def rooms(self) -> list[str]:
        """Rooms with at least one connection in this process."""
        return list(self._rooms)

    def set_history(self, room: str, *, max_count: int = 1000, max_age: float = 120.0) -> None:
        """Bound ``room``'s history (``max_count=0`` keeps none: resumes of it report gaps)."""
        self.broker.configure(room, History(max_count, max_age))
        # A resume replays what the room keeps: a client behind by less than its history
        # never gets a "too_many" gap (MAX_REPLAY is the least).
        self._replay[room] = max(MAX_REPLAY, max_count)

    async def join(self, conn: Conn, room: str, meta: Any = None, *, presence: bool = True) -> None:
        """Put ``conn`` in ``room``; a no-op if it is in already.

        With ``presence=True`` it is listed by :meth:`presence` with ``meta`` (any JSON-able
        value) and the other members get a ``presence`` join event; ``presence=False`` only
        subscribes it to broadcasts. Returns once broadcasts from every process reach it.
        A connection with a session gets a ``joined`` event with the room's position (its
        epoch and last offset), and stays in the room across resumes.
        Raises :class:`tether.ConnectionClosed` if ``conn`` is closed.
        """
        if conn.state is not OPEN:
            raise conn.closed_error()
        await self.start()
        members = self._rooms.setdefault(room, {})
        if conn in members:
            return
        member = self._member_id(conn) if presence else None
        session = conn.session if isinstance(conn.session, Session) else None
        meta_json = encode(meta)
        if session is not None:
            session.rooms[room] = Membership(meta_json, presence)
            session.changed()
        self._add(conn, room, member)
        await self._subscribe(room)
        if session is not None:
            await self._send_position(conn, session, room)
        if member is not None:
            await self._announce_join(conn, room, member, meta_json)

    def _add(self, conn: Conn, room: str, member: str | None) -> None:
        self._rooms.setdefault(room, {})[conn] = member
        rooms = self._of.get(conn)
        if rooms is None:
            rooms = ()
            conn.on_close(self._on_conn_closed)
        if room not in rooms:
            self._of[conn] = (*rooms, room)

    async def _send_position(self, conn: Conn, session: Session, room: str) -> None:
        epoch, offset = await self.broker.position(room)
        _direct(conn, session, "joined", {"epoch": epoch, "offset": offset}, room)

    async def position(self, room: str) -> tuple[str | None, int]:
        """``(epoch, offset of the last message)`` of ``room``'s stream."""
        await self.start()
        return await self.broker.position(room)

    async def recent(self, room: str, limit: int = 50) -> list[tuple[int, str, Any]]:
        """The last ``limit`` broadcasts of ``room`` still in its history, oldest first, as
        ``(offset, type, data)``: what a late joiner may want to see (a chat's scrollback)."""
        epoch, head = await self.position(room)
        kept, _ = await self.broker.history(room, max(0, head - limit), epoch, limit)
        found = []
        for offset, data in kept:
            try:
                message = decode(unpack(data)[3])
            except (ValueError, msgspec.DecodeError):
                continue
            found.append((offset, message.type, message.data))
        return found

    async def _announce_join(self, conn: Conn, room: str, member: str, meta: bytes) -> None:
        await self.broker.put_member(room, member, meta)
        if self._rooms.get(room, {}).get(conn) != member:  # left or closed meanwhile
            if not self._parked(conn, room):
                await self.broker.drop_member(room, member)
            return
        await self._event(room, "join", member, meta, exclude=conn)

    async def update(self, conn: Conn, room: str, meta: Any) -> None:
        """Change ``conn``'s presence ``meta`` in ``room``; the others get a ``presence``
        ``update`` event. Raises ``KeyError`` if it is not listed in ``room``."""
        member = self._rooms.get(room, {}).get(conn)
        if member is None:
            raise KeyError(f"{conn!r} is not listed in room {room!r}")
        meta_json = encode(meta)
        if isinstance(conn.session, Session) and room in conn.session.rooms:
            conn.session.rooms[room].meta = meta_json
            conn.session.changed()
        await self.broker.put_member(room, member, meta_json)
        await self._event(room, "update", member, meta_json, exclude=conn)

    async def leave(self, conn: Conn, room: str) -> None:
        """Take ``conn`` out of ``room`` (a no-op if it is not in it)."""
        found, member = self._remove(conn, room)
        if isinstance(conn.session, Session):
            if conn.session.rooms.pop(room, None) is not None:
                conn.session.changed()
            _direct(conn, conn.session, "left", None, room)
        if found and member is not None:
            await self._announce_leave(room, member)

    async def _announce_leave(self, room: str, member: str) -> None:
        await self.broker.drop_member(room, member)
        await self._event(room, "leave", member, b"null")

    def _remove(self, conn: Conn, room: str) -> tuple[bool, str | None]:
        members = self._rooms.get(room)
        if members is None or conn not in members:
            return False, None
        member = members.pop(conn)
        rooms = self._of.get(conn)
        if rooms is not None and room in rooms:
            self._of[conn] = tuple(r for r in rooms if r != room)
        if not members:
            del self._rooms[room]
            if room not in self._catching_up:
                self._subs.pop(room, None)
                self._spawn(self.broker.unsubscribe(room))
        return True, member

    def _conn_closed(self, conn: Conn) -> None:
        """A member closed: leave its rooms now (locally), tell the broker soon after. A
        session's memberships are parked instead: it stays listed until the session ends."""
        session = conn.session if isinstance(conn.session, Session) else None
        for room in self._of.pop(conn, ()):
            found, member = self._remove(conn, room)
            if found and member is not None and (session is None or room not in session.rooms):
                self._spawn(self._announce_leave(room, member))
        for buffers in self._catching_up.values():
            buffers.pop(conn, None)
        self._ids.pop(conn, None)
        key = self._keys.pop(conn, None)
        if key is not None:
            self._by_key.pop(key, None)

    def _parked(self, conn: Conn, room: str) -> bool:
        session = conn.session
        return isinstance(session, Session) and room in session.rooms and conn.state is not OPEN

    async def end_session(self, session: Session) -> None:
        """A session expired: leave the rooms it was parked in (presence ``leave`` events)."""
        for room, membership in list(session.rooms.items()):
            if membership.presence and session.member is not None:
                await self._announce_leave(room, session.member)
        session.rooms.clear()

    async def forget_session(self, session: Session) -> None:
        """Another process took ``session``: it lists the session's member now, not us."""
        for room, membership in session.rooms.items():
            if membership.presence and session.member is not None:
                await self.broker.forget_member(room, session.member)

    async def adopt_session(self, session: Session) -> None:
        """We took ``session`` from another process: list its member from here."""
        await self.start()
        for room, membership in session.rooms.items():
            if membership.presence and session.member is not None:
                await self.broker.put_member(room, session.member, membership.meta)

    async def resume(self, conn: Conn, positions: dict[str, tuple[str | None, int]]) -> None:
        """Put a resumed session's connection back in its rooms and replay what it missed.

        ``positions`` are the client's ``(epoch, offset)`` per room. Each room's history after
        that offset goes out first, in order, then live traffic (buffered meanwhile and
        merged, so nothing is lost or doubled); what history cannot cover is a ``gap`` event.
        """
        session = conn.session
        assert isinstance(session, Session)
        await self.start()
        for room, membership in list(session.rooms.items()):
            if conn.state is not OPEN:
                return
            member = session.member if membership.presence else None
            await self._subscribe(room)
            position = positions.get(room)
            if position is None:  # the client never learned where the room was: start now
                self._add(conn, room, member)
                await self._send_position(conn, session, room)
                continue
            await self._catch_up(conn, session, room, member, *position)

    async def _catch_up(self, conn: Conn, session: Session, room: str, member: str | None, epoch: str | None, after: int) -> None:
        buffer: list[tuple[int, bytes]] = []
        self._catching_up.setdefault(room, {})[conn] = buffer
        try:
            history, gap = await self.broker.history(room, after, epoch, self._replay.get(room, MAX_REPLAY))
        finally:
            buffers = self._catching_up.get(room, {})
            buffers.pop(conn, None)
            if not buffers:
                self._catching_up.pop(room, None)
        if conn.state is not OPEN:
            return
        start = after
        if gap is not None:
            _gap(conn, session, room, gap)
            start = gap.last  # an epoch gap restarts the count: the new epoch's offsets follow
        run, hole = merge(history, buffer, start)
        if hole is not None:
            _gap(conn, session, room, Gap(hole.first, hole.last, "lost", gap.epoch if gap else epoch))
        for offset, data in run:
            self._write_one(conn, room, offset, data)
        if conn.metrics is not None and run:
            conn.metrics.replayed(len(run))
        self._add(conn, room, member)

    def _write_one(self, conn: Conn, room: str, offset: int, data: bytes) -> None:
        try:
            _, opcode, exclude, payload = unpack(data)
        except ValueError:
            return
        session = conn.session
        if exclude and exclude == (session.id if isinstance(session, Session) else self._keys.get(conn, "")):
            return  # the session this broadcast excluded (its own presence join, say)
        payload = with_offset(payload, offset)
        conn.write_broadcast(encode_frame(opcode, payload), opcode, payload)

    def _member_id(self, conn: Conn) -> str:
        session = conn.session
        if isinstance(session, Session):
            if session.member is None:
                session.member = f"{self.node}.{next(self._counter)}"
            return session.member
        member = self._ids.get(conn)
        if member is None:
            member = self._ids[conn] = f"{self.node}.{next(self._counter)}"
        return member

    def _key(self, conn: Conn) -> str:
        """The name of ``conn`` in an ``exclude`` (its session id: resumes keep it)."""
        key = self._keys.get(conn)
        if key is None:
            session = conn.session
            key = session.id if isinstance(session, Session) else f"{self.node}.c{next(self._counter)}"
            self._keys[conn] = key
            self._by_key[key] = conn
        return key

    async def _subscribe(self, room: str) -> None:
        task = self._subs.get(room)
        if task is None:
            task = self._subs[room] = asyncio.get_running_loop().create_task(self.broker.subscribe(room))
        await asyncio.shield(task)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("room bookkeeping failed", exc_info=task.exception())

    # -- presence ----------------------------------------------------------------------
    async def presence(self, room: str) -> list[Member]:
        """Who is in ``room`` on every process, sorted by member id."""
        await self.start()
        found = await self.broker.members(room)
        return [Member(member, msgspec.json.decode(found[member])) for member in sorted(found)]

    def member_id(self, conn: Conn) -> str | None:
        """``conn``'s member id in presence lists, once it has joined a room with presence."""
        session = conn.session
        if isinstance(session, Session):
            return session.member
        return self._ids.get(conn)

    async def _event(self, room: str, event: str, member: str, meta: bytes, exclude: Conn | None = None) -> None:
        data = {"event": event, "id": member, "meta": msgspec.Raw(meta)}
        await self.broadcast(room, "presence", data, exclude=exclude)

    # -- broadcast ---------------------------------------------------------------------
    async def broadcast(self, room: str, type: str, data: Any = None, *, exclude: Conn | None = None) -> int:
        """Send ``{"type": type, "data": data, "room": room, "off": offset}`` to every member
        of ``room``.

        ``exclude`` (usually the sender) is skipped. Never waits for a receiver. Returns how
        many connections of this process are in the room (they get it, or have it queued);
        other processes get it through the broker. With a streams broker the message gets
        the room's next offset and stays in its history (see :meth:`set_history`).
        """
        payload = encode_message(type, data, room=room)
        if not self.broker.streams:
            return await self.send(room, payload, exclude=exclude, text=True)
        if self._start is None:
            await self.start()
        members = self._rooms.get(room)
        count = len(members) - (exclude in members) if members else 0
        key = self._key(exclude) if exclude is not None else ""
        await self.broker.publish_stream(room, pack(self.node, OP_TEXT, payload, key))
        return count

    async def send(self, room: str, message: str | bytes, *, exclude: Conn | None = None, text: bool | None = None) -> int:
        """Send a raw ``message`` to every member of ``room``: ``str`` as a text frame,
        ``bytes`` as binary (or text with ``text=True``). Raw messages are not part of the
        room's stream (no offset, no history). See :meth:`broadcast`."""
        if isinstance(message, str):
            opcode, payload = OP_TEXT, message.encode()
        else:
            opcode, payload = (OP_TEXT if text else OP_BINARY), bytes(message)
        delivered = self._fanout(room, opcode, payload, exclude)
        if self._start is None:
            await self.start()
        await self.broker.publish(room, pack(self.node, opcode, payload))
        return delivered

    def _fanout(self, room: str, opcode: int, payload: bytes, exclude: Conn | None) -> int:
        members = self._rooms.get(room)
        if not members:
            return 0
        frame = encode_frame(opcode, payload)  # once for every receiver
        now = _now()
        count = 0
        for conn in tuple(members):  # a write may close a slow consumer: iterate a copy
            if conn is not exclude:
                conn.write_broadcast(frame, opcode, payload, now)
                count += 1
        if self.metrics is not None:
            self.metrics.sent(opcode, payload, count)
        return count

    def _deliver(self, room: str, data: bytes, offset: int | None = None) -> None:
        """From the broker: a publication of some process. A stream message (with its offset)
        comes from every process, ours included; others only from the other processes."""
        try:
            node, opcode, exclude, payload = unpack(data)
        except ValueError:
            logger.warning("dropped a malformed broker message in room %r", room)
            return
        if offset is None:
            if node != self.node:
                self._fanout(room, opcode, payload, None)
            return
        catching_up = self._catching_up.get(room)
        if catching_up:
            for buffer in catching_up.values():
                buffer.append((offset, data))
        skip = self._by_key.get(exclude) if exclude else None
        self._fanout(room, opcode, with_offset(payload, offset), skip)

    def _lost(self, room: str, gap: Gap) -> None:
        """From the broker: live messages of ``room`` that will never come (lost between
        processes, and history could not repair them). Each local member with a session gets
        a ``gap`` event. It goes out like the room's messages (one frame, the send queue), not
        as a direct message: a direct write can overtake broadcasts queued for a paused
        connection, and a client that moved past the gap would drop them as seen."""
        members = self._rooms.get(room)
        if not members:
            return
        data = {"first": gap.first, "last": gap.last, "reason": gap.reason, "epoch": gap.epoch}
        payload = encode_message("gap", data, room=room)
        frame = encode_frame(OP_TEXT, payload)
        for conn in tuple(members):
            if isinstance(conn.session, Session):
                conn.write_broadcast(frame, OP_TEXT, payload)


def _direct(conn: Conn, session: Session, type: str, data: Any, room: str) -> None:
    """A direct message of the session: kept until acked, written to its open connection."""
    session.send(type, data, room=room)


def _gap(conn: Conn, session: Session, room: str, gap: Gap) -> None:
    _direct(conn, session, "gap", {"first": gap.first, "last": gap.last, "reason": gap.reason, "epoch": gap.epoch}, room)
