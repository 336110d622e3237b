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
overflow policy). The broker (:mod:`tether.broker`) carries each broadcast once to the
other processes serving the room, and keeps presence: who is in a room, with app metadata.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec

from ..conn import Conn, ConnState
from ..proto.envelope import encode, encode_message
from ..proto.frames import OP_BINARY, OP_TEXT, encode_frame
from .broker import Broker, MemoryBroker

__all__ = ["Hub", "Member", "make_broker", "is_shared", "pack", "unpack"]

logger = logging.getLogger("tether.rooms")

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def make_broker(setting: str | Broker | None) -> Broker:
    """The broker for a ``broker=`` setting.

    ``None`` or ``"memory://"`` -> :class:`MemoryBroker`; ``"redis://..."`` or
    ``"rediss://..."`` -> :class:`tether.rooms.redis.RedisBroker` (needs
    ``pip install 'tether[redis]'``); a :class:`Broker` instance is used as is.
    Raises ``ValueError`` for any other string.
    """
    if setting is None or setting == "memory://":
        return MemoryBroker()
    if isinstance(setting, Broker):
        return setting
    if isinstance(setting, str) and setting.startswith(_REDIS_SCHEMES):
        from .redis import RedisBroker  # redis is an optional extra: import it only when asked

        return RedisBroker(setting)
    raise ValueError(f"unknown broker {setting!r}: use None, 'memory://', 'redis://host:port/db' or a Broker")


def is_shared(setting: str | Broker | None) -> bool:
    """Whether a ``broker=`` setting reaches other processes (without connecting anything)."""
    if isinstance(setting, Broker):
        return setting.shared
    return isinstance(setting, str) and setting.startswith(_REDIS_SCHEMES)


# -- what travels between processes (pure) --------------------------------------------------
_NODE_LEN = 12  # secrets.token_hex(6)


def pack(node: str, opcode: int, payload: bytes) -> bytes:
    """A broker message: origin node (12 ASCII bytes), opcode (1 byte), payload."""
    return node.encode() + bytes((opcode,)) + payload


def unpack(data: bytes) -> tuple[str, int, bytes]:
    """The inverse of :func:`pack`. Raises ``ValueError`` on a message too short."""
    if len(data) <= _NODE_LEN:
        raise ValueError("broker message too short")
    return data[:_NODE_LEN].decode(), data[_NODE_LEN], data[_NODE_LEN + 1 :]


# -- the hub ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Member:
    """One presence entry: a connection's member ``id`` and the ``meta`` its app gave."""

    id: str
    meta: Any


class Hub:
    """Rooms of local connections, fan-out, and presence through a broker.

    ``broker`` is a :class:`tether.broker.Broker`, ``None`` (in-memory) or a URL such as
    ``"redis://127.0.0.1:6379/0"``. A server makes one per process (``server.hub``); an
    :class:`tether.App` uses its server's, or its own if given ``broker=``. The hub starts
    on first use (or ``await hub.start()``); ``await hub.close()`` withdraws its presence.
    """

    def __init__(self, broker: str | Broker | None = None, *, node: str | None = None, max_rooms: int | None = 100) -> None:
        self.broker = make_broker(broker)
        #: Rooms one connection may join by its own request (``join`` messages); None = no limit.
        self.max_rooms = max_rooms
        #: This process's id in presence and between brokers (12 hex digits).
        self.node = node if node is not None else secrets.token_hex(_NODE_LEN // 2)
        if len(self.node) != _NODE_LEN or not self.node.isascii():
            raise ValueError(f"node must be {_NODE_LEN} ASCII characters")
        self._rooms: dict[str, dict[Conn, str | None]] = {}  # room -> conn -> member id
        self._of: dict[Conn, set[str]] = {}  # conn -> its rooms
        self._ids: dict[Conn, str] = {}
        self._counter = itertools.count(1)
        self._subs: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._start: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Connect the broker (once; later calls return at once)."""
        if self._start is None:
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

    async def join(self, conn: Conn, room: str, meta: Any = None, *, presence: bool = True) -> None:
        """Put ``conn`` in ``room``; a no-op if it is in already.

        With ``presence=True`` it is listed by :meth:`presence` with ``meta`` (any JSON-able
        value) and the other members get a ``presence`` join event; ``presence=False`` only
        subscribes it to broadcasts. Returns once broadcasts from every process reach it.
        Raises :class:`tether.ConnectionClosed` if ``conn`` is closed.
        """
        if conn.state is not ConnState.OPEN:
            raise conn.closed_error()
        await self.start()
        members = self._rooms.setdefault(room, {})
        if conn in members:
            return
        member = self._member_id(conn) if presence else None
        members[conn] = member
        if conn not in self._of:
            self._of[conn] = set()
            conn.on_close(self._conn_closed)
        self._of[conn].add(room)
        await self._subscribe(room)
        if member is not None:
            await self._announce_join(conn, room, member, encode(meta))

    async def _announce_join(self, conn: Conn, room: str, member: str, meta: bytes) -> None:
        await self.broker.put_member(room, member, meta)
        if self._rooms.get(room, {}).get(conn) != member:  # left or closed meanwhile
            await self.broker.drop_member(room, member)
            return
        await self._event(room, "join", member, meta, exclude=conn)

    async def leave(self, conn: Conn, room: str) -> None:
        """Take ``conn`` out of ``room`` (a no-op if it is not in it)."""
        found, member = self._remove(conn, room)
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
        if rooms is not None:
            rooms.discard(room)
        if not members:
            del self._rooms[room]
            self._subs.pop(room, None)
            self._spawn(self.broker.unsubscribe(room))
        return True, member

    def _conn_closed(self, conn: Conn) -> None:
        """A member closed: leave its rooms now (locally), tell the broker soon after."""
        for room in self._of.pop(conn, ()):
            found, member = self._remove(conn, room)
            if found and member is not None:
                self._spawn(self._announce_leave(room, member))
        self._ids.pop(conn, None)

    def _member_id(self, conn: Conn) -> str:
        member = self._ids.get(conn)
        if member is None:
            member = self._ids[conn] = f"{self.node}.{next(self._counter)}"
        return member

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
        return self._ids.get(conn)

    async def _event(self, room: str, event: str, member: str, meta: bytes, exclude: Conn | None = None) -> None:
        data = {"event": event, "id": member, "meta": msgspec.Raw(meta)}
        await self.broadcast(room, "presence", data, exclude=exclude)

    # -- broadcast ---------------------------------------------------------------------
    async def broadcast(self, room: str, type: str, data: Any = None, *, exclude: Conn | None = None) -> int:
        """Send ``{"type": type, "data": data, "room": room}`` to every member of ``room``.

        ``exclude`` (usually the sender) is skipped. Never waits for a receiver. Returns how
        many connections of this process got it (or had it queued); other processes get it
        through the broker.
        """
        return await self.send(room, encode_message(type, data, room=room), exclude=exclude, text=True)

    async def send(self, room: str, message: str | bytes, *, exclude: Conn | None = None, text: bool | None = None) -> int:
        """Send a raw ``message`` to every member of ``room``: ``str`` as a text frame,
        ``bytes`` as binary (or text with ``text=True``). See :meth:`broadcast`."""
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
        count = 0
        for conn in tuple(members):  # a write may close a slow consumer: iterate a copy
            if conn is not exclude:
                conn.write_broadcast(frame, opcode, payload)
                count += 1
        return count

    def _deliver(self, room: str, data: bytes) -> None:
        """From the broker: a publication of some process (ours are dropped: delivered already)."""
        try:
            node, opcode, payload = unpack(data)
        except ValueError:
            logger.warning("dropped a malformed broker message in room %r", room)
            return
        if node != self.node:
            self._fanout(room, opcode, payload, None)
