"""The broker seam: how a :class:`tether.Hub` reaches the other processes serving its rooms.

A broker does two jobs for a hub:

* **fan-out between processes**: ``publish(room, data)`` hands ``data`` to every *other*
  hub subscribed to ``room``; the hub delivers to its own connections itself, so a
  process never sees its own publication twice (a broker may still echo it back: the hub
  drops messages whose origin is itself);
* **presence**: which members (id -> JSON metadata) are in a room, across processes.

Two implementations: :class:`MemoryBroker` (this module, the default: one process, nothing
to set up; several hubs in one process can share a :class:`MemoryBus`, which is how tests
and embedders model a cluster) and :class:`tether.rooms.redis.RedisBroker` (pub/sub +
presence with expiry). :func:`tether.rooms.hub.make_broker` turns the ``broker=`` setting
into one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

__all__ = ["Broker", "MemoryBroker", "MemoryBus", "Deliver"]

#: ``deliver(room, data)``: called by a broker for every publication it receives.
Deliver = Callable[[str, bytes], None]


class Broker(abc.ABC):
    """One hub's link to the others. Every method may be called before ``start``
    returns only through the hub, which starts the broker first."""

    #: True if publications reach other processes (required for ``workers > 1``).
    shared: ClassVar[bool] = False

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


class MemoryBus:
    """What several :class:`MemoryBroker` in one process share: subscriptions and presence."""

    def __init__(self) -> None:
        self.subscribers: dict[str, dict[MemoryBroker, Deliver]] = {}
        self.presence: dict[str, dict[str, bytes]] = {}


class MemoryBroker(Broker):
    """The in-process broker (the default). ``MemoryBroker(bus)`` joins a shared bus."""

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus()
        self._deliver: Deliver | None = None
        self._mine: dict[str, set[str]] = {}  # room -> members put by this broker

    async def start(self, node: str, deliver: Deliver) -> None:
        self._deliver = deliver

    async def close(self) -> None:
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
