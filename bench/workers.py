"""Broadcast across processes: 1 process vs 2 workers sharing Redis, to a big room and a small one.

    python bench/workers.py [--runs 3] [--n 10000,10] [--duration 4] [--quick]     (make bench-workers)

The same tether server (bench/servers/tether_server.py: every connection joins the room
``all``; a ``broadcast`` request broadcasts to it) runs as

- ``1 process, memory``: one process, the in-memory broker (the default);
- ``1 process, Redis``: one process, the Redis broker (every broadcast goes through Redis:
  its stream, XADD + PUBLISH, and back);
- ``2 workers, Redis``: ``workers=2`` on one port (SO_REUSEPORT spreads the receivers), rooms
  shared through Redis.

The Go generator (bench/loadgen, ``-mode=bcast``) opens the receivers and one sender, keeps
``--inflight`` broadcasts in flight (one is complete when every receiver has it), then sends
``--lat`` broadcasts one at a time and times each from its write to the first and the last
receiver. Every receiver must get every broadcast once, in order, or the run fails. Two room
sizes (``--n``): 10,000 receivers (what a broadcast costs per delivery) and 10 (what it costs
per broadcast: Redis's share is one script call and one pub/sub message per broadcast per
process, whatever the room's size).

CPU is sampled at the generator's window edges: the server's process tree (master and
workers), redis-server, the generator, and the whole machine. Configurations are interleaved
run by run; the median of ``--runs`` is reported, as deliveries/s and deliveries per server
CPU-second (the machine has 2 cores: two workers and the generator share them, so the
per-CPU figure is the one that says what a core buys). Writes bench/results/workers/latest.json,
the WORKERS section of docs/benchmarks.md (kept by bench/run.py) and docs/workers.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: the generator, its build, CPU sampling)

ROOT = bench.ROOT
RESULTS = bench.BENCH / "results" / "workers"
MD = ROOT / "docs" / "benchmarks.md"
PNG = ROOT / "docs" / "workers.png"
BEGIN, END = "<!-- WORKERS BEGIN -->", "<!-- WORKERS END -->"
CONFIGS = [("1 process, memory", 1, False), ("1 process, Redis", 1, True), ("2 workers, Redis", 2, True)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            total += bench._cpu_seconds(p)
    return total


class Redis:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is missing: make bench-workers installs it (apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="tether-bench-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir,
             "--maxclients", "10000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not bench._port_open(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True, capture_output=True)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """bench/servers/tether_server.py with ``workers`` and maybe Redis; ready once every worker
    answers (each worker listens on the port itself: poll until the process tree is complete)."""

    def __init__(self, workers: int, broker: str | None) -> None:
        self.port = free_port()
        cmd = [bench.PY, str(bench.BENCH / "servers" / "tether_server.py"), str(self.port), "--workers", str(workers)]
        if broker:
            cmd += ["--broker", broker]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bench.TETHER_SRC), os.environ.get("PYTHONPATH", "")])}
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        want = 1 if workers == 1 else workers + 1
        while not (bench._port_open(self.port) and len(tree(self.proc.pid)) >= want):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.tail()}")
            time.sleep(0.1)
        time.sleep(0.5)  # the last worker's listener

    def tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-800:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def measure(workers: int, redis: Redis | None, args: argparse.Namespace, n: int) -> dict[str, Any]:
    if redis is not None:
        redis.flush()
    srv = Server(workers, redis.url if redis else None)
    marks: dict[str, tuple[float, float, float, float]] = {}
    lock = threading.Lock()

    def on_event(name: str) -> None:
        if name in ("measure_start", "measure_end"):
            with lock, contextlib.suppress(OSError):
                redis_cpu = bench._cpu_seconds(redis.proc.pid) if redis else 0.0
                marks[name] = (time.monotonic(), tree_cpu(srv.proc.pid), redis_cpu, bench._system_busy())

    try:
        gen = bench.Loadgen(
            ["-mode=bcast", "-proto=ws", f"-addr=127.0.0.1:{srv.port}", f"-n={n}", f"-inflight={args.inflight}",
             f"-lat={args.lat}", f"-warmup={args.warmup}s", f"-duration={args.duration}s", "-timeout=30s"],
            on_event,
        )
        res = gen.wait(args.warmup + args.duration + 90 + n * 0.01)
        if "error" in res:
            raise RuntimeError(f"loadgen: {res['error']}")
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server died: {srv.tail()}")
    finally:
        srv.stop()
    (t0, s0, r0, b0), (t1, s1, r1, b1) = marks["measure_start"], marks["measure_end"]
    secs, server_cpu, redis_cpu = t1 - t0, s1 - s0, r1 - r0
    delivered = res["delivered"]
    return {
        "deliveries_per_s": res["deliveries_per_s"], "delivered": delivered, "secs": secs,
        "server_cpu_s": server_cpu, "redis_cpu_s": redis_cpu, "machine_busy_frac": (b1 - b0) / secs / (os.cpu_count() or 1),
        "deliveries_per_server_cpu_s": delivered / server_cpu if server_cpu else None,
        "deliveries_per_cpu_s_with_redis": delivered / (server_cpu + redis_cpu) if server_cpu else None,
        "lat_last_p50_ms": res.get("last_ms_p50"), "lat_last_p99_ms": res.get("last_ms_p99"),
        "lat_first_p50_ms": res.get("first_ms_p50"), "gen_cpu_s": res.get("gen_cpu_s"),
    }


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def render(summary: dict[str, Any], args: argparse.Namespace) -> str:
    info = bench.machine()
    lines = [
        BEGIN, "", "## Broadcast across processes: 1 process vs 2 workers on Redis", "",
        f"`make bench-workers` (bench/workers.py, {args.runs} runs interleaved, medians; {args.inflight} broadcasts in "
        f"flight for {args.duration:g} s after {args.warmup:g} s of warm-up, then {args.lat} one at a time for the time "
        f"to the last receiver). {info.get('cpu', '')}, {info.get('cores', '?')} cores shared by the server's processes, "
        f"redis-server and the generator; {time.strftime('%Y-%m-%d')}. Every receiver got every broadcast once and in "
        "order in every run.",
    ]
    for n in args.n:
        base = summary[f"{n}"]["1 process, memory"]["deliveries_per_s"]
        lines += [
            "", f"### {n:,} receivers", "",
            "| setup | deliveries/s | broadcasts/s | vs 1 process | per server CPU-s | per CPU-s incl. redis-server "
            "| server CPU | redis CPU | redis µs per broadcast | to last receiver p50 / p99 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, _, shared in CONFIGS:
            row = summary[f"{n}"][name]
            # /proc's CPU times tick every 10 ms: below 0.05 s in the window the figure is noise
            per_bcast = row["redis_cpu_s"] / (row["delivered"] / n) * 1e6 if shared and row["redis_cpu_s"] >= 0.05 else None
            lines.append(
                f"| {name} | {row['deliveries_per_s']:,.0f} | {row['deliveries_per_s'] / n:,.0f} "
                f"| {row['deliveries_per_s'] / base:.2f}x "
                f"| {row['deliveries_per_server_cpu_s']:,.0f} | {row['deliveries_per_cpu_s_with_redis']:,.0f} "
                f"| {row['server_cpu_s'] / row['secs']:.2f} cores | {row['redis_cpu_s'] / row['secs']:.2f} cores "
                f"| {'-' if per_bcast is None else f'{per_bcast:.0f}'} "
                f"| {row['lat_last_p50_ms']:.1f} / {row['lat_last_p99_ms']:.1f} ms |"
            )
    lines += [
        "", "Raw results: `bench/results/workers/latest.json`; plot: docs/workers.png.", "",
        "![deliveries/s and per server CPU-second, 1 process vs 2 workers, per room size](workers.png)", "", END,
    ]
    return "\n".join(lines)


def write_section(section: str) -> None:
    bench.replace_section(MD, BEGIN, END, section)


def plot(summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _, _ in CONFIGS]
    sizes = summary["n"]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(10, 3.4 * len(sizes)), squeeze=False)
    for row, n in enumerate(sizes):
        for ax, key, title in (
            (axes[row][0], "deliveries_per_s", "deliveries/s"),
            (axes[row][1], "deliveries_per_server_cpu_s", "deliveries per server CPU-second"),
        ):
            values = [summary[f"{n}"][name][key] for name in names]
            ax.bar(names, values, color=["#888", "#c84", "#48c"])
            ax.set_title(f"{n:,} receivers: {title}", fontsize=10)
            ax.tick_params(axis="x", labelsize=8)
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle("broadcast, 1 process vs 2 workers on Redis (bench/workers.py)")
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", default="10000,10", help="room sizes (receivers), comma-separated")
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--lat", type=int, default=30)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="1 run, 1,000 and 10 receivers, 1 s (a check that it works)")
    parser.add_argument("--no-md", action="store_true", help="do not touch docs/benchmarks.md and docs/workers.png")
    parser.add_argument("--render", action="store_true", help="only write the report again from the last results")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "latest.json").read_text())
        args = argparse.Namespace(**saved["args"])
        section = render(saved["summary"], args)
        write_section(section)
        plot(saved["summary"])
        print(section)
        return 0
    args.n = [int(n) for n in str(args.n).split(",")]
    if args.quick:
        args.runs, args.n, args.warmup, args.duration, args.lat = 1, [1000, 10], 0.5, 1.0, 5
    bench._raise_nofile()
    bench.build()
    redis = Redis()
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {f"{n}": {name: [] for name, _, _ in CONFIGS} for n in args.n}
    total, done = args.runs * len(CONFIGS) * len(args.n), 0
    try:
        for run in range(args.runs):
            order = CONFIGS if run % 2 == 0 else CONFIGS[::-1]
            for n in args.n:
                for name, workers, shared in order:
                    print(f"[{done + 1}/{total}] run {run + 1}, {n:,} receivers: {name} ...", flush=True)
                    row = measure(workers, redis if shared else None, args, n)
                    rows[f"{n}"][name].append(row)
                    done += 1
                    print(f"    {row['deliveries_per_s']:,.0f} deliveries/s, {row['deliveries_per_server_cpu_s']:,.0f} per "
                          f"server CPU-s, server {row['server_cpu_s'] / row['secs']:.2f} cores, redis "
                          f"{row['redis_cpu_s'] / row['secs']:.2f}, to last p50 {row['lat_last_p50_ms']:.1f} ms", flush=True)
    finally:
        redis.stop()
    summary: dict[str, Any] = {"n": args.n}
    for n in args.n:
        keys = rows[f"{n}"][CONFIGS[0][0]][0].keys()
        summary[f"{n}"] = {name: {key: median(rows[f"{n}"][name], key) for key in keys} for name, _, _ in CONFIGS}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"args": vars(args), "summary": summary, "runs": rows}, indent=1))
    section = render(summary, args)
    print(section)
    if not args.no_md:
        write_section(section)
        plot(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
