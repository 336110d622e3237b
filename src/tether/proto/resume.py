"""Resume bookkeeping, with no I/O: sequence numbers, acks, room offsets, bounded logs, gaps.

Both directions of a typed connection are streams that survive reconnects (docs/protocol.md,
"Sessions and resume"):

- **client -> server**: every message carries the client's ``seq`` (1, 2, ...). The server
  handles each ``seq`` once (:class:`Inbound`: a duplicate after a resume is dropped) and acks
  the highest it accepted, cumulatively (``ack``, piggy-backed or in an ``ack`` message); the
  client keeps what is not acked and resends only that after a resume.
- **server -> client, direct**: replies, errors and ``conn.emit`` pushes carry the server's
  ``seq``; the server keeps them in a bounded :class:`DirectLog` until the client acks them,
  and replays the unacked tail after a resume.
- **server -> client, rooms**: each room is a stream with gap-free offsets (``off``) and an
  ``epoch`` (new when its history is lost). :class:`RoomLog` keeps a bounded history (count
  and age), and :class:`HistoryBudget` bounds all rooms' history together (oldest evicted
  first). On resume the server replays a room from the client's offset, or says why it
  cannot (:class:`Gap`); :func:`merge` closes the subscribe-then-read race.

The client side (:class:`RoomCursor`) tracks what it received and drops duplicates. Times
are seconds, passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "Gap",
    "GapReason",
    "Inbound",
    "DirectLog",
    "RoomLog",
    "HistoryBudget",
    "RoomCursor",
    "merge",
    "TRIMMED",
    "EXPIRED",
    "EPOCH",
    "TOO_MANY",
    "LOST",
    "SESSION",
]

GapReason = Literal["trimmed", "expired", "epoch", "too_many", "lost", "session"]
#: History no longer holds the messages (count limit, or the memory budget evicted them).
TRIMMED: Final = "trimmed"
#: They are older than the room's history age.
EXPIRED: Final = "expired"
#: The room's history was lost (a new epoch): nothing before it can be replayed.
EPOCH: Final = "epoch"
#: More are missing than a resume replays at once.
TOO_MANY: Final = "too_many"
#: A live message between processes was lost and history could not repair it.
LOST: Final = "lost"
#: The session could not be resumed (expired or unknown): rooms must be joined again.
SESSION: Final = "session"


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages ``first``..``last`` (inclusive) of a stream cannot be delivered, and why.

    ``epoch`` is the stream's epoch now (rooms; None for the direct stream).
    """

    first: int
    last: int
    reason: GapReason
    epoch: str | None = None


class Inbound:
    """Server side of the client's stream: accept each ``seq`` once, in order."""

    __slots__ = ("last", "acked")

    def __init__(self, last: int = 0) -> None:
        #: The highest seq accepted (handled or being handled).
        self.last = last
        #: The highest seq we told the client we accepted.
        self.acked = last

    def accept(self, seq: int | None) -> bool:
        """True if the message is new and must be handled; False for a duplicate.

        Messages without ``seq`` (clients that do not resume) are always handled.
        """
        if seq is None:
            return True
        if seq <= self.last:
            return False
        self.last = seq
        return True

    def ack_due(self) -> int | None:
        """The ack to piggy-back now (the client has not been told of it yet), else None."""
        if self.last == self.acked:
            return None
        self.acked = self.last
        return self.last


class DirectLog:
    """Server side of the direct stream: numbers messages and keeps them until acked.

    Bounded by ``max_count`` messages and ``max_bytes`` of payload; beyond that the oldest
    unacked messages are dropped and a replay that needs them reports a :class:`Gap`.
    """

    __slots__ = ("seq", "entries", "size", "max_count", "max_bytes", "acked", "dropped")

    def __init__(self, *, max_count: int = 256, max_bytes: int = 1 << 20, seq: int = 0) -> None:
        #: The last seq given out.
        self.seq = seq
        self.entries: deque[tuple[int, bytes]] = deque()
        self.size = 0
        self.max_count = max_count
        self.max_bytes = max_bytes
        #: The client's cumulative ack.
        self.acked = seq
        #: Messages dropped unacked because the log was full.
        self.dropped = 0

    def next(self) -> int:
        """The seq of the next message (encode it into the message, then :meth:`keep`)."""
        self.seq += 1
        return self.seq

    def keep(self, seq: int, payload: bytes) -> None:
        self.entries.append((seq, payload))
        self.size += len(payload)
        while len(self.entries) > self.max_count or (self.size > self.max_bytes and len(self.entries) > 1):
            _, old = self.entries.popleft()
            self.size -= len(old)
            self.dropped += 1

    def ack(self, seq: int | None) -> None:
        """The client received everything up to ``seq``."""
        if seq is None or seq <= self.acked:
            return
        self.acked = min(seq, self.seq)
        entries = self.entries
        while entries and entries[0][0] <= seq:
            self.size -= len(entries.popleft()[1])

    def replay(self, after: int) -> tuple[list[bytes], Gap | None]:
        """What to resend to a client that received up to ``after``: the kept messages after
        it, and the gap before them if some were dropped.

        A client that received more than this log ever numbered (``after`` > ``seq``: a copy
        saved before the process that held the session died) gets the next messages numbered
        after what it has, or it would drop them as seen."""
        if after > self.seq:
            self.seq = after
        self.ack(after)
        after = max(after, self.acked)
        first = self.entries[0][0] if self.entries else self.seq + 1
        gap = Gap(after + 1, first - 1, TRIMMED) if first > after + 1 else None
        return [payload for seq, payload in self.entries if seq > after], gap


class HistoryBudget:
    """All rooms' history together, in bytes: past ``max_bytes`` the oldest entries of any
    room go first. One per process."""

    __slots__ = ("max_bytes", "size", "count", "_order")

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        #: Entries kept, all rooms together.
        self.count = 0
        # (log, offset, size) in append order across every room: the front is the oldest.
        # A slot whose entry its log dropped by itself (count or age) is stale: dropped when it
        # reaches the front, or when stale slots outnumber live ones (so the order stays
        # within twice the entries kept, and holds no log nobody else does).
        self._order: deque[tuple[RoomLog, int, int]] = deque()

    def added(self, log: RoomLog, offset: int, size: int) -> None:
        order = self._order
        order.append((log, offset, size))
        self.size += size
        self.count += 1
        while self.size > self.max_bytes and order:
            old_log, old_offset, old_size = order.popleft()
            if _holds(old_log, old_offset):  # a stale slot's bytes were freed already
                self.size -= old_size
                self.count -= 1
                old_log.evict_through(old_offset)
        while order and not _holds(order[0][0], order[0][1]):
            order.popleft()
        if len(order) > 2 * self.count + 64:
            self._order = deque(slot for slot in order if _holds(slot[0], slot[1]))

    def removed(self, size: int) -> None:
        """A log dropped an entry by itself (count or age): ``size`` bytes are free again.

        Its slot in the order stays until it reaches the front or the order is compacted, so
        this is O(1).
        """
        self.size -= size
        self.count -= 1


def _holds(log: RoomLog, offset: int) -> bool:
    """Whether ``log`` still keeps the entry at ``offset`` (entries leave from the front)."""
    entries = log.entries
    return bool(entries) and entries[0][0] <= offset


class RoomLog:
    """One room's stream on this process: its epoch, last offset, and bounded history.

    ``max_count`` messages and ``max_age`` seconds, whichever is less (``max_count=0`` keeps
    no history: offsets still count, a resume after any missed message is a gap).
    """

    __slots__ = ("epoch", "head", "entries", "max_count", "max_age", "budget", "_size", "_evicted", "_trimmed_reason")

    def __init__(self, epoch: str, *, max_count: int = 1000, max_age: float = 120.0, budget: HistoryBudget | None = None, head: int = 0) -> None:
        self.epoch = epoch
        #: The offset of the last message (0: none yet).
        self.head = head
        #: ``(offset, time, payload)``, oldest first.
        self.entries: deque[tuple[int, float, bytes]] = deque()
        self.max_count = max_count
        self.max_age = max_age
        self.budget = budget
        self._size = 0
        self._evicted = head  # every offset <= this is gone (evicted or trimmed)
        self._trimmed_reason: GapReason = TRIMMED

    def append(self, payload: bytes, now: float) -> int:
        """Add a message; returns its offset."""
        self.head += 1
        offset = self.head
        if self.max_count <= 0:
            self._evicted = offset
            return offset
        self.entries.append((offset, now, payload))
        self._size += len(payload)
        if self.budget is not None:
            self.budget.added(self, offset, len(payload))
        if len(self.entries) > self.max_count:
            self._drop_front(TRIMMED)
        return offset

    def evict_through(self, offset: int) -> None:
        """The budget takes back everything up to ``offset`` (if still kept)."""
        entries = self.entries
        while entries and entries[0][0] <= offset:
            _, _, payload = entries.popleft()
            self._size -= len(payload)
            self._evicted = max(self._evicted, offset)
        self._evicted = max(self._evicted, min(offset, self.head))
        self._trimmed_reason = TRIMMED

    def _drop_front(self, reason: GapReason) -> None:
        offset, _, payload = self.entries.popleft()
        self._size -= len(payload)
        self._evicted = offset
        self._trimmed_reason = reason
        if self.budget is not None:
            self.budget.removed(len(payload))

    def expire(self, now: float) -> None:
        """Drop what is older than ``max_age``."""
        entries = self.entries
        while entries and now - entries[0][1] > self.max_age:
            self._drop_front(EXPIRED)

    def read(self, after: int, now: float, *, limit: int = 1000) -> tuple[list[tuple[int, bytes]], Gap | None]:
        """Messages after offset ``after`` up to the head, and the gap before them, if any.

        More than ``limit`` missing is a gap ``too_many`` for all of them (a client that far
        behind should refetch state rather than replay).
        """
        self.expire(now)
        if after >= self.head:
            return [], None
        if self.head - after > limit:
            return [], Gap(after + 1, self.head, TOO_MANY, self.epoch)
        kept = [(offset, payload) for offset, _, payload in self.entries if offset > after]
        first = kept[0][0] if kept else self.head + 1
        gap = Gap(after + 1, first - 1, self._trimmed_reason, self.epoch) if first > after + 1 else None
        return kept, gap

    @property
    def size(self) -> int:
        """Bytes of payload kept."""
        return self._size


def merge(history: Iterable[tuple[int, bytes]], live: Iterable[tuple[int, bytes]], after: int) -> tuple[list[tuple[int, bytes]], Gap | None]:
    """History read after subscribing, plus live messages buffered meanwhile: one ordered,
    deduplicated run after offset ``after``, and the first hole in it if it is not contiguous
    (the caller reports it as a gap)."""
    seen: dict[int, bytes] = {}
    for offset, payload in (*history, *live):
        if offset > after:
            seen.setdefault(offset, payload)
    run = sorted(seen.items())
    expected = after + 1
    for offset, _ in run:
        if offset != expected:
            return [item for item in run if item[0] < offset], Gap(expected, offset - 1, LOST)
        expected += 1
    return run, None


class RoomCursor:
    """Client side of one room's stream: the epoch and the offset received so far.

    Offsets a client never sees are normal (a broadcast that excluded it, e.g. its own
    presence join): live delivery is in order and the server reports real losses itself
    (a ``gap`` event), so the cursor only moves forward and drops what it has seen.
    """

    __slots__ = ("epoch", "offset")

    def __init__(self, epoch: str | None, offset: int) -> None:
        self.epoch = epoch
        self.offset = offset

    def receive(self, offset: int | None) -> bool:
        """A room message with ``off``: True to deliver it, False if it was seen already."""
        if offset is None:
            return True
        if offset <= self.offset:
            return False
        self.offset = offset
        return True
