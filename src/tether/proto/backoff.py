"""Reconnect schedule: pure decisions, no I/O, no clock, no randomness.

Randomness and the current time are passed in, so the same inputs give the
same outputs here and in ``static/tether.js``, which ports this module line by
line. Both are checked against ``tests/vectors/backoff.json``.

A client that lost its connection does::

    backoff.maybe_reset(now)              # the last connection was stable?
    if should_reconnect(code, deliberate):
        delay = (retry_after(code, reason) or 0.0) + backoff.next_delay(random())
        ...sleep(delay), reconnect, then on success: backoff.connected(now)
"""

from __future__ import annotations

import math
import re

__all__ = ["Backoff", "backoff_delay", "retry_after", "should_reconnect"]

#: Close codes after which reconnecting cannot help (docs/protocol.md, "Close codes"):
#: 1008 rate limit exceeded, 4001 authentication rejected, 4003 forbidden.
NO_RECONNECT_CODES = frozenset({1008, 4001, 4003})

_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def backoff_delay(
    attempt: int,
    rand: float,
    *,
    base: float = 0.5,
    factor: float = 2.0,
    cap: float = 30.0,
) -> float:
    """Return the delay in seconds before retry number ``attempt`` (0 = first retry).

    "Full jitter": ``rand * min(cap, base * factor**attempt)``, so clients that
    lost their connection at the same moment spread out instead of returning
    together. ``rand`` is a uniform random number in [0, 1), e.g. ``random.random()``.

    Raises ``ValueError`` if ``attempt < 0``, ``rand`` is outside [0, 1),
    ``base <= 0``, ``factor < 1`` or ``cap <= 0``.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand}")
    if base <= 0.0 or factor < 1.0 or cap <= 0.0:
        raise ValueError("need base > 0, factor >= 1 and cap > 0")
    return rand * _ceiling(attempt, base, factor, cap)


def _ceiling(attempt: int, base: float, factor: float, cap: float) -> float:
    # Past the exponent where base * factor**x == cap the result is cap anyway;
    # returning early keeps factor**attempt from overflowing for huge attempts.
    if factor > 1.0 and attempt > math.log(cap / base) / math.log(factor):
        return cap
    return min(cap, base * factor**attempt)


def should_reconnect(code: int | None, deliberate: bool) -> bool:
    """Return whether a client should reconnect after its connection closed.

    ``code`` is the close code received, or ``None`` when the connection was lost
    without a close frame. ``deliberate`` is true when the client itself chose to
    close: it never reconnects then. Codes 1008, 4001 and 4003 mean that trying
    again would be refused the same way; every other code (including a 1000
    initiated by the server) is worth a retry.
    """
    if deliberate:
        return False
    return code not in NO_RECONNECT_CODES


def retry_after(code: int | None, reason: str) -> float | None:
    """Return the delay in seconds a shutting-down server asked for, else ``None``.

    Only a 1001 close carries one, as a ``;``-separated item of its reason:
    ``"going away; retry_after=5"`` gives ``5.0``. Anything malformed gives ``None``.
    """
    if code != 1001:
        return None
    for item in reason.split(";"):
        key, sep, value = item.strip().partition("=")
        if sep and key == "retry_after" and _SECONDS.fullmatch(value):
            return float(value)
    return None


class Backoff:
    """The attempt counter behind :func:`backoff_delay`, with a stability rule.

    The counter goes back to 0 only once a connection stayed up ``stable_after``
    seconds, so a server that accepts connections and then drops them at once
    still sees clients back off. Times are seconds on any monotonic clock.
    """

    def __init__(
        self,
        *,
        base: float = 0.5,
        factor: float = 2.0,
        cap: float = 30.0,
        stable_after: float = 10.0,
    ) -> None:
        self.base = base
        self.factor = factor
        self.cap = cap
        self.stable_after = stable_after
        self.attempt = 0
        self._connected_at: float | None = None

    def next_delay(self, rand: float) -> float:
        """Return the delay before the next retry and count the attempt."""
        delay = backoff_delay(self.attempt, rand, base=self.base, factor=self.factor, cap=self.cap)
        self.attempt += 1
        self._connected_at = None  # retrying: whatever connection we had is gone
        return delay

    def connected(self, now: float) -> None:
        """Record that a connection opened at ``now``."""
        self._connected_at = now

    def maybe_reset(self, now: float) -> bool:
        """Reset the attempt counter if the connection has been up ``stable_after``.

        Call it when the connection closes (before :meth:`next_delay`) or from a
        timer. Returns whether the counter was reset.
        """
        if self._connected_at is None or now - self._connected_at < self.stable_after:
            return False
        self.attempt = 0
        return True
