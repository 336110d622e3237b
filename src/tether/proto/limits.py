"""Per-connection message rate limit: a token bucket, pure (time passed in).

Each message takes a token; tokens refill at ``rate`` per second up to ``burst``. A
message that finds no token is *rejected*. Typed apps answer it with an error reply
(code ``rate_limited``); once ``burst`` messages in a row have been rejected the
connection is closed with 1008 (policy violation), which clients do not retry.
Plain handlers have no way to answer, so they close with 1008 at the first rejection.
"""

from __future__ import annotations

__all__ = ["RateLimit", "TokenBucket"]

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate`` messages per second on average, bursts of up to ``burst``."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")


class TokenBucket:
    __slots__ = ("rate", "burst", "_tokens", "_at", "strikes")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.rate = limit.rate
        self.burst = limit.burst
        self._tokens = float(limit.burst)
        self._at = now
        #: Messages rejected in a row.
        self.strikes = 0

    def allow(self, now: float) -> bool:
        """Take a token for a message arriving at ``now``; False if there is none."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.strikes = 0
            return True
        self.strikes += 1
        return False

    @property
    def exhausted(self) -> bool:
        """Too many rejections in a row: close the connection (1008)."""
        return self.strikes >= self.burst
