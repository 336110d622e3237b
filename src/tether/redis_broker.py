"""``tether.redis_broker.RedisBroker``: the public name of :mod:`tether.rooms.redis` (docs/rooms.md)."""

from .rooms.redis import LinkState, RedisBroker

__all__ = ["LinkState", "RedisBroker"]
