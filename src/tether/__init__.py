"""tether: realtime messaging over WebSockets for asyncio.

The public API is exactly ``__all__``; everything else is internal.
"""

from . import auth
from .app import App
from .auth import Identity
from .broker import Broker, MemoryBroker, MemoryBus
from .client import connect
from .codecs import JSON, Codec, Message
from .conn import Conn, ConnState, Overflow, Request, SendStats
from .errors import (
    CloseConnection,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    DecodeError,
    InvalidHandshake,
    KeepaliveTimeout,
    ReplyError,
    TetherError,
)
from .limits import RateLimit
from .rooms import Hub, Member
from .server import Handler, Server, run, serve
from .session import Client, ClientClosed, ConnectionLost, OutboxOverflow
from .stream import ByteStream
from .workers import serve_workers

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
    "InvalidHandshake",
    "DecodeError",
    "ReplyError",
    "CloseConnection",
    "ConnectionLost",
    "OutboxOverflow",
    "ClientClosed",
]

__version__ = "0.1.0"
