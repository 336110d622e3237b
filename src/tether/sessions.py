"""Sessions: what of a typed connection survives a reconnect (docs/protocol.md, "Sessions").

A :class:`Session` is created with a client's first connection and lives until it has been
detached (its connection gone) for ``window`` seconds without a resume. It keeps both
streams of :mod:`tether.proto.resume` (the client's ``seq`` it accepted, the direct messages
it sent and the client has not acked), the rooms it is in (with their presence meta, so the
member stays listed while the client is away), its ``assigns`` and its ``identity``.

A client that can resume offers the WebSocket subprotocol ``session``; the welcome message
hands it the session's id and its private ``token``. Reconnecting within the window it offers
``session.<token>.<ack>.<stamp>`` (``ack``: the last direct message it received; ``stamp``: a
number that grows with each of its connection attempts) and continues the session
(``resumed: true``); otherwise it gets a new one (``resumed: false``).

The stamp orders a client's attempts wherever they land: an attempt older than the one that
holds the session (the client gave up on it and came back elsewhere, and this process has only
now got to it) never takes the session from the newer one; it is closed with 4009.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from .auth import Identity
from .conn import OPEN, Conn
from .errors import CloseConnection, ConnectionClosedOK
from .proto.envelope import Id, encode_message
from .proto.frames import OP_TEXT
from .proto.resume import DirectLog, Gap, Inbound

__all__ = ["Resume", "Saved", "Session", "SessionStore", "Sessions", "SESSION", "RESUME_PREFIX", "RELEASE_TIMEOUT"]

logger = logging.getLogger("tether")

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


class Saved(msgspec.Struct, array_like=True):
    """A session as another process reads it (``Session.save`` / ``Session.restore``).

    ``node`` is the process holding its connection, None while detached. ``assigns`` and
    ``identity`` travel when msgspec can encode them (what cannot is left out, logged).
    """

    id: str
    token: str
    node: str | None
    inbound: int
    direct_seq: int
    direct_acked: int
    direct: list[tuple[int, bytes]]
    rooms: dict[str, tuple[bytes, bool]]
    member: str | None
    assigns: dict[str, Any]
    identity: Any
    resumed: int
    #: Grows by one with every save, wherever it happens: a store takes a save only if it
    #: follows the copy it has (version - 1), so two processes cannot both hold the session.
    version: int
    #: The stamp of the client's connection attempt that holds it (0: none given; see
    #: :class:`Sessions`). Last, with a default: copies saved before it existed still load.
    stamp: int = 0


_saved = msgspec.msgpack.Decoder(Saved)
_encode = msgspec.msgpack.Encoder().encode


class Session:
    """One client's session, across its connections."""

    __slots__ = (
        "id", "token", "settings", "inbound", "direct", "rooms", "member", "assigns", "identity", "conn", "live",
        "in_flight", "_expiry", "_ack_timer", "resumed", "ended", "releasing", "version", "saving", "stamp",
        "on_change",
    )

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
        #: Handlers running for it now (their replies belong to the session, whichever
        #: connection carries it): another process taking it over waits for them.
        self.in_flight: set[asyncio.Future[Any]] = set()
        #: How many times it was resumed.
        self.resumed = 0
        #: True once it expired (or the App shut down): nothing can reach its client any more.
        self.ended = False
        #: True once another process asked for it (its last save here is on the way).
        self.releasing = False
        #: Saves so far, across every process that held it (see :class:`Saved`).
        self.version = 0
        #: One save at a time (each one is the next version of the one before).
        self.saving = asyncio.Lock()
        #: The stamp of the client's connection attempt that holds it (0: none given).
        self.stamp = 0
        #: Called by :meth:`changed` (set by :class:`Sessions` when sessions are shared: a
        #: save, so that a process that dies does not take the change with it).
        self.on_change: Callable[[Session], None] | None = None
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
        if conn is not None and self.live and conn.state is OPEN:
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
            if conn.metrics is not None:
                conn.metrics.replayed(len(payloads))
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
        if ack is not None and conn is not None and conn.state is OPEN:
            conn.write(OP_TEXT, encode_message("ack", None, ack=ack))

    # -- attach / detach -------------------------------------------------------------------
    def attach(self, conn: Conn) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.conn = conn
        self.releasing = False  # a release that did not finish: the client is back here
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

    # -- across processes --------------------------------------------------------------------
    def save(self, node: str | None, version: int) -> bytes:
        """The state another process needs to resume this session (``node``: where it is
        held; ``version``: this save's number, see :class:`Saved`)."""
        identity = self.identity
        if isinstance(identity, Identity):
            identity = {"subject": identity.subject, "expires_at": identity.expires_at, "claims": identity.claims}
        saved = Saved(
            self.id, self.token, node, self.inbound.last, self.direct.seq, self.direct.acked,
            list(self.direct.entries), {r: (m.meta, m.presence) for r, m in self.rooms.items()},
            self.member, _encodable(self.assigns), _encodable({"identity": identity}).get("identity"), self.resumed,
            version, self.stamp,
        )
        return _encode(saved)

    @classmethod
    def restore(cls, blob: bytes, settings: Resume) -> Session:
        """A session saved by another process (raises ``msgspec.DecodeError`` if malformed)."""
        saved = _saved.decode(blob)
        session = cls(settings)
        session.id, session.token, session.resumed = saved.id, saved.token, saved.resumed
        session.inbound = Inbound(saved.inbound)
        session.direct = DirectLog(max_count=settings.max_direct, max_bytes=settings.max_direct_bytes, seq=saved.direct_seq)
        session.direct.acked = saved.direct_acked
        for seq, payload in saved.direct:
            session.direct.keep(seq, payload)
        session.rooms = {room: Membership(meta, presence) for room, (meta, presence) in saved.rooms.items()}
        session.member = saved.member
        session.version = saved.version
        session.stamp = saved.stamp
        session.assigns = dict(saved.assigns)
        identity = saved.identity
        if isinstance(identity, dict) and "subject" in identity:
            identity = Identity(identity["subject"], identity.get("expires_at"), identity.get("claims") or {})
        session.identity = identity
        return session

    def changed(self) -> None:
        """Its rooms or presence changed (a join, a leave, a meta update): saved for the other
        processes now, not only when the connection goes (a SIGKILLed process saves nothing)."""
        if self.on_change is not None and not self.ended:
            self.on_change(self)

    def holds(self, conn: Conn) -> bool:
        """Whether a message ``conn`` received may still be handled for this session: not once
        the session moved on (another connection took it over, another process is taking it,
        or it ended). The client resends what was not acknowledged wherever it resumes, so a
        message dropped here runs there, once, in order; handled here it would run twice."""
        return (self.conn is conn or self.conn is None) and not self.ended and not self.releasing

    def end(self) -> None:
        self.ended = True
        for timer in (self._expiry, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._expiry = self._ack_timer = None


class SessionStore(Protocol):
    """Where sessions wait for another process (a :class:`tether.Broker`'s session methods)."""

    async def save_session(self, token: str, blob: bytes, ttl: float, version: int) -> bool: ...
    async def load_session(self, token: str) -> bytes | None: ...
    async def delete_session(self, token: str) -> None: ...
    async def release_session(self, node: str, token: str, wait: float, stamp: int = 0) -> None: ...


class _NoStore:
    async def save_session(self, token: str, blob: bytes, ttl: float, version: int) -> bool:
        return True

    async def load_session(self, token: str) -> bytes | None:
        return None

    async def delete_session(self, token: str) -> None:
        pass

    async def release_session(self, node: str, token: str, wait: float, stamp: int = 0) -> None:
        pass


#: Seconds a process waits for another to let go of a session its client resumes here.
RELEASE_TIMEOUT = 2.0


class Sessions:
    """The sessions of one App: those held in this process by token, and the store through
    which a client resumes in another process (:meth:`bind`)."""

    def __init__(self, settings: Resume) -> None:
        self.settings = settings
        self._by_token: dict[str, Session] = {}
        self._store: SessionStore = _NoStore()
        self._node: str | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._saving_soon: set[Session] = set()
        #: Called with a session whose window passed without a resume (its rooms are left).
        self.on_expiry: Callable[[Session], None] = lambda session: None
        #: Called with a session another process took (its rooms are forgotten here, no leave).
        self.on_moved: Callable[[Session], Awaitable[None]] = _nothing
        #: Called with a session this process took from another (list its members here).
        self.on_adopted: Callable[[Session], Awaitable[None]] = _nothing

    def __len__(self) -> int:
        return len(self._by_token)

    def bind(self, store: SessionStore, node: str) -> None:
        """Share sessions through ``store``; this process is ``node``."""
        self._store, self._node = store, node

    async def open(self, conn: Conn, token: str | None, stamp: int = 0) -> tuple[Session, bool]:
        """The session of a new connection: ``(session, resumed)``.

        A known token resumes its session: held here (taking it over from a connection that
        still holds it, which is closed with 4009), or held by another process (asked to let
        go first). An unknown or expired token, a session of another identity, or none,
        starts a new session. ``stamp`` (0: none) orders the client's connection attempts: an
        attempt older than the one holding the session raises ``CloseConnection(4009)``
        (its client gave up on it and resumed elsewhere; it must not take the session back).
        """
        session = await self._take(token, stamp, conn.identity) if token else None
        if session is not None and _same_identity(session.identity, conn.identity):
            if stamp and session.stamp > stamp:  # a newer attempt claimed it while we waited
                raise _stale()
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
        session.on_change = self._changed
        session.attach(conn)
        await self._save(session, self._node)
        return session, False

    async def _take(self, token: str, stamp: int = 0, identity: Any = None) -> Session | None:
        """The session ``token`` names, held by this process from now on, or None.

        The store is the judge of who holds a session: its newest saved copy names the holder
        and a version that grows with every save. We ask the holder to let go (it saves one
        last time), then claim the copy with a save that only succeeds if nobody saved in
        between; losing that race, we look again (a few times, then give up: a new session is
        an explicit ``resumed: false``, two holders would be silent loss). A holder that does
        not answer within RELEASE_TIMEOUT and saved nothing since (a killed process) is
        passed over: the session resumes from its last copy.

        Each claim records the attempt's ``stamp``; an older attempt finding a newer one's
        stamp gives up (``CloseConnection(4009)``) instead of taking the session back from
        the connection its client uses now.
        """
        local = self._by_token.get(token)
        asked: set[tuple[str, int]] = set()
        if self._node is None:  # sessions stay in this process
            if local is not None and stamp and local.stamp > stamp:
                raise _stale()
            if local is not None and _same_identity(local.identity, identity):
                local.stamp = max(local.stamp, stamp)
            return local
        for _ in range(4):
            blob = await self._store.load_session(token)
            local = self._by_token.get(token)
            newest = local.stamp if local is not None else 0
            if blob is None:
                if stamp and newest > stamp:
                    raise _stale()
                if local is not None and _same_identity(local.identity, identity):
                    local.stamp = max(local.stamp, stamp)
                return local  # the store lost it (a Redis restart): what we hold is all there is
            saved = _saved.decode(blob)
            if stamp and max(saved.stamp, newest) > stamp:
                raise _stale()  # the client came back later, here or elsewhere
            if saved.node is not None and saved.node != self._node and (saved.node, saved.version) not in asked:
                asked.add((saved.node, saved.version))
                await self._store.release_session(saved.node, token, RELEASE_TIMEOUT, stamp)
                continue  # read again what it saved
            # Ours, nobody's, or a holder that was asked and saved nothing since: it is gone
            # (killed: nothing answers) or stuck; its last copy is what there is.
            if local is not None and local.version == saved.version:
                candidate, adopted = local, False  # we hold the newest copy
            else:
                if local is not None:  # ours is stale: another process held it since
                    self._forget(local)
                    local = None
                candidate, adopted = Session.restore(blob, self.settings), True
            if _same_identity(candidate.identity, identity):
                candidate.stamp = max(candidate.stamp, stamp)  # saved with the claim
            if await self._save(candidate, self._node):
                candidate.on_change = self._changed
                self._by_token[token] = candidate
                if adopted:
                    await self.on_adopted(candidate)
                return candidate
        logger.warning("could not take over a session another process kept changing; starting a new one")
        return None

    async def _save(self, session: Session, node: str | None) -> bool:
        """Save the session as held by ``node``, if nobody saved it since we last did (or read
        it); False means another process holds it now."""
        if self._node is None:
            return True
        async with session.saving:
            version = session.version + 1
            blob = session.save(node, version)
            ttl = self.settings.window + RELEASE_TIMEOUT
            if await self._store.save_session(session.token, blob, ttl, version):
                session.version = version
                return True
            return False

    def _changed(self, session: Session) -> None:
        """A session held here changed: save it soon (changes in one step go in one save)."""
        if self._node is None or session in self._saving_soon or self._by_token.get(session.token) is not session:
            return
        self._saving_soon.add(session)
        task = asyncio.get_running_loop().create_task(self._save_changed(session))
        self._tasks.add(task)
        task.add_done_callback(self._saved)

    async def _save_changed(self, session: Session) -> None:
        await asyncio.sleep(0)  # the rest of this step's changes (several joins at connect)
        self._saving_soon.discard(session)
        if session.ended or session.releasing or self._by_token.get(session.token) is not session:
            return
        await self._keep_or_forget(session)

    def _keep(self, session: Session) -> None:
        """Save a detached session (in the background); if another process took it meanwhile,
        forget our copy."""
        if self._node is None:
            return
        task = asyncio.get_running_loop().create_task(self._keep_or_forget(session))
        self._tasks.add(task)
        task.add_done_callback(self._saved)

    async def _keep_or_forget(self, session: Session) -> None:
        if not await self._save(session, self._node):
            self._forget(session)

    def _forget(self, session: Session) -> None:
        """Another process holds ``session`` now: drop our copy, without leaving its rooms."""
        if self._by_token.get(session.token) is session:
            del self._by_token[session.token]
        session.end()
        task: asyncio.Future[None] = asyncio.ensure_future(self.on_moved(session))
        self._tasks.add(task)
        task.add_done_callback(self._saved)

    def _saved(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not save a session for other processes: %r", task.exception())

    def detach(self, session: Session, conn: Conn) -> None:
        """``conn`` (the session's connection) closed: the window starts. A normal close
        (1000, by the client or the app) ends the session at once: nobody will resume it."""
        if session.conn is not conn:
            return
        session.detach(self._expired)
        if conn.close_code == 1000:
            self._expired(session)
        else:
            self._keep(session)

    async def release(self, token: str, stamp: int = 0) -> None:
        """Another process resumes ``token``: close its connection here, let handlers still
        running finish (bounded), save it as held by nobody, and forget it here. Not if a
        newer attempt of its client (``stamp``) holds it here: the asker's attempt is stale,
        it reads our copy again and gives up."""
        session = self._by_token.get(token)
        if session is None:
            await self._disown(token)
            return
        if stamp and session.stamp > stamp:
            return
        session.releasing = True  # from now on its connection here handles nothing more
        conn = session.conn
        if conn is not None:
            conn.start_close(4009, "session resumed elsewhere")
        if session.in_flight:  # their replies are the session's: let them land first
            await asyncio.wait(list(session.in_flight), timeout=RELEASE_TIMEOUT / 2)
        if self._by_token.get(token) is not session or not session.releasing or (stamp and session.stamp > stamp):
            return  # let go meanwhile, or its client came back here meanwhile (a newer attempt)
        await self._save(session, None)
        self._by_token.pop(token, None)
        session.end()
        await self.on_moved(session)

    async def _disown(self, token: str) -> None:
        """The store says we hold ``token`` but we let it go already: say so, or the asker
        would wait for us for ever."""
        blob = await self._store.load_session(token)
        if blob is None:
            return
        saved = _saved.decode(blob)
        if saved.node == self._node:
            session = Session.restore(blob, self.settings)
            await self._save(session, None)

    def discard(self, session: Session) -> None:
        """Forget a session at once (its first connection was refused)."""
        self._by_token.pop(session.token, None)
        session.end()
        self._drop(session.token)

    def _expired(self, session: Session) -> None:
        self._by_token.pop(session.token, None)
        session.end()
        self._drop(session.token)
        self.on_expiry(session)

    def _drop(self, token: str) -> None:
        if self._node is None:
            return
        task = asyncio.get_running_loop().create_task(self._store.delete_session(token))
        self._tasks.add(task)
        task.add_done_callback(self._saved)

    def close(self) -> list[Session]:
        """Forget every session (shutdown); returns the detached ones, to end their rooms."""
        detached = [s for s in self._by_token.values() if s.conn is None]
        for session in self._by_token.values():
            session.end()
        self._by_token.clear()
        return detached


def _stale() -> CloseConnection:
    """An attempt older than the one holding its session: its client moved on already."""
    return CloseConnection(4009, "session resumed elsewhere")


async def _nothing(session: Session) -> None:
    pass


def _encodable(values: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` msgspec can encode (the others cannot travel: logged)."""
    kept = {}
    for key, value in values.items():
        try:
            _encode(value)
        except (TypeError, msgspec.EncodeError):
            logger.debug("session value %r cannot be saved for another process", key)
            continue
        kept[key] = value
    return kept


def _same_identity(kept: Any, new: Any) -> bool:
    """A session resumes only for the same peer: same identity subject, or no auth at all."""
    if kept is None or new is None:
        return kept is None and new is None
    return bool(getattr(kept, "subject", kept) == getattr(new, "subject", new))
