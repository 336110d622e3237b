"""Authentication at the handshake.

.. code-block:: python

    def auth(request: tether.Request) -> tether.Identity | None:
        token = tether.auth.token(request)           # header, query, cookie or subprotocol
        claims = verify(token)                        # your code
        if claims is None:
            return None                               # -> 401 before the upgrade
        return tether.Identity(claims["sub"], expires_at=claims["exp"])

    tether.run(routes, auth=auth)

A **sync** ``auth`` runs before the upgrade: ``None`` answers 401, ``raise
tether.CloseConnection(4003)`` answers 403 (4001 answers 401). An **async** ``auth`` (a
database look-up) runs right after the upgrade: ``None`` closes with 4001, a
``CloseConnection`` with its code. Either way no handler runs for a rejected connection and
handlers read the result from ``conn.identity``. An identity with ``expires_at`` (Unix
seconds) is closed with 4002 "token expired" at that time; clients reconnect with fresh
credentials (tether.js and tether.Client recompute ``params`` on every reconnect).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .conn import Request

__all__ = ["Identity", "Auth", "token", "cookie_value", "subprotocols", "SUBPROTOCOL", "TOKEN_PREFIX"]

#: The subprotocol tether.js offers; the server selects it when offered.
SUBPROTOCOL = "tether"
#: Browsers cannot set headers on a WebSocket: tether.js can offer ``token.<token>`` as a
#: second subprotocol instead of a query parameter (which ends up in access logs).
TOKEN_PREFIX = "token."

#: Close codes (docs/protocol.md).
UNAUTHORIZED = 4001
TOKEN_EXPIRED = 4002
FORBIDDEN = 4003


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the other end. ``expires_at`` is Unix time in seconds, or None."""

    subject: str
    expires_at: float | None = None
    claims: dict[str, Any] = field(default_factory=dict)


Auth = Callable[[Request], "Any | None | Awaitable[Any | None]"]


def token(request: Request, *, name: str = "token") -> str | None:
    """The credential a client presented, looked for in this order:

    ``Authorization: Bearer <token>``, the ``token`` query parameter, a ``token`` cookie,
    and a ``token.<token>`` entry of ``Sec-WebSocket-Protocol``.
    """
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if request.query.get(name):
        return request.query[name]
    cookie = request.headers.get("Cookie")
    if cookie:
        found = cookie_value(cookie, name)
        if found:
            return found
    for protocol in subprotocols(request):
        if protocol.startswith(TOKEN_PREFIX):
            return protocol[len(TOKEN_PREFIX):]
    return None


def cookie_value(header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` header, read as browsers send it.

    ``name=value`` pairs separated by ``;`` (RFC 6265 section 5.4); a pair that is not
    RFC-conforming (``prefs={"a":1}``) is skipped, not the end of the header (the standard
    library's ``SimpleCookie`` stops there). Double quotes around a value are removed.
    """
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def subprotocols(request: Request) -> list[str]:
    """The subprotocols the client offered, in order."""
    offered = request.headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in offered.split(",") if p.strip()]
