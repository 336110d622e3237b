"""The Python clients: ``connect`` (one connection, a :class:`tether.Conn`) and ``Client``
(reconnecting, typed; the twin of ``static/tether.js``)."""

from .client import Client
from .connect import connect

__all__ = ["Client", "connect"]
