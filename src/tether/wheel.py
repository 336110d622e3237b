"""One loop timer for every connection's keepalive.

A ``TimerHandle`` per connection costs about half a KiB of an idle connection's memory (and
a heap operation per reschedule). Instead, connections are put in buckets of ``RESOLUTION``
seconds and a single timer per event loop wakes at the earliest bucket and calls each
connection's ``keepalive_tick``, which puts it back in a later bucket. A closed connection
is simply skipped when its bucket comes due.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import weakref
from typing import Protocol

__all__ = ["schedule", "RESOLUTION"]

#: Seconds per bucket: keepalive decisions happen at most this late.
RESOLUTION = 0.01

_now = time.monotonic
logger = logging.getLogger("tether")


class _Ticking(Protocol):
    def keepalive_tick(self) -> None: ...


class _Wheel:
    __slots__ = ("_loop", "_buckets", "_slots", "_timer", "_armed")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, list[_Ticking]] = {}
        self._slots: list[int] = []  # a heap of the bucket keys
        self._timer: asyncio.TimerHandle | None = None
        self._armed: int | None = None  # the slot the timer is set for

    def add(self, when: float, item: _Ticking) -> None:
        slot = math.ceil(when / RESOLUTION)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = []
            heapq.heappush(self._slots, slot)
        bucket.append(item)
        if self._armed is None or slot < self._armed:
            self._arm(slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        delay = max(0.0, slot * RESOLUTION - _now())
        self._timer = self._loop.call_at(self._loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self._timer = self._armed = None
        now_slot = math.floor(_now() / RESOLUTION)
        while self._slots and self._slots[0] <= now_slot:
            for item in self._buckets.pop(heapq.heappop(self._slots)):
                try:
                    item.keepalive_tick()
                except Exception:  # one connection's bug must not stop the others' keepalive
                    logger.exception("keepalive tick failed for %r", item)
        # An item rescheduled while firing armed the timer for its own (later) slot: the
        # earliest bucket left may be due sooner.
        if self._slots and (self._armed is None or self._slots[0] < self._armed):
            self._arm(self._slots[0])


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wheel] = weakref.WeakKeyDictionary()


def schedule(when: float, item: _Ticking) -> None:
    """Call ``item.keepalive_tick()`` at ``when`` (``time.monotonic()`` seconds), or just after."""
    loop = asyncio.get_running_loop()
    wheel = _wheels.get(loop)
    if wheel is None:
        wheel = _wheels[loop] = _Wheel(loop)
    wheel.add(when, item)
