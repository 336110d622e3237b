"""Many connections, held (issue 16): one tether process holds 50,000 WebSocket connections
with its keepalive on and a trickle of traffic, then lets them all go, and nothing is lost or
stuck.

The soak itself is bench/soak.py (the driver) with the Go generator's ``-mode=soak``
(bench/loadgen/soak.go) and tests/servers/soak_scale_app.py (the server). Here: a 60-second
hold, its first 20 s heartbeats only (two ping intervals of 10 s), the rest with a request from
every connection about every 30 s and a broadcast a second to 10,000 of them. ``make soak``
runs the 5-minute version (ping interval 20 s) against Node ws and Go x/net too and writes
docs/benchmarks.md.

For development, ``TETHER_SOAK_CONNS=2000 TETHER_SOAK_HOLD=20`` runs a small one (the idle
window is a third of the hold, at most 20 s, and two ping intervals).
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest

soak = importlib.import_module("bench.soak")

CONNS = int(os.environ.get("TETHER_SOAK_CONNS", "50000"))
HOLD = float(os.environ.get("TETHER_SOAK_HOLD", "60"))
IDLE = min(20.0, HOLD / 3)
PING = IDLE / 2

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300 + HOLD + CONNS / 100)
def test_one_process_holds_50k_connections_with_heartbeats_and_trickle(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = soak.fit_to_limits(soak.Config(
        conns=CONNS, members=min(10_000, CONNS), hold=HOLD, idle=IDLE, ping_interval=PING,
        pin=shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2,
    ))
    soak.build(["tether"], log=lambda msg: None)
    result = soak.run_soak("tether", cfg, quiet=True, log=print)
    r = soak.summarize(result)
    with capsys.disabled():
        print()
        if cfg.limited_by:
            print(f"soak: NOTE {cfg.limited_by}")
        print("soak:", soak.line(r))
        print(f"soak: RSS per connection over the hold, KiB: {[v for _, v in r['series']][::5]}")
        print(f"soak: heartbeats: {r['heartbeat_cpu_ms_per_interval_per_10k'] or 0:.1f} ms of server CPU per "
              f"{cfg.ping_interval:.0f} s interval per 10,000 idle connections "
              f"({r['pings_per_conn_per_interval'] or 0:.2f} pings per connection per interval); "
              f"ping gaps p50 {r['ping_gap_s_p50']:.1f} s, max {r['ping_gap_s_max']:.1f} s")
        print(f"soak: broadcast to {r['members']:,}: all reached in p50 {r['bcast_all_ms_p50'] or 0:.1f} ms, "
              f"p99 {r['bcast_all_ms_p99'] or 0:.1f} ms; requests p50 {r['req_p50_ms'] or 0:.2f} ms, "
              f"p99 {r['req_p99_ms'] or 0:.1f} ms; the machine's load average reached {r['load1_max']:.1f}")

    assert r["error"] is None, r["error"]
    assert r["conns"] == min(CONNS, cfg.conns) and r["opened"] == r["conns"] + 1
    assert r["req_sent"] >= r["conns"] * (HOLD - IDLE) / cfg.req_every * 0.5  # the trickle ran
    assert r["pings"].get("hold", 0) >= r["conns"] * 0.9  # keepalive pings reached the idle connections
    failed = [name for name, ok in r["checks"].items() if not ok]
    assert not failed, f"{failed}: {soak.line(r)}"
    assert r["rss_growth_pct"] < 10, f"RSS per connection grew while held: {r['series']}"


async def test_wheel_fires_an_item_due_soon_after_one_that_rescheduled_itself() -> None:
    import asyncio
    import contextlib
    import time

    from tether import wheel

    fired: dict[str, float] = {}
    second = asyncio.Event()

    class Item:
        def __init__(self, name: str, again: float | None) -> None:
            self.name, self.again = name, again

        def keepalive_tick(self) -> None:
            fired.setdefault(self.name, time.monotonic())
            if self.again is not None:
                wheel.schedule(time.monotonic() + self.again, self)
            else:
                second.set()

    t0 = time.monotonic()
    wheel.schedule(t0 + 0.05, Item("first", again=5.0))  # fires, then puts itself 5 s later
    wheel.schedule(t0 + 0.10, Item("second", again=None))  # due 50 ms after the first
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(second.wait(), 1.0)
    assert "first" in fired
    assert "second" in fired and fired["second"] - t0 < 0.5
