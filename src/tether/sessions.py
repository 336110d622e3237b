"""Sessions: what of a typed connection survives a reconnect (docs/protocol.md, "Sessions").

A :class:`Session` is created with a client's first connection and lives until it has been
detached (its connection gone) for ``window`` seconds without a resume. It keeps both
streams of :mod:`tether.proto.resume` (the client's ``seq`` it accepted, the direct messages
it sent and the client has not acked), the rooms it is in (with their presence meta, so the
member stays listed while the client is away), its ``assigns`` and its ``identity``.

A client that can resume offers the WebSocket subprotocol ``session``; the welcome message
hands it the session's id and its private ``token``. Reconnecting within the window it offers
``session.<token>.<ack>`` (``ack``: the last direct message it received) and continues the
session (``resumed: true``); otherwise it gets a new one (``resumed: false``).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .conn import Conn, ConnState
from .errors import ConnectionClosedOK
from .proto.envelope import Id, encode_message
from .proto.frames import OP_TEXT
from .proto.resume import DirectLog, Gap, Inbound

__all__ = ["Resume", "Session", "Sessions", "SESSION", "RESUME_PREFIX"]

#: The subprotocol entry a client offers to get a session; ``session.<token>.<ack>`` resumes one.
SESSION = "session"
RESUME_PREFIX = "session."


@dataclass(frozen=True, slots=True)
class Resume:
    """Session settings of an App (``App(resume=Resume(...))``; ``resume=None`` turns sessions off).

    ``window``: seconds a detached session waits for its client (default 120); ``max_direct``
    and ``max_direct_bytes``: unacked direct messages kept per session (replies, errors and
    ``conn.emit`` pushes), oldest dropped beyond (a resume that needed them reports a gap);
    ``ack_delay``: seconds before an ack goes out on its own when no reply carries it.
    """

    window: float = 120.0
    max_direct: int = 256
    max_direct_bytes: int = 1 << 20
    ack_delay: float = 1.0


@dataclass(slots=True)
class Membership:
    """A room the session is in: its presence meta (JSON) and whether it is listed."""

    meta: bytes
    presence: bool


class Session:
    """One client's session, across its connections."""

    __slots__ = ("id", "token", "settings", "inbound", "direct", "rooms", "member", "assigns", "identity", "conn", "live", "_expiry", "_ack_timer", "resumed", "ended")

    def __init__(self, settings: Resume) -> None:
        self.id = secrets.token_urlsafe(9)
        self.token = secrets.token_urlsafe(24)
        self.settings = settings
        self.inbound = Inbound()
        self.direct = DirectLog(max_count=settings.max_direct, max_bytes=settings.max_direct_bytes)
        #: Rooms it is in, kept while detached: room -> membership.
        self.rooms: dict[str, Membership] = {}
        #: Its member id in presence lists (stable across resumes), once it joined with presence.
        self.member: str | None = None
        self.assigns: dict[str, Any] = {}
        self.identity: Any = None
        #: The connection it is attached to, or None while the client is away.
        self.conn: Conn | None = None
        #: Whether direct messages go to the connection as they are sent (False while a
        #: resumed connection waits for its welcome and the replay of what it missed).
        self.live = True
        #: How many times it was resumed.
        self.resumed = 0
        #: True once it expired (or the App shut down): nothing can reach its client any more.
        self.ended = False
        self._expiry: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id} {'attached' if self.conn is not None else 'detached'}>"

    # -- the direct stream (DirectStream, used by Conn.emit and the App's replies) ----------
    def send(self, type: str, data: Any = None, id: Id = None, room: str | None = None) -> None:
        """Number, encode and keep one direct message until the client acks it, and write it
        to the session's connection if it has an open one (else a resume replays it). The
        client's ack rides along when one is due. Raises :class:`tether.ConnectionClosed`
        once the session has ended."""
        if self.ended:
            raise ConnectionClosedOK(1000, "session ended")
        seq = self.direct.next()
        payload = encode_message(type, data, id, room, seq=seq, ack=self.inbound.ack_due())
        self.direct.keep(seq, payload)
        if self._ack_timer is not None and self.inbound.acked == self.inbound.last:
            self._ack_timer.cancel()
            self._ack_timer = None
        conn = self.conn
        if conn is not None and self.live and conn.state is ConnState.OPEN:
            conn.write(OP_TEXT, payload)

    def replay(self, after: int) -> Gap | None:
        """Resend the direct messages after ``after`` (what the client received) to the
        session's connection, which is live from now on; the gap before them if the log had
        to drop some."""
        payloads, gap = self.direct.replay(after)
        conn = self.conn
        if conn is not None:
            for payload in payloads:
                conn.write(OP_TEXT, payload)
        self.live = True
        return gap

    def accept(self, seq: int | None, ack: int | None) -> bool:
        """A message from the client: False if it is a duplicate (handled already)."""
        if ack is not None:
            self.direct.ack(ack)
        return self.inbound.accept(seq)

    def ack_later(self) -> None:
        """Something was accepted and no reply carried its ack: one goes out on its own
        within ``ack_delay`` (one timer per delay, not one per message)."""
        if self._ack_timer is None and self.inbound.acked != self.inbound.last and self.conn is not None:
            self._ack_timer = asyncio.get_running_loop().call_later(self.settings.ack_delay, self._send_ack)

    def _send_ack(self) -> None:
        self._ack_timer = None
        ack = self.inbound.ack_due()
        conn = self.conn
        if ack is not None and conn is not None and conn.state is ConnState.OPEN:
            conn.write(OP_TEXT, encode_message("ack", None, ack=ack))

    # -- attach / detach -------------------------------------------------------------------
    def attach(self, conn: Conn) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.conn = conn
        conn.session = self
        conn.assigns = self.assigns
        if conn.identity is not None:  # fresh credentials (expiry) of the same subject
            self.identity = conn.identity
        else:
            conn.identity = self.identity

    def detach(self, on_expiry: Callable[[Session], None]) -> None:
        """The connection is gone: wait ``window`` seconds for the client, then ``on_expiry``."""
        self.conn = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(self.settings.window, on_expiry, self)

    def end(self) -> None:
        self.ended = True
        for timer in (self._expiry, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._expiry = self._ack_timer = None


class Sessions:
    """The sessions of one App in this process, by token."""

    def __init__(self, settings: Resume) -> None:
        self.settings = settings
        self._by_token: dict[str, Session] = {}
        #: Called with a session whose window passed without a resume (its rooms are left).
        self.on_expiry: Callable[[Session], None] = lambda session: None

    def __len__(self) -> int:
        return len(self._by_token)

    def open(self, conn: Conn, token: str | None) -> tuple[Session, bool]:
        """The session of a new connection: ``(session, resumed)``.

        A known token resumes its session (taking it over from a connection that still holds
        it, which is closed); an unknown one, a token whose identity differs from this
        connection's, or none, starts a new session.
        """
        session = self._by_token.get(token) if token else None
        if session is not None and _same_identity(session.identity, conn.identity):
            old = session.conn
            if old is not None and old is not conn:
                # The client came back before we noticed it left: this connection takes over.
                old.start_close(4009, "session resumed elsewhere")
            session.resumed += 1
            session.attach(conn)
            session.live = False  # until the welcome and the replay (App._welcome)
            return session, True
        session = Session(self.settings)
        self._by_token[session.token] = session
        session.attach(conn)
        return session, False

    def detach(self, session: Session, conn: Conn) -> None:
        """``conn`` (the session's connection) closed: the window starts. A normal close
        (1000, by the client or the app) ends the session at once: nobody will resume it."""
        if session.conn is not conn:
            return
        session.detach(self._expired)
        if conn.close_code == 1000:
            self._expired(session)

    def discard(self, session: Session) -> None:
        """Forget a session at once (its first connection was refused)."""
        self._by_token.pop(session.token, None)
        session.end()

    def _expired(self, session: Session) -> None:
        self._by_token.pop(session.token, None)
        session.end()
        self.on_expiry(session)

    def close(self) -> list[Session]:
        """Forget every session (shutdown); returns the detached ones, to end their rooms."""
        detached = [s for s in self._by_token.values() if s.conn is None]
        for session in self._by_token.values():
            session.end()
        self._by_token.clear()
        return detached


def _same_identity(kept: Any, new: Any) -> bool:
    """A session resumes only for the same peer: same identity subject, or no auth at all."""
    if kept is None or new is None:
        return kept is None and new is None
    return bool(getattr(kept, "subject", kept) == getattr(new, "subject", new))
