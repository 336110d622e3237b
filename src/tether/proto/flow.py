"""Write-buffer flow control: when a writer must pause and when it may go on, no I/O.

Transports that buffer outgoing frames themselves (ASGI's writer task, the in-memory pipes
of ``tether.testing``) count the bytes they hold here; picows leaves it to the event loop's
transport, whose high/low water marks work the same way.
"""

from __future__ import annotations

__all__ = ["WriteBuffer"]


class WriteBuffer:
    """Bytes written but not yet sent, with a pause threshold (``high``) and a resume one.

    ``add`` returns True when the writer must pause (more than ``high`` bytes pending);
    ``sent`` returns True when a paused writer may resume (at most ``high // 4`` left).
    """

    __slots__ = ("high", "low", "pending", "paused")

    def __init__(self, high: int) -> None:
        if high < 0:
            raise ValueError("high must be >= 0")
        self.high = high
        self.low = high // 4
        self.pending = 0
        self.paused = False

    def add(self, size: int) -> bool:
        self.pending += size
        if self.pending > self.high and not self.paused:
            self.paused = True
            return True
        return False

    def sent(self, size: int) -> bool:
        self.pending -= size
        if self.paused and self.pending <= self.low:
            self.paused = False
            return True
        return False
