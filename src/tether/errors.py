"""Every exception tether raises, in one tree.

.. code-block:: text

    TetherError
    ├── ConnectionClosed          the connection is closed (code, reason)
    │   ├── ConnectionClosedOK        ... with 1000, 1001 or 1005: a normal end
    │   └── ConnectionClosedError     ... any other way (protocol error, 1006, ...)
    │       └── KeepaliveTimeout          the peer stopped answering pings
    ├── ConcurrencyError          two tasks called ``receive()`` on one connection at once
    ├── InvalidHandshake          the client's upgrade was refused (status)
    ├── DecodeError               a message is not valid for the expected type (path)
    ├── ReplyError                raised by an app handler: becomes an ``error`` reply
    ├── CloseConnection           raised by a handler: closes the connection with a code
    └── the reconnecting client's (``tether.Client``, tether.js has the same names):
        ├── ConnectionLost            the connection dropped after a request was sent
        ├── OutboxOverflow            a message was dropped from the full outbox
        └── ClientClosed              the client is closed

Local failures (a message we cannot decode) are separate from remote ones (the peer closed).
Failures that reach the peer become close codes or error replies and never carry internals
such as tracebacks (websockets' ``Protocol.parse`` does the same).
"""

from __future__ import annotations

__all__ = [
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


class TetherError(Exception):
    """Base class of every exception tether raises."""


class ConnectionClosed(TetherError):
    """Raised by ``send``/``receive`` once the connection is closed.

    ``code`` is the close code received from the peer, or 1006 if the TCP connection was
    lost without a close frame; ``reason`` is its reason text.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"connection closed: {self.code} {self.reason}".rstrip()


class ConnectionClosedOK(ConnectionClosed):
    """The connection closed normally (1000, 1001, or a close frame with no code: 1005)."""


class ConnectionClosedError(ConnectionClosed):
    """The connection closed abnormally (any code other than 1000, 1001 and 1005)."""


class KeepaliveTimeout(ConnectionClosedError):
    """The peer did not answer a ping in time; the connection was closed with 1011."""


class ConcurrencyError(TetherError):
    """A second task called ``receive()`` while another was waiting on the same connection.

    Messages go to one reader; a second one would get an arbitrary share of them. Read from
    one task and hand messages on (websockets raises the same).
    """


class InvalidHandshake(TetherError):
    """The server refused the WebSocket upgrade (``status`` is its HTTP status, or 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class DecodeError(TetherError):
    """A message could not be decoded into the expected type.

    ``path`` locates the failing field as a JSON path (``$.data.n``) when known. The
    connection stays usable: the next message is decoded independently.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return self.message if self.path is None else f"{self.message} at {self.path}"


class ReplyError(TetherError):
    """Raise in a typed handler to answer with ``{"type": "error", "data": {"code", "message"}}``.

    ``code`` is an app-chosen string (``"not_found"``); the connection stays open.
    """

    def __init__(self, code: str, message: str = "", path: str | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        #: The failing field (``$.data.n``) when the error is ``invalid_data``.
        self.path = path

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class CloseConnection(TetherError):
    """Raise in a handler or hook to close the connection with ``code`` and ``reason``.

    Codes 4000-4999 are the application's; see docs/protocol.md for the ones tether uses.
    """

    def __init__(self, code: int = 1000, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class ConnectionLost(TetherError):
    """The connection dropped after the request was sent; its reply will never come."""


class OutboxOverflow(TetherError):
    """The message was dropped from the full outbox before it could be sent."""


class ClientClosed(TetherError):
    """The client was closed with ``close()``, or for good by the server."""


def closed_error(code: int, reason: str) -> ConnectionClosed:
    """The right ``ConnectionClosed`` subclass for a close code."""
    if code in (1000, 1001, 1005):  # 1005: a close frame without a code, also normal
        return ConnectionClosedOK(code, reason)
    if code == 1011 and reason == KEEPALIVE_REASON:
        return KeepaliveTimeout(code, reason)
    return ConnectionClosedError(code, reason)


KEEPALIVE_REASON = "keepalive timeout"
