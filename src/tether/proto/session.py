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

Times are seconds on a monotonic clock, ``rand`` a uniform number in [0, 1): both passed in.
Payloads are opaque (bytes in Python, strings in the vectors and in JavaScript).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from .backoff import Backoff, retry_after, should_reconnect

__all__ = ["Session", "State", "Retry", "REFUSED_STATUSES"]

State = Literal["connecting", "open", "reconnecting", "closed"]

#: Handshake refusals that retrying cannot fix: 401 (unauthorized), 403 (forbidden, origin).
REFUSED_STATUSES = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class Retry:
    """Reconnect after ``delay`` seconds; not even a wake-up may come before ``not_before``."""

    delay: float
    not_before: float


class Session:
    """The state of one reconnecting client (see the module docstring)."""

    __slots__ = ("state", "outbox", "outbox_size", "pending", "written", "backoff", "max_retry_after", "opened", "_next_id")

    def __init__(self, *, outbox_size: int = 100, backoff: Backoff | None = None, max_retry_after: float = 60.0) -> None:
        if outbox_size < 0:
            raise ValueError("outbox_size must be >= 0")
        self.state: State = "connecting"
        #: ``(payload, id)`` waiting for a connection, oldest first; ``id`` None for one-way.
        self.outbox: deque[tuple[Any, int | None]] = deque()
        self.outbox_size = outbox_size
        #: Request ids waiting for their reply.
        self.pending: set[int] = set()
        #: Of those, the ids written to the current connection.
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

    def wrote(self, id: int | None) -> None:
        """A request went out on the current connection."""
        if id is not None and id in self.pending:
            self.written.add(id)

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

        ``lost`` are the requests written to it, no longer pending. ``retry`` is None when
        the client is now closed for good. ``code`` is the close code (None: no close frame);
        ``status`` the HTTP status of a refused handshake.
        """
        lost = sorted(self.written)
        self.pending.difference_update(lost)
        self.written.clear()
        if self.state == "closed":
            return lost, None
        if status in REFUSED_STATUSES or not should_reconnect(code, False):
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
