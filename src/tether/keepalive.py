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

__all__ = ["Liveness", "heartbeat_due", "liveness"]

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
