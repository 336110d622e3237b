"""The chat history of each call, kept by the demo until tether has room history.

Pure bookkeeping (no I/O, the clock passed in): :class:`ChatHistory` keeps the last ``size``
lines of at most ``rooms`` calls, least recently used calls forgotten first. Every line carries
``(epoch, seq)``: ``seq`` counts the lines of one call from 1, ``epoch`` changes whenever a
call's history starts afresh (a new server process, a call forgotten and started again), so a
client that merges history into what it already shows (``static/assets/chat.js``) never
confuses two histories. When tether's room history lands, ``append`` becomes a broadcast that
the framework records and ``lines`` becomes its replay; the wire format can stay as it is.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque

import msgspec

__all__ = ["ChatHistory", "Line"]


class Line(msgspec.Struct, frozen=True):
    """One chat line as every client sees it (``from`` is the sender's member id)."""

    epoch: str
    seq: int
    sender: str = msgspec.field(name="from")
    name: str
    text: str
    at: int  # Unix time in ms


class _Call:
    __slots__ = ("epoch", "seq", "lines")

    def __init__(self, size: int) -> None:
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self.lines: deque[Line] = deque(maxlen=size)


class ChatHistory:
    """The last ``size`` lines of at most ``rooms`` calls."""

    def __init__(self, size: int = 50, rooms: int = 1000) -> None:
        if size < 1 or rooms < 1:
            raise ValueError("size and rooms must be >= 1")
        self.size, self.rooms = size, rooms
        self._calls: OrderedDict[str, _Call] = OrderedDict()

    def append(self, room: str, sender: str, name: str, text: str, at: int) -> Line:
        """Record a line said in ``room`` at ``at`` (Unix ms) and return it, numbered."""
        call = self._call(room)
        call.seq += 1
        line = Line(call.epoch, call.seq, sender, name, text, at)
        call.lines.append(line)
        return line

    def lines(self, room: str) -> list[Line]:
        """The lines kept for ``room``, oldest first (none for a call never heard of)."""
        call = self._calls.get(room)
        if call is None:
            return []
        self._calls.move_to_end(room)
        return list(call.lines)

    def __len__(self) -> int:
        return len(self._calls)

    def _call(self, room: str) -> _Call:
        call = self._calls.get(room)
        if call is None:
            call = self._calls[room] = _Call(self.size)
            if len(self._calls) > self.rooms:
                self._calls.popitem(last=False)
        self._calls.move_to_end(room)
        return call
