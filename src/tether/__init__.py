"""tether: realtime messaging over WebSockets for asyncio.

The public API is exactly ``__all__``; everything else is internal.
"""

from . import auth
from .app import App
from .auth import Identity
from .client import Client, connect
from .codecs import JSON, Codec, Message
from .conn import Conn, ConnState, Overflow, Request, SendStats
from .errors import (
    ClientClosed,
    CloseConnection,
    ConcurrencyError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    DecodeError,
    InvalidHandshake,
    KeepaliveTimeout,
    OutboxOverflow,
    ReplyError,
    TetherError,
)
from .proto.limits import RateLimit
from .rooms import Broker, Hub, Member, MemoryBroker, MemoryBus
from .server import Handler, Server, run, serve, serve_workers
from .sessions import Resume
from .stream import ByteStream

__all__ = [
    # Server and client
    "App",
    "serve",
    "run",
    "Server",
    "Handler",
    "connect",
    "Client",
    # Security
    "Identity",
    "RateLimit",
    "auth",
    # Connections
    "Conn",
    "ConnState",
    "Request",
    "ByteStream",
    "Resume",
    # Rooms and broadcast (tether.redis_broker.RedisBroker needs tether[redis])
    "Hub",
    "Member",
    "Broker",
    "MemoryBroker",
    "MemoryBus",
    "Overflow",
    "SendStats",
    "serve_workers",
    # Codecs
    "Codec",
    "JSON",
    "Message",
    # Errors
    "TetherError",
    "ConnectionClosed",
    "ConnectionClosedOK",
    "ConnectionClosedError",
    "KeepaliveTimeout",
    "ConcurrencyError",
    "InvalidHandshake",
    "DecodeError",
    "ReplyError",
    "CloseConnection",
    "ConnectionLost",
    "OutboxOverflow",
    "ClientClosed",
]

__version__ = "0.1.0"
