"""The broker seam: how a :class:`tether.Hub` reaches the other processes serving its rooms.

A broker does two jobs for a hub:

* **fan-out between processes**: ``publish(room, data)`` hands ``data`` to every *other*
  hub subscribed to ``room``; the hub delivers to its own connections itself, so a
  process never sees its own publication twice (a broker may still echo it back: the hub
  drops messages whose origin is itself);
* **presence**: which members (id -> JSON metadata) are in a room, across processes;
* **room streams** (brokers with ``streams = True``): ``publish_stream`` gives each message the
  room's next offset, keeps it in the room's bounded history, and delivers it with its offset
  to every subscribed hub, the publishing one included, in offset order; ``position`` and
  ``history`` let a resuming client catch up (docs/protocol.md, "Sessions and resume").

Two implementations: :class:`MemoryBroker` (this module, the default: one process, nothing
to set up; several hubs in one process can share a :class:`MemoryBus`, which is how tests
and embedders model a cluster) and :class:`tether.rooms.redis.RedisBroker` (pub/sub +
presence with expiry). :func:`tether.rooms.hub.make_broker` turns the ``broker=`` setting
into one.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
import time
from collections.abc import Awaitable
from typing import ClassVar, Protocol

from ..proto.resume import Gap, HistoryBudget, RoomLog

__all__ = ["Broker", "MemoryBroker", "MemoryBus", "Deliver", "LostGap", "History"]


class Deliver(Protocol):
    """``deliver(room, data, offset)``: called by a broker for every publication it receives;
    ``offset`` is the message's place in the room's stream (None outside a stream)."""

    def __call__(self, room: str, data: bytes, offset: int | None = None, /) -> None: ...


class Release(Protocol):
    """``await release(token, stamp)``: let go of a session another process wants (save it
    first), unless a newer connection attempt of its client than ``stamp`` holds it here."""

    def __call__(self, token: str, stamp: int, /) -> Awaitable[None]: ...


class LostGap(Protocol):
    """``lost(room, gap)``: messages ``gap.first..gap.last`` of ``room``'s stream will never
    be delivered by this broker (lost on the way between processes, and history could not
    repair them; reason ``epoch``: the stream restarted in ``gap.epoch``, ``first`` is 0 and
    the new epoch's messages after ``last`` follow, as in a resume)."""

    def __call__(self, room: str, gap: Gap, /) -> None: ...


class History:
    """History settings of a room: at most ``max_count`` messages and ``max_age`` seconds
    (``max_count=0``: no history, offsets still count)."""

    __slots__ = ("max_count", "max_age")

    def __init__(self, max_count: int = 1000, max_age: float = 120.0) -> None:
        if max_count < 0 or max_age < 0:
            raise ValueError("max_count and max_age must be >= 0")
        self.max_count = max_count
        self.max_age = max_age


class Broker(abc.ABC):
    """One hub's link to the others. Every method may be called before ``start``
    returns only through the hub, which starts the broker first."""

    #: True if publications reach other processes (required for ``workers > 1``).
    shared: ClassVar[bool] = False
    #: True if rooms are streams (offsets, history): ``publish_stream``, ``position``, ``history``.
    streams: ClassVar[bool] = False

    @abc.abstractmethod
    async def start(self, node: str, deliver: Deliver) -> None:
        """Connect. ``node`` identifies this hub; ``deliver`` receives publications."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect and withdraw this node's presence. Idempotent."""

    @abc.abstractmethod
    async def subscribe(self, room: str) -> None:
        """Receive publications to ``room`` from now on (returns once that holds)."""

    @abc.abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """Stop receiving publications to ``room``."""

    @abc.abstractmethod
    async def publish(self, room: str, data: bytes) -> None:
        """Hand ``data`` to the other subscribers of ``room``. Must not wait for them."""

    @abc.abstractmethod
    async def put_member(self, room: str, member: str, meta: bytes) -> None:
        """Record ``member`` (with JSON ``meta``) as present in ``room`` on this node."""

    @abc.abstractmethod
    async def drop_member(self, room: str, member: str) -> None:
        """Remove ``member`` from ``room``'s presence."""

    @abc.abstractmethod
    async def members(self, room: str) -> dict[str, bytes]:
        """Everyone present in ``room`` on every node: member id -> JSON metadata."""

    async def forget_member(self, room: str, member: str) -> None:
        """``member`` moved to another process (its session did): stop listing it from here
        without a leave; that process lists it now."""
        await self.drop_member(room, member)

    # -- room streams (streams = True) ----------------------------------------------------
    async def publish_stream(self, room: str, data: bytes) -> None:
        """Place ``data`` in ``room``'s stream and deliver it, with its offset, to every hub
        subscribed to ``room`` (this one too). Must not wait for the receivers."""
        raise NotImplementedError(f"{type(self).__name__} has no room streams")

    async def position(self, room: str) -> tuple[str | None, int]:
        """``(epoch, offset of the last message)`` of ``room``'s stream; ``(None, 0)`` without."""
        return None, 0

    async def history(self, room: str, after: int, epoch: str | None, limit: int) -> tuple[list[tuple[int, bytes]], Gap | None]:
        """The messages of ``room`` after offset ``after`` (of ``epoch``), and the gap before
        them if history cannot cover it (see :meth:`tether.proto.resume.RoomLog.read`).

        If ``epoch`` is not the room's current one, its history is gone: the gap is
        ``Gap(0, last, "epoch", current)`` (what came before is unknown; ``last`` is the
        last offset of the current epoch that history no longer holds, 0 if none) and the
        messages are the current epoch's from its start.
        """
        current, head = await self.position(room)
        if head <= after and epoch == current:
            return [], None
        return [], Gap(after + 1, head, "lost", current)

    def configure(self, room: str, history: History) -> None:  # noqa: B027  (optional: brokers without history ignore it)
        """Set ``room``'s history bounds (default: the broker's)."""

    def on_gap(self, handler: LostGap) -> None:  # noqa: B027  (brokers that never lose a message never call it)
        """Call ``handler(room, gap)`` when live messages of a subscribed room are lost and
        history cannot fill the hole (the hub tells the room's members). Set before ``start``."""

    # -- sessions across processes (tether.sessions) -------------------------------------
    # A session lives in the process that holds its connection; these let a client resume
    # it in another process. Brokers that do not share sessions keep none (the defaults).
    async def save_session(self, token: str, blob: bytes, ttl: float, version: int) -> bool:
        """Keep a session's state for ``ttl`` seconds, readable by every process, if it is the
        next ``version`` of what the store has, or the store has none (the first save, or the
        store lost it: a Redis restarted empty; the caller's copy is then the only one): True;
        else keep nothing, False (another process saved it since: it holds the session)."""
        return True

    async def load_session(self, token: str) -> bytes | None:
        """The state saved under ``token``, or None."""
        return None

    async def delete_session(self, token: str) -> None:  # noqa: B027
        """Forget the session (it ended)."""

    async def release_session(self, node: str, token: str, wait: float, stamp: int = 0) -> None:  # noqa: B027
        """Ask process ``node`` to let go of session ``token`` (its client came back here
        before ``node`` noticed it left); returns once it has saved it (or refused: it holds a
        newer attempt than ``stamp``), or after ``wait`` seconds."""

    def on_release(self, handler: Release) -> None:  # noqa: B027
        """Call ``handler(token)`` when another process asks this one to let go of a session."""


class MemoryBus:
    """What several :class:`MemoryBroker` in one process share: subscriptions, presence, and
    the room streams with their history (bounded per room by ``history``, and all together
    by ``max_history_bytes``, oldest first)."""

    def __init__(self, *, history: History | None = None, max_history_bytes: int = 64 << 20) -> None:
        self.subscribers: dict[str, dict[MemoryBroker, Deliver]] = {}
        self.presence: dict[str, dict[str, bytes]] = {}
        self.streams: dict[str, RoomLog] = {}
        self.history = history if history is not None else History()
        self.settings: dict[str, History] = {}  # per-room history bounds
        self.budget = HistoryBudget(max_history_bytes)
        self.sessions: dict[str, tuple[bytes, float, int]] = {}  # token -> (state, expires at, version)
        self.nodes: dict[str, MemoryBroker] = {}  # node -> its broker (for release requests)

    def stream(self, room: str) -> RoomLog:
        log = self.streams.get(room)
        if log is None:
            bounds = self.settings.get(room, self.history)
            log = self.streams[room] = RoomLog(
                secrets.token_hex(4), max_count=bounds.max_count, max_age=bounds.max_age, budget=self.budget
            )
        return log

    def sweep(self, now: float) -> None:
        """Expire old history; forget streams nobody listens to and nothing is kept of (their
        epoch ends: a later resume reports the gap)."""
        for room, log in list(self.streams.items()):
            log.expire(now)
            if not log.entries and room not in self.subscribers:
                del self.streams[room]


_SWEEP = 1.0  # seconds between history expiry sweeps


class MemoryBroker(Broker):
    """The in-process broker (the default). ``MemoryBroker(bus)`` joins a shared bus."""

    streams = True

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus()
        self._deliver: Deliver | None = None
        self._mine: dict[str, set[str]] = {}  # room -> members put by this broker
        self._sweeper: asyncio.TimerHandle | None = None
        self._node = ""
        self._release: list[Release] = []

    async def start(self, node: str, deliver: Deliver) -> None:
        self._deliver = deliver
        self._node = node
        self.bus.nodes[node] = self
        self._sweep()

    def _sweep(self) -> None:
        self.bus.sweep(time.monotonic())
        self._sweeper = asyncio.get_running_loop().call_later(_SWEEP, self._sweep)

    async def close(self) -> None:
        self.bus.nodes.pop(self._node, None)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for subs in self.bus.subscribers.values():
            subs.pop(self, None)
        for room, members in self._mine.items():
            present = self.bus.presence.get(room, {})
            for member in members:
                present.pop(member, None)
        self._mine.clear()

    async def subscribe(self, room: str) -> None:
        assert self._deliver is not None, "broker not started"
        self.bus.subscribers.setdefault(room, {})[self] = self._deliver

    async def unsubscribe(self, room: str) -> None:
        subs = self.bus.subscribers.get(room)
        if subs is not None:
            subs.pop(self, None)
            if not subs:
                del self.bus.subscribers[room]

    async def publish(self, room: str, data: bytes) -> None:
        for broker, deliver in tuple(self.bus.subscribers.get(room, {}).items()):
            if broker is not self:  # the publishing hub has delivered locally already
                deliver(room, data)

    async def put_member(self, room: str, member: str, meta: bytes) -> None:
        self.bus.presence.setdefault(room, {})[member] = meta
        self._mine.setdefault(room, set()).add(member)

    async def forget_member(self, room: str, member: str) -> None:
        mine = self._mine.get(room)
        if mine is not None:  # the bus lists it still: the other process put it again
            mine.discard(member)

    async def drop_member(self, room: str, member: str) -> None:
        present = self.bus.presence.get(room)
        if present is not None:
            present.pop(member, None)
            if not present:
                del self.bus.presence[room]
        mine = self._mine.get(room)
        if mine is not None:
            mine.discard(member)
            if not mine:
                del self._mine[room]

    async def members(self, room: str) -> dict[str, bytes]:
        return dict(self.bus.presence.get(room, {}))

    # -- room streams ------------------------------------------------------------------------
    async def publish_stream(self, room: str, data: bytes) -> None:
        offset = self.bus.stream(room).append(data, time.monotonic())
        for deliver in tuple(self.bus.subscribers.get(room, {}).values()):
            deliver(room, data, offset)

    async def position(self, room: str) -> tuple[str | None, int]:
        log = self.bus.stream(room)
        return log.epoch, log.head

    async def history(self, room: str, after: int, epoch: str | None, limit: int) -> tuple[list[tuple[int, bytes]], Gap | None]:
        log = self.bus.stream(room)
        if epoch != log.epoch:  # the history the client's offset refers to is gone
            kept, gap = log.read(0, time.monotonic(), limit=limit)  # the new epoch's, from its start
            return kept, Gap(0, gap.last if gap is not None else 0, "epoch", log.epoch)
        return log.read(after, time.monotonic(), limit=limit)

    # -- sessions ---------------------------------------------------------------------------
    async def save_session(self, token: str, blob: bytes, ttl: float, version: int) -> bool:
        kept = self.bus.sessions.get(token)
        now = time.monotonic()
        if kept is not None and kept[1] > now and kept[2] != version - 1:
            return False
        self.bus.sessions[token] = (blob, now + ttl, version)
        return True

    async def load_session(self, token: str) -> bytes | None:
        found = self.bus.sessions.get(token)
        if found is None or found[1] < time.monotonic():
            self.bus.sessions.pop(token, None)
            return None
        return found[0]

    async def delete_session(self, token: str) -> None:
        self.bus.sessions.pop(token, None)

    async def release_session(self, node: str, token: str, wait: float, stamp: int = 0) -> None:
        other = self.bus.nodes.get(node)
        if other is None or other is self:
            return
        try:
            async with asyncio.timeout(wait):
                await other.let_go(token, stamp)
        except TimeoutError:
            pass

    def on_release(self, handler: Release) -> None:
        self._release.append(handler)

    async def let_go(self, token: str, stamp: int = 0) -> None:
        """Another broker on the bus asks this one's process to release session ``token``."""
        for handler in list(self._release):
            await handler(token, stamp)

    def configure(self, room: str, history: History) -> None:
        self.bus.settings[room] = history
        log = self.bus.streams.get(room)
        if log is not None:
            log.max_count, log.max_age = history.max_count, history.max_age
