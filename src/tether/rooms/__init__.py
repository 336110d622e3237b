"""Rooms, broadcast and presence: the :class:`Hub` and the broker seam under it.

- ``hub``: rooms of this process's connections, one-frame fan-out, presence;
- ``broker``: the seam between hubs (``Broker``) and the in-memory default;
- ``redis``: the Redis broker (``pip install 'tether[redis]'``; the only module importing redis).
"""

from .broker import Broker, MemoryBroker, MemoryBus
from .hub import Hub, Member

__all__ = ["Broker", "Hub", "Member", "MemoryBroker", "MemoryBus"]
