"""What every transport shares: the connection policy, and running a handler on a ``Conn``.

The picows server, the ASGI adapter and the in-memory transport of ``tether.testing`` all
admit a connection the same way, in this order, before the WebSocket upgrade:

1. **origin** (RFC 6455 section 10.2): same-origin by default, or ``allowed_origins``
   (``"*"`` for any); a client that sends no ``Origin`` (not a browser) passes -> 403;
2. **max_connections** -> 503 with ``Retry-After: 1``;
3. a **sync auth** hook: ``None`` -> 401, ``CloseConnection(4001)`` -> 401, any other
   ``CloseConnection`` -> 403; a hook that raises anything else -> 500, logged, no details.

After the upgrade (:meth:`Policy.open`) the connection is counted, gets its rate limiter,
and its identity: an **async auth** hook runs first (``None`` closes with 4001), and an
identity with ``expires_at`` closes the connection with 4002 at that time.
See docs/security.md.

**Behind a proxy** (``forwarded_allow_ips``, see :mod:`tether.transport.forwarded`): when the
peer is a trusted proxy, ``X-Forwarded-For``/``Forwarded`` give ``remote_address`` and the
origin check also accepts the forwarded host (``X-Forwarded-Host``, ``Forwarded: host=``).
A transport that learns the peer only after the upgrade (picows) has the forwarded host
confirmed then: an origin that matched only through it, from a peer that is not a trusted
proxy, is closed with 1008 before the handler runs. See docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..auth import SUBPROTOCOL, TOKEN_EXPIRED, UNAUTHORIZED, Auth, subprotocols
from ..conn import OPEN, Conn, Request
from ..errors import CloseConnection, ConnectionClosed
from ..proto.limits import RateLimit, TokenBucket
from .forwarded import Hop, TrustedProxies, read_headers

__all__ = ["Admitted", "Handler", "HttpResponse", "Policy", "run_handler", "set_identity"]

logger = logging.getLogger("tether")

Handler = Callable[[Conn], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A plain HTTP answer: a refusal, or a page for a request that is not a WebSocket."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request the policy lets in: the ``identity`` a sync auth hook returned (or the
    awaitable of an async one), and the ``subprotocol`` to select (None: none)."""

    identity: Any = None
    subprotocol: str | None = None
    #: The forwarding headers were already applied (the peer was known before the upgrade).
    forwarded: bool = False
    #: The origin matched only the forwarded host of a peer not known yet: confirm it on open.
    confirm_origin: bool = False


FORBIDDEN_ORIGIN = HttpResponse(403, b"403 Forbidden: origin not allowed\n")
TOO_MANY = HttpResponse(503, b"503 Service Unavailable: too many connections\n", (("Retry-After", "1"),))
UNAUTHORIZED_RESPONSE = HttpResponse(401, b"401 Unauthorized\n")
FORBIDDEN_RESPONSE = HttpResponse(403, b"403 Forbidden\n")
INTERNAL_ERROR = HttpResponse(500, b"500 Internal Server Error\n")


class Policy:
    """Origin, auth, connection count, rate limit and identity expiry: one place, every transport.

    ``connections`` is the set of connections open under this policy. ``forwarded_allow_ips``
    (addresses, networks or ``"*"``; None: ignore forwarding headers) are the proxies whose
    ``X-Forwarded-*``/``Forwarded`` headers are believed.
    """

    def __init__(
        self,
        *,
        allowed_origins: Iterable[str] | None = None,
        auth: Auth | None = None,
        rate_limit: RateLimit | None = None,
        max_connections: int | None = None,
        forwarded_allow_ips: str | Iterable[str] | None = None,
    ) -> None:
        self.allowed_origins = None if allowed_origins is None else frozenset(allowed_origins)
        self.auth = auth
        self.rate_limit = rate_limit
        self.max_connections = max_connections
        self.proxies = TrustedProxies(forwarded_allow_ips) if forwarded_allow_ips is not None else None
        self.connections: set[Conn] = set()
        # One bound method for every connection's close callback, not one each (64 bytes).
        self._forget = self.connections.discard

    # -- before the upgrade --------------------------------------------------------------
    def admit(self, request: Request) -> Admitted | HttpResponse:
        """Decide on an upgrade request: :class:`Admitted`, or the refusal to answer with."""
        forwarded, confirm = False, False
        hop: Hop | None = None
        if self.proxies is not None and request.remote_address is not None:
            hop, forwarded = self.forward(request), True
        if not self.origin_allowed(request.headers, hop.host if hop is not None else None):
            if forwarded or not self._origin_by_proxy(request.headers):
                return FORBIDDEN_ORIGIN
            confirm = True
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            return TOO_MANY
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in subprotocols(request) else None
        if self.auth is None:
            return Admitted(None, subprotocol, forwarded, confirm)
        try:
            identity = self.auth(request)
        except CloseConnection as exc:
            return UNAUTHORIZED_RESPONSE if exc.code == UNAUTHORIZED else FORBIDDEN_RESPONSE
        except Exception:
            logger.exception("auth hook failed for %s", request.path)
            return INTERNAL_ERROR
        if identity is None:
            return UNAUTHORIZED_RESPONSE
        return Admitted(identity, subprotocol, forwarded, confirm)

    def origin_allowed(self, headers: Mapping[str, str], forwarded_host: str | None = None) -> bool:
        """Same-origin by default (RFC 6455 section 10.2): the Origin's host is the ``Host``
        header, or ``forwarded_host`` (a trusted proxy's); clients that send no Origin pass."""
        origin = headers.get("Origin")
        if origin is None:
            return True
        if self.allowed_origins is not None:
            return "*" in self.allowed_origins or origin in self.allowed_origins
        netloc = urlsplit(origin).netloc.lower()
        return netloc == headers.get("Host", "").lower() or (forwarded_host is not None and netloc == forwarded_host.lower())

    def _origin_by_proxy(self, headers: Mapping[str, str]) -> bool:
        """The origin matches the forwarded host, if the peer (not known yet) is trusted."""
        host = read_headers(headers)[2] if self.proxies is not None else None
        return host is not None and self.origin_allowed(headers, host)

    def forward(self, request: Request) -> Hop | None:
        """Apply a trusted proxy's headers to ``request`` (its ``remote_address`` becomes the
        client's); returns the hop, or None when the peer is not a trusted proxy."""
        peer = request.remote_address
        if self.proxies is None or peer is None:
            return None
        hop = self.proxies.resolve(request.headers, peer[0])
        if hop is not None and hop.client is not None:
            request.remote_address = hop.client
        return hop

    # -- after the upgrade ---------------------------------------------------------------
    def open(self, conn: Conn, admitted: Admitted, handler: Handler) -> Handler:
        """Put ``conn`` under this policy; returns the handler to run on it."""
        self.connections.add(conn)
        conn.on_close(self._forget)
        if self.proxies is not None and not admitted.forwarded:
            hop = self.forward(conn.request)
            if admitted.confirm_origin and hop is None:
                return _forbidden_origin
        if self.rate_limit is not None:
            conn.limiter = TokenBucket(self.rate_limit, time.monotonic())
        if inspect.isawaitable(admitted.identity):
            return _authenticated(admitted.identity, handler)
        set_identity(conn, admitted.identity)
        return handler


def set_identity(conn: Conn, identity: Any) -> None:
    """Attach the identity; close with 4002 when its credentials expire."""
    conn.identity = identity
    expires_at = getattr(identity, "expires_at", None)
    if expires_at is not None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, expires_at - time.time()), conn.start_close, TOKEN_EXPIRED, "token expired")
        conn.on_close(lambda _: timer.cancel())


async def _forbidden_origin(conn: Conn) -> None:
    """The origin matched a forwarded host, but the peer turned out not to be a trusted proxy."""
    raise CloseConnection(1008, "origin not allowed")


def _authenticated(pending: Awaitable[Any], handler: Handler) -> Handler:
    """Run an async ``auth`` after the upgrade, then the handler (4001 when it says no)."""

    async def run(conn: Conn) -> None:
        identity = await pending
        if identity is None:
            raise CloseConnection(UNAUTHORIZED, "unauthorized")
        set_identity(conn, identity)
        await handler(conn)

    return run


async def run_handler(handler: Handler, conn: Conn, tasks: set[asyncio.Task[Any]] | None = None) -> None:
    """Run ``handler`` on ``conn`` and close it; every transport runs handlers through this.

    ``CloseConnection`` closes with its code, any other exception with 1011 (logged here,
    never sent to the peer), a normal return with 1000. ``ConnectionClosed`` ends the handler
    quietly only when it is this connection's own closure; raised by another connection (a
    peer the handler relayed to has gone) it is a failure like any other. Returns once
    ``conn`` is closed.

    ``tasks``: the set this task was added to (a server's handlers); it leaves it when it
    ends. (A done callback would do the same for ~136 more bytes per connection.)
    """
    try:
        try:
            await handler(conn)
        except ConnectionClosed:
            if conn.state is OPEN:  # not ours: the handler failed while we are open
                logger.exception("handler for %s failed on another connection's close; closing with 1011", conn.path)
                conn.start_close(1011, "internal error")
        except CloseConnection as exc:
            conn.start_close(exc.code, exc.reason)
        except Exception:
            logger.exception("handler for %s failed; closing with 1011", conn.path)
            conn.start_close(1011, "internal error")
        else:
            conn.start_close(1000, "")
        await conn.wait_closed()
    finally:
        if tasks is not None:
            tasks.discard(asyncio.current_task())

