"""tether: realtime messaging over WebSockets for asyncio.

The public API is exactly ``__all__``; everything else is internal.
"""

from .app import App
from .client import connect
from .codecs import JSON, Codec, Message
from .conn import Conn, ConnState, Request
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
from .server import Handler, Server, run, serve
from .session import Client, ClientClosed, ConnectionLost, OutboxOverflow
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
    # Connections
    "Conn",
    "ConnState",
    "Request",
    "ByteStream",
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
