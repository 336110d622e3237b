"""Heartbeat decisions: pure functions of timestamps, no I/O, no clock.

The server sends ``{"type": "heartbeat", "data": {"t": ...}}`` when it has sent
nothing for ``interval`` seconds (:func:`heartbeat_due`); the client answers with
the same data. A client decides from the time it last received anything whether
the server is still there (:func:`liveness`). ``static/tether.js`` ports this
module line by line; both are checked against ``tests/vectors/keepalive.json``.

``interval=None`` turns heartbeats off. Times are seconds on one clock.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Liveness", "Pinger", "heartbeat_due", "liveness"]

Liveness = Literal["ok", "probe", "dead"]


def liveness(
    now: float,
    last_received: float,
    last_check: float,
    interval: float | None,
    timeout: float | None,
    *,
    late_slack: float = 1.0,
) -> Liveness:
    """Decide, from a check timer that runs every ``interval`` seconds, if the peer is alive.

    - ``"ok"``: something arrived within ``interval + timeout`` seconds: a server
      sends at least a heartbeat every ``interval``, and ``timeout`` is the slack
      allowed for it to arrive. Also always ``"ok"`` when ``interval`` is ``None``
      (heartbeats off) or ``timeout`` is ``None`` (never time out).
    - ``"probe"``: the window is exceeded, but this check itself ran late
      (``now - last_check > interval + late_slack``): the process or browser tab
      was suspended or throttled, so the silence may be ours, not the server's.
      Don't declare death: send a heartbeat and give the server a fresh
      ``timeout`` window.
    - ``"dead"``: the window is exceeded and the timer ran on time: the server or
      the network is gone; close the connection and reconnect.
    """
    if interval is None or timeout is None:
        return "ok"
    if now - last_received <= interval + timeout:
        return "ok"
    if now - last_check > interval + late_slack:
        return "probe"
    return "dead"


def heartbeat_due(now: float, last_sent: float, interval: float | None) -> bool:
    """Return whether to send a heartbeat: nothing was sent for ``interval`` seconds.

    Any message sent resets the clock, so a busy connection carries no
    heartbeats. Always ``False`` when ``interval`` is ``None``.
    """
    if interval is None:
        return False
    return now - last_sent >= interval


class Pinger:
    """Protocol-level keepalive for one connection: when to ping, when the peer is dead.

    Every ``interval`` seconds a ping goes out with a fresh payload; if its pong has not
    come back ``timeout`` seconds later, the peer is dead (the caller closes with 1011
    ``"keepalive timeout"``). Pongs measure the round-trip time (``latency``).
    Unsolicited pongs and pongs for older pings are ignored [RFC 6455 section 5.5.3].
    """

    __slots__ = ("interval", "timeout", "latency", "_sent_at", "_last_ping", "_count")

    def __init__(self, interval: float, timeout: float | None, now: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.latency: float | None = None
        self._sent_at: float | None = None  # when the unanswered ping went out
        self._last_ping = now  # the first ping goes out one interval after opening
        self._count = 0

    @property
    def payload(self) -> bytes:
        """The payload of the outstanding ping."""
        return b"tether:%d" % self._count

    def tick(self, now: float) -> Literal["ping", "dead"] | None:
        """What to do at ``now``: send a ping, give up on the peer, or nothing."""
        if self._sent_at is not None:
            if self.timeout is not None and now - self._sent_at >= self.timeout:
                return "dead"
            return None
        if now - self._last_ping >= self.interval:
            self._count += 1
            self._sent_at = self._last_ping = now
            return "ping"
        return None

    def next_wakeup(self) -> float:
        """When ``tick`` next has something to decide (an absolute time)."""
        if self._sent_at is not None and self.timeout is not None:
            return min(self._sent_at + self.timeout, self._last_ping + self.interval)
        return self._last_ping + self.interval

    def pong(self, payload: bytes, now: float) -> float | None:
        """Record a pong; returns the measured latency if it answers the outstanding ping."""
        if self._sent_at is None or payload != self.payload:
            return None
        self.latency = now - self._sent_at
        self._sent_at = None
        return self.latency
