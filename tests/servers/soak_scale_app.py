"""The tether server of the many-connections soak (tests/test_soak_scale.py, bench/soak.py).

    python tests/servers/soak_scale_app.py PORT [PING_INTERVAL] [wheel-fix]

One process, one typed App at ``/`` (public API only), keepalive on (``PING_INTERVAL``
seconds, 20 by default; the same timeout). It raises its RLIMIT_NOFILE soft limit to the
hard limit first and prints ``LISTENING <port> <nofile>`` once it listens. Messages:

- ``req`` ``{"n": int}`` -> reply ``n``: the trickle every connection sends;
- ``subscribe`` ``{"room": str}`` -> joins the room without presence (a broadcast-only member,
  as a client join with presence would send every member a join event), reply ``true``;
- ``shout`` ``{"n": int, "t": int}`` -> ``app.broadcast("b", "tick", data)``, reply the number
  of receivers;
- ``stats`` -> what is left in the server: ``connections`` (``len(server.connections)``),
  ``tasks`` (``len(asyncio.all_tasks())``), ``socket_fds`` (sockets in ``/proc/self/fd``),
  ``requests`` answered, ``closed`` (close codes of the connections that ended, from
  ``on_disconnect``), ``members`` of room ``b``, ``gc``: the cyclic garbage collector's passes
  per generation and the longest (a full pass walks every object of every connection).

``wheel-fix`` (diagnosis only, for bench/soak.py's ``tether-wheelfix`` peer): tether.wheel's
``_Wheel._fire`` replaced by the fix proposed for its re-arm bug (see
tests/test_soak_scale.py::test_wheel_fires_an_item_due_soon_after_one_that_rescheduled_itself),
to measure what the bug costs. Remove once tether.wheel is fixed.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import resource
import signal
import sys
import time
from typing import Any

import msgspec

import tether


class Req(msgspec.Struct):
    n: int


class Subscribe(msgspec.Struct):
    room: str


class Shout(msgspec.Struct):
    n: int
    t: int


def socket_fds() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
        except OSError:  # the directory's own fd, gone by now
            pass
    return count


class GcTimes:
    """Pauses of the cyclic garbage collector, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.longest_ms = [0.0, 0.0, 0.0]
        self.total_ms = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        ms = (time.perf_counter() - self._start) * 1e3
        g = info["generation"]
        self.count[g] += 1
        self.total_ms[g] += ms
        self.longest_ms[g] = max(self.longest_ms[g], ms)

    def report(self) -> dict[str, list[float]]:
        return {"count": list(self.count), "longest_ms": [round(v, 2) for v in self.longest_ms],
                "total_ms": [round(v, 1) for v in self.total_ms]}


def make_app(state: dict[str, Any]) -> tether.App:
    app = tether.App()
    closed: collections.Counter[int] = collections.Counter()
    answered = [0]

    @app.on("req")
    async def req(conn: tether.Conn, data: Req) -> int:
        answered[0] += 1
        return data.n

    @app.on("subscribe")
    async def subscribe(conn: tether.Conn, data: Subscribe) -> bool:
        await conn.join(data.room, presence=False)
        return True

    @app.on("shout")
    async def shout(conn: tether.Conn, data: Shout) -> int:
        return await app.broadcast("b", "tick", data)

    @app.on("stats")
    def stats(conn: tether.Conn) -> dict[str, Any]:
        server = state["server"]
        return {
            "connections": len(server.connections),
            "tasks": len(asyncio.all_tasks()),
            "socket_fds": socket_fds(),
            "requests": answered[0],
            "closed": {str(code): n for code, n in sorted(closed.items())},
            "members": len(app.hub.local("b")),
            "gc": state["gc"].report(),
        }

    @app.on_disconnect
    def gone(conn: tether.Conn, code: int, reason: str) -> None:
        closed[code] += 1

    return app


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def main(port: int, ping_interval: float) -> None:
    nofile = raise_nofile()
    state: dict[str, Any] = {"gc": GcTimes()}
    app = make_app(state)
    async with tether.serve({"/": app}, "127.0.0.1", port, ping_interval=ping_interval,
                            ping_timeout=ping_interval) as server:
        state["server"] = server
        print(f"LISTENING {server.port} {nofile}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def patch_wheel() -> None:
    """The proposed fix: after a firing, re-arm for the earliest bucket, not for the first one
    added during the firing (which is an interval away while earlier buckets wait)."""
    import heapq
    import logging
    import math

    from tether import wheel

    def _fire(self: Any) -> None:
        self._timer = self._armed = None
        now_slot = math.floor(wheel._now() / wheel.RESOLUTION)
        while self._slots and self._slots[0] <= now_slot:
            for item in self._buckets.pop(heapq.heappop(self._slots)):
                try:
                    item.keepalive_tick()
                except Exception:
                    logging.getLogger("tether").exception("keepalive tick failed for %r", item)
        if self._slots and (self._armed is None or self._slots[0] < self._armed):
            self._arm(self._slots[0])

    wheel._Wheel._fire = _fire  # type: ignore[method-assign]


def run() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    if "wheel-fix" in sys.argv[3:]:
        patch_wheel()
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(port, interval))


if __name__ == "__main__":
    run()
