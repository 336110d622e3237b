"""A reconnecting client's bookkeeping, with no I/O: the outbox, pending requests, reconnects.

``tether.Client`` (Python) and ``TetherClient`` in ``static/tether.js`` drive the same rules,
checked by one vector file (``tests/vectors/session.json``). The driver owns the sockets,
timers and futures; this object decides:

- **sending**: while open a message is written at once; otherwise it waits in a bounded
  outbox, oldest dropped first when full (the driver fails a dropped request with
  ``OutboxOverflow``);
- **requests**: ids, which requests wait for a reply, which of them were written to the
  current socket (those are *lost* when it drops: their replies can never come);
- **reconnecting**: after a connection ends, whether to retry and after how long: never
  after ``close()``, a refused handshake (401/403) or a "do not retry" close code
  (1008, 4001, 4003); full-jitter backoff (:mod:`tether.proto.backoff`) plus a server's 1001
  ``retry_after``, capped at ``max_retry_after`` seconds.

With ``resume=True`` (sessions, docs/protocol.md "Sessions and resume") it also keeps the
client's side of both streams:

- **to the server**: each message written gets the next ``seq`` (spliced into its JSON with
  the current direct ``ack``) and is kept until the server acks it; after a resume only the
  unacked tail is written again, in order; after a failed resume (``resumed: false``, or a
  welcome with no session) the requests written in the old session, acked or not, are lost
  (the driver fails them) and the count of unacked one-way ones is reported; a resumed
  welcome's ``ack`` beyond our ``seq`` (a restored copy of the client) moves ``seq`` past it;
- **from the server**: the last direct ``seq`` received (duplicates after a resume are
  dropped) and the ack owed for it; per room the ``(epoch, offset)`` received, so a resume
  asks for exactly what is missing and a duplicate or a hole is seen.

Times are seconds on a monotonic clock, ``rand`` a uniform number in [0, 1): both passed in.
Payloads are opaque (bytes in Python, strings in the vectors and in JavaScript), except that
with ``resume=True`` a payload is a JSON object (its last character is ``}``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from .backoff import Backoff, retry_after, should_reconnect
from .resume import RoomCursor

__all__ = ["Session", "State", "Retry", "Welcome", "REFUSED_STATUSES", "SESSION_TAKEN"]

State = Literal["connecting", "open", "reconnecting", "closed"]

#: Handshake refusals that retrying cannot fix: 401 (unauthorized), 403 (forbidden, origin).
REFUSED_STATUSES = frozenset({401, 403})
#: The server closed this connection because the session was resumed on another one (a copy
#: of the client holding the same token): reconnect with a new session, not that one.
SESSION_TAKEN = 4009


@dataclass(frozen=True, slots=True)
class Retry:
    """Reconnect after ``delay`` seconds; not even a wake-up may come before ``not_before``."""

    delay: float
    not_before: float


@dataclass(frozen=True, slots=True)
class Welcome:
    """What a welcome means for the client's streams (:meth:`Session.welcomed`).

    ``resumed``: the server continued the session (write a ``resume`` message with
    :meth:`Session.positions` first, then ``resend``: the unacked messages, in order).
    Otherwise what was unacked is gone with the old session: ``lost`` request ids (fail
    them), ``lost_messages`` one-way messages, and the rooms it was in (``rooms_lost``).
    """

    resumed: bool
    resend: list[Any]
    lost: list[int]
    lost_messages: int
    rooms_lost: list[str]


class Session:
    """The state of one reconnecting client (see the module docstring)."""

    __slots__ = (
        "state", "outbox", "outbox_size", "pending", "written", "backoff", "max_retry_after", "opened", "_next_id",
        "resume", "token", "session_id", "seq", "unacked", "direct", "direct_acked", "rooms", "stamp",
    )

    def __init__(self, *, outbox_size: int = 100, backoff: Backoff | None = None, max_retry_after: float = 60.0, resume: bool = False) -> None:
        if outbox_size < 0:
            raise ValueError("outbox_size must be >= 0")
        #: Whether the client keeps a session (numbers its messages, resumes after a reconnect).
        self.resume = resume
        #: The session's private token (offer ``session.<token>.<direct>`` to resume) and id.
        self.token: str | None = None
        self.session_id: str | None = None
        #: The last seq given to a message written to the server.
        self.seq = 0
        #: ``(seq, payload, id)`` written and not acked by the server yet, oldest first.
        self.unacked: deque[tuple[int, Any, int | None]] = deque()
        #: The last direct seq received from the server, and the last one acked to it.
        self.direct = 0
        self.direct_acked = 0
        #: Rooms the server put the session in: what of each was received.
        self.rooms: dict[str, RoomCursor] = {}
        #: The stamp of the last resume offered: it grows with every attempt (see :meth:`offer`).
        self.stamp = 0
        self.state: State = "connecting"
        #: ``(payload, id)`` waiting for a connection, oldest first; ``id`` None for one-way.
        self.outbox: deque[tuple[Any, int | None]] = deque()
        self.outbox_size = outbox_size
        #: Request ids waiting for their reply.
        self.pending: set[int] = set()
        #: Of those, the ids written to the current connection (with a session: to any
        #: connection of the current session, since a resume may still answer them).
        self.written: set[int] = set()
        self.backoff = backoff if backoff is not None else Backoff()
        self.max_retry_after = max_retry_after
        #: Connections opened so far (the first is not a reconnect).
        self.opened = 0
        self._next_id = 1

    # -- sending -------------------------------------------------------------------------
    def request_id(self) -> int:
        """A new request id, now pending."""
        id = self._next_id
        self._next_id += 1
        self.pending.add(id)
        return id

    def send(self, payload: Any, id: int | None = None) -> tuple[bool, tuple[Any, int | None] | None]:
        """Route one outgoing message: ``(write_now, dropped)``.

        ``write_now`` True: the driver writes it to the open connection (and calls
        :meth:`wrote` if it is a request). False: it waits in the outbox, and ``dropped``
        is the oldest entry pushed out to make room, if any. Raises ``ValueError`` once
        closed (the driver raises ``ClientClosed`` before asking).
        """
        if self.state == "closed":
            raise ValueError("session is closed")
        if self.state == "open":
            return True, None
        return False, self.queue(payload, id)

    def queue(self, payload: Any, id: int | None = None) -> tuple[Any, int | None] | None:
        """Put a message in the outbox (also when writing it failed because the connection
        is going away); returns the entry dropped to make room, if any."""
        self.outbox.append((payload, id))
        if len(self.outbox) > self.outbox_size:
            dropped = self.outbox.popleft()
            if dropped[1] is not None:
                self.pending.discard(dropped[1])
            return dropped
        return None

    def wrote(self, id: int | None, payload: Any = None) -> Any:
        """A message goes out on the current connection: returns the payload to write.

        In a session the payload gets the next ``seq`` (and the direct ``ack`` owed, if any)
        and is kept until the server acks it.
        """
        if id is not None and id in self.pending:
            self.written.add(id)
        if self.token is None or payload is None:  # no session (yet, or the server keeps none)
            return payload
        self.seq += 1
        ack = self.ack_due()
        tail = f',"seq":{self.seq}' + ("" if ack is None else f',"ack":{ack}') + "}"
        payload = payload[:-1] + (tail.encode() if isinstance(payload, bytes) else tail)
        self.unacked.append((self.seq, payload, id))
        return payload

    # -- the streams (resume) --------------------------------------------------------------
    def acked(self, seq: int | None) -> None:
        """The server accepted every message up to ``seq``: forget them."""
        if seq is None:
            return
        unacked = self.unacked
        while unacked and unacked[0][0] <= seq:
            unacked.popleft()

    def received(self, seq: int | None) -> bool:
        """A direct message from the server: False if it is a duplicate (drop it)."""
        if seq is None:
            return True
        if seq <= self.direct:
            return False
        self.direct = seq
        return True

    def ack_due(self) -> int | None:
        """The direct ack to send now (piggy-backed, or on its own), or None if none is owed."""
        if self.direct == self.direct_acked:
            return None
        self.direct_acked = self.direct
        return self.direct

    def joined(self, room: str, epoch: str | None, offset: int) -> None:
        """The server put the session in ``room`` at ``(epoch, offset)``."""
        cursor = self.rooms.get(room)
        if cursor is None or cursor.epoch != epoch or cursor.offset < offset:
            self.rooms[room] = RoomCursor(epoch, offset)

    def left(self, room: str) -> None:
        self.rooms.pop(room, None)

    def room_message(self, room: str, offset: int | None) -> bool:
        """A room message: True to deliver it, False if it was received already (a replay
        that overlaps what came live)."""
        cursor = self.rooms.get(room)
        return True if cursor is None else cursor.receive(offset)

    def room_gap(self, room: str, last: int, epoch: str | None) -> None:
        """The server says offsets up to ``last`` (of ``epoch``) will never come: move on.
        In a new epoch the offsets start again: the cursor goes to ``last``, even backwards."""
        cursor = self.rooms.get(room)
        if cursor is not None:
            cursor.offset = max(cursor.offset, last) if cursor.epoch == epoch else last
            cursor.epoch = epoch

    def positions(self) -> dict[str, dict[str, Any]]:
        """The ``data.rooms`` of a ``resume`` message: what of each room was received."""
        return {room: {"epoch": c.epoch, "offset": c.offset} for room, c in self.rooms.items()}

    def offer(self, clock: int = 0) -> str | None:
        """The subprotocol entry to offer: ``session`` (start one),
        ``session.<token>.<direct>.<stamp>`` (resume it), or None without ``resume``.

        ``stamp`` orders this client's attempts for the server (an older attempt that reaches
        a process late never takes the session back from a newer one): ``clock`` (the driver
        passes the wall clock in milliseconds, so that a copy restored after a reload comes
        after the page it replaces) or one more than the last stamp, whichever is greater.
        """
        if not self.resume:
            return None
        if self.token is None:
            return "session"
        self.stamp = max(clock, self.stamp + 1)
        return f"session.{self.token}.{self.direct}.{self.stamp}"

    def welcomed(self, info: Any) -> Welcome:
        """The welcome's ``session`` (None: the server keeps no sessions for us, so a session
        we had is gone as if it had expired)."""
        if not self.resume:
            return Welcome(False, [], [], 0, [])
        info = info if isinstance(info, dict) else {}
        had = self.token is not None
        resumed = bool(info.get("resumed")) and had
        self.token, self.session_id = info.get("token"), info.get("id")
        if resumed:
            ack = info.get("ack")
            self.acked(ack)
            if isinstance(ack, int) and ack > self.seq:  # a restored copy of the client: never reuse a seq
                self.seq = ack
            return Welcome(True, [payload for _, payload, _ in self.unacked], [], 0, [])
        # A new session: what the old one had in flight is gone with it, acked or not (an
        # acked request's reply was still to come). (Messages the server sent before its
        # welcome are the new session's: the driver handles them only now.)
        lost = sorted(self.written & self.pending)
        messages = sum(1 for _, _, id in self.unacked if id is None)
        self.pending.difference_update(lost)
        self.written.clear()
        rooms = sorted(self.rooms)
        self.unacked.clear()
        self.rooms.clear()
        self.seq = self.direct = self.direct_acked = 0
        return Welcome(False, [], lost, messages, rooms)

    def settle(self, id: Any) -> bool:
        """A reply or error for ``id`` arrived: True if it answers a pending request."""
        if not isinstance(id, int) or isinstance(id, bool) or id not in self.pending:
            return False
        self.pending.discard(id)
        self.written.discard(id)
        return True

    def forget(self, id: int) -> None:
        """Give up on request ``id`` (it timed out): never send it late."""
        self.pending.discard(id)
        self.written.discard(id)
        if any(entry[1] == id for entry in self.outbox):
            self.outbox = deque(entry for entry in self.outbox if entry[1] != id)

    # -- the connection's life -----------------------------------------------------------
    def connected(self, now: float) -> list[tuple[Any, int | None]]:
        """A connection opened: returns the outbox to write now, in order (it is emptied)."""
        self.state = "open"
        self.opened += 1
        self.backoff.connected(now)
        flush = list(self.outbox)
        self.outbox.clear()
        for _, id in flush:
            self.wrote(id)
        return flush

    def ended(self, code: int | None, reason: str, now: float, rand: float, *, status: int | None = None) -> tuple[list[int], Retry | None]:
        """The connection ended (or could not open): ``(lost, retry)``.

        ``lost`` are the requests written to it, no longer pending (with a session they stay
        pending: the resume decides, unless this close is final). ``retry`` is None when the
        client is now closed for good. ``code`` is the close code (None: no close frame);
        ``status`` the HTTP status of a refused handshake.
        """
        if code == SESSION_TAKEN:
            self.token = None  # another connection holds our session: start a new one
        final = self.state == "closed" or status in REFUSED_STATUSES or not should_reconnect(code, False)
        keep = self.token is not None and not final  # a resume may still answer them
        lost = [] if keep else sorted(self.written)
        self.pending.difference_update(lost)
        if not keep:
            self.written.clear()
        if self.state == "closed":
            return lost, None
        if final:
            self.state = "closed"
            return lost, None
        self.backoff.maybe_reset(now)
        not_before = min(retry_after(code, reason) or 0.0, self.max_retry_after)
        self.state = "reconnecting"
        return lost, Retry(not_before + self.backoff.next_delay(rand), not_before)

    def close(self) -> list[int]:
        """Closed for good by the user: returns the requests still pending (all fail)."""
        self.state = "closed"
        self.outbox.clear()
        ids = sorted(self.pending)
        self.pending.clear()
        self.written.clear()
        return ids
