"""tether's benchmark runner: same job, same machine, same run, for every peer.

    python bench/run.py                 # full mode: what `make bench` runs
    python bench/run.py --quick --peers tether,picows-msgspec --out /tmp/b

Every measurement starts a fresh server pinned to core 0 (taskset), drives it
with the Go load generator (bench/loadgen) pinned to core 1, samples the
server's CPU time (/proc/PID/stat) at the generator's measure_start /
measure_end events and its peak RSS (VmHWM), then stops the server. Peers are
interleaved: each run visits them in a different order. Results: raw JSON in
the output directory, plus a Markdown report and a PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
LOADGEN = BUILD / "loadgen"
PY = sys.executable
GOENV = {"GO111MODULE": "off", "GOPATH": "/usr/share/gocode"}
SERVER_CORE, LOADGEN_CORE = "0", "1"
PORTS = range(9110, 9200)
GEN_CPU_LIMIT = 0.85  # a run where the generator used more of its core is flagged
FOREIGN_LIMIT = 0.15  # ... and one where other processes on the machine used more than this much CPU


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    cmd: tuple[str, ...]  # "{port}" is substituted
    proto: str = "ws"  # ws | sio | tcp
    bcast: bool = False  # has the broadcast mode
    note: str = ""


def _py(script: str, *args: str) -> tuple[str, ...]:
    return (PY, str(BENCH / "servers" / script), "{port}", *args)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer("tether", "tether", _py("tether_server.py"), bcast=True),
        Peer("picows-json", "picows by hand (json)", _py("picows_server.py", "json"), bcast=True),
        Peer("picows-msgspec", "picows by hand (msgspec)", _py("picows_server.py", "msgspec"), bcast=True),
        Peer("websockets", "websockets + uvloop", _py("websockets_server.py"), bcast=True),
        Peer("aiohttp", "aiohttp + uvloop", _py("aiohttp_server.py")),
        Peer("starlette", "Starlette / uvicorn", _py("starlette_server.py")),
        Peer(
            "socketio",
            "python-socketio / uvicorn (Socket.IO)",
            _py("socketio_server.py"),
            proto="sio",
            note="Engine.IO v4 / Socket.IO v5 over WebSocket, event with ack, spoken by the same Go generator",
        ),
        Peer("node-ws", "Node ws", ("node", str(BENCH / "node" / "ws_server.js"), "{port}"), bcast=True),
        Peer("go-xnet", "Go x/net/websocket (tutorial)", (str(BUILD / "go-xnet"), "{port}")),
        Peer("go-gorilla", "Go gorilla/websocket", (str(BUILD / "go-gorilla"), "{port}")),
        Peer(
            "raw-tcp",
            "raw uvloop TCP + msgspec (limit)",
            _py("rawtcp_server.py", "msgspec"),
            proto="tcp",
            note="no WebSocket: newline framing, one write per read",
        ),
        Peer(
            "raw-tcp-json",
            "raw uvloop TCP + json (limit)",
            _py("rawtcp_server.py", "json"),
            proto="tcp",
            note="no WebSocket: newline framing, one write per read",
        ),
    ]
}
BASELINE = "tether"


@dataclass
class Mode:
    runs: int
    warmup: float
    duration: float
    echo_configs: list[tuple[int, int]]
    idle_n: int
    bcast: list[tuple[int, int]]  # (receivers, broadcasts)
    server_start_timeout: float = 15.0
    quiet_wait: float = 20.0  # before each measurement, wait up to this long for the machine to be idle
    quiet_budget: float = 420.0  # ... and at most this long in total
    retry_budget: float = 420.0  # time for re-taking measurements disturbed by other processes


FULL = Mode(
    runs=3,
    warmup=1.0,
    duration=3.0,
    echo_configs=[(1, 1), (1, 16), (50, 1), (50, 16), (500, 1), (500, 16)],
    idle_n=5000,
    bcast=[(1000, 20), (10000, 10)],
)
QUICK = Mode(runs=1, warmup=0.3, duration=0.7, echo_configs=[(50, 1)], idle_n=200, bcast=[(100, 5)], quiet_wait=1.0)


# ------------------------------------------------------------------ building


def build(log: Callable[[str], None] = print) -> None:
    """Build the Go binaries and install Node's ws if they are missing or stale."""
    BUILD.mkdir(exist_ok=True)
    env = {**os.environ, **GOENV}
    for out, src in [("loadgen", "loadgen"), ("go-xnet", "go/xnet"), ("go-gorilla", "go/gorilla")]:
        target, srcdir = BUILD / out, BENCH / src
        newest = max(f.stat().st_mtime for f in srcdir.glob("*.go"))
        if not target.exists() or target.stat().st_mtime < newest:
            log(f"building {out}")
            subprocess.run(["go", "build", "-o", str(target), "."], cwd=srcdir, env=env, check=True)
    if not (BENCH / "node" / "node_modules" / "ws").exists():
        log("npm ci (ws)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH / "node", check=True)


# ------------------------------------------------------------------ processes


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _system_busy() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Server:
    _port_iter = iter(())

    @classmethod
    def next_port(cls) -> int:
        for port in cls._port_iter:
            return port
        cls._port_iter = iter(PORTS)
        return next(cls._port_iter)

    def __init__(self, peer: Peer, timeout: float):
        self.peer = peer
        for _ in range(len(PORTS)):
            self.port = self.next_port()
            if not _port_open(self.port):
                break
        cmd = ["taskset", "-c", SERVER_CORE, *[c.replace("{port}", str(self.port)) for c in peer.cmd]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        self.log = open(BUILD / f"server-{peer.name}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=BENCH / "servers")
        self.pid = self.proc.pid  # taskset execs the server: same pid
        deadline = time.monotonic() + timeout
        while not _port_open(self.port):
            if self.proc.poll() is not None:
                tail = self.tail()
                self.log.close()
                raise RuntimeError(f"{peer.name} exited with {self.proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{peer.name} did not listen on {self.port} within {timeout}s")
            time.sleep(0.05)

    def tail(self) -> str:
        self.log.flush()
        try:
            return (BUILD / f"server-{self.peer.name}.log").read_text(errors="replace")[-600:]
        except OSError:
            return ""

    def cpu(self) -> float:
        return _cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return _status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return _status_kib(self.pid, "VmHWM")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        self.log.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Loadgen:
    """The Go generator as a child: events are acted on as they arrive."""

    def __init__(self, args: list[str], on_event: Callable[[str], None], stdin: bool = False):
        cmd = ["taskset", "-c", LOADGEN_CORE, str(LOADGEN), *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=True,
        )
        self.result: dict[str, Any] | None = None
        self.on_event = on_event
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            if line.startswith("EVENT "):
                self.on_event(line[6:].strip())
            elif line.startswith("RESULT "):
                self.result = json.loads(line[7:])

    def release(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("load generator timed out") from None
        self.thread.join(5)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        if self.result is None:
            raise RuntimeError(f"load generator failed ({self.proc.returncode}): {err[-400:]}")
        return self.result


# ------------------------------------------------------------------ measurements


def _foreign(res: dict[str, Any], marks: dict[str, float], server_cpu: float, secs: float) -> None:
    """CPU used during the window by anything but the server and the generator (other jobs on the box)."""
    busy = marks.get("measure_end_sys", 0.0) - marks.get("measure_start_sys", 0.0)
    res["foreign_cpu_frac"] = max(0.0, busy - server_cpu - res.get("gen_cpu_s", 0.0)) / secs if secs else 0.0


def measure_echo(peer: Peer, c: int, k: int, mode: Mode) -> dict[str, Any]:
    srv = Server(peer, mode.server_start_timeout)
    try:
        marks: dict[str, float] = {}

        def on_event(name: str) -> None:
            if name in ("measure_start", "measure_end"):
                marks[name] = srv.cpu()
                marks[name + "_sys"] = _system_busy()

        gen = Loadgen(
            [
                "-mode=echo", f"-proto={peer.proto}", f"-addr=127.0.0.1:{srv.port}",
                f"-c={c}", f"-k={k}", f"-warmup={mode.warmup}s", f"-duration={mode.duration}s",
            ],
            on_event,
        )
        res = gen.wait(mode.warmup + mode.duration + 60 + c * 0.05)
        if "error" in res:
            raise RuntimeError(f"loadgen: {res['error']}")
        cpu = marks.get("measure_end", 0.0) - marks.get("measure_start", 0.0)
        res["server_cpu_s"] = cpu
        res["server_cpu_frac"] = cpu / res["secs"]
        _foreign(res, marks, cpu, res["secs"])
        res["cpu_s_per_100k"] = cpu / res["msgs"] * 1e5 if res["msgs"] else None
        res["peak_rss_kib"] = srv.hwm_kib()
        if res.get("errors"):
            res["warning"] = f"{res['errors']} connection errors: {res.get('error_kinds')}"
        if not srv.alive():
            raise RuntimeError(f"server died: {srv.tail()}")
        return res
    finally:
        srv.stop()


def measure_idle(peer: Peer, n: int, mode: Mode) -> dict[str, Any]:
    srv = Server(peer, mode.server_start_timeout)
    try:
        # warm the code paths first, so the baseline is not mostly import-time growth
        warm = Loadgen(
            ["-mode=echo", f"-proto={peer.proto}", f"-addr=127.0.0.1:{srv.port}", "-c=20", "-k=1",
             "-warmup=0.1s", "-duration=0.3s"],
            lambda e: None,
        )
        warm.wait(30)
        time.sleep(0.3)
        before = srv.rss_kib()
        holding = threading.Event()
        gen = Loadgen(
            ["-mode=idle", f"-proto={peer.proto}", f"-addr=127.0.0.1:{srv.port}", f"-n={n}", "-hold=60s",
             "-timeout=30s"],
            lambda e: holding.set() if e == "holding" else None,
            stdin=True,
        )
        ok = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and gen.proc.poll() is None:
            if holding.wait(0.2):
                ok = True
                break
        after = before
        if ok:
            time.sleep(1.0)
            after = srv.rss_kib()
        gen.release()
        res = gen.wait(30)
        if "error" in res or not ok:
            raise RuntimeError(f"loadgen: {res.get('error', 'no holding event')}")
        res.update(rss_before_kib=before, rss_after_kib=after, kib_per_conn=(after - before) / n)
        return res
    finally:
        srv.stop()


def measure_bcast(peer: Peer, n: int, r: int, mode: Mode) -> dict[str, Any]:
    srv = Server(peer, mode.server_start_timeout)
    try:
        marks: dict[str, float] = {}

        def on_event(name: str) -> None:
            if name in ("measure_start", "measure_end"):
                marks[name] = srv.cpu()
                marks[name + "_sys"] = _system_busy()

        gen = Loadgen(
            ["-mode=bcast", f"-proto={peer.proto}", f"-addr=127.0.0.1:{srv.port}", f"-n={n}", f"-r={r}",
             "-timeout=20s"],
            on_event,
        )
        res = gen.wait(120 + r * 20)
        if "error" in res:
            raise RuntimeError(f"loadgen: {res['error']}")
        cpu = marks.get("measure_end", 0.0) - marks.get("measure_start", 0.0)
        res["server_cpu_s"] = cpu
        _foreign(res, marks, cpu, res["secs"])
        res["server_us_per_delivery"] = cpu / res["delivered"] * 1e6 if res["delivered"] else None
        return res
    finally:
        srv.stop()


@dataclass
class Task:
    run: int
    kind: str  # echo | idle | bcast
    peer: str
    params: dict[str, int]
    result: dict[str, Any] | None = None
    error: str | None = None
    waited: float = 0.0
    retried: bool = False

    @property
    def key(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}[{p}]"

    def describe(self) -> str:
        return f"run {self.run + 1} {self.key} {self.peer}"


def plan(peers: list[str], bcast_peers: list[str], mode: Mode, seed: int) -> list[Task]:
    rng = random.Random(seed)
    tasks: list[Task] = []
    for run in range(mode.runs):
        order = peers[:]
        rng.shuffle(order)  # interleave: a different peer order in every run
        for c, k in mode.echo_configs:
            tasks += [Task(run, "echo", p, {"c": c, "k": k}) for p in order]
        if mode.idle_n:
            tasks += [Task(run, "idle", p, {"n": mode.idle_n}) for p in order]
        for n, r in mode.bcast:
            tasks += [Task(run, "bcast", p, {"n": n, "r": r}) for p in order if p in bcast_peers]
    return tasks


_waited_total = 0.0


def wait_quiet(mode: Mode) -> float:
    global _waited_total
    if _waited_total >= mode.quiet_budget:
        return 0.0
    w = _wait_quiet(min(mode.quiet_wait, mode.quiet_budget - _waited_total))
    _waited_total += w
    return w


def _wait_quiet(max_wait: float) -> float:
    """Wait (at most max_wait s) until the rest of the machine uses < FOREIGN_LIMIT of a core; returns the wait."""
    t0 = time.monotonic()
    while True:
        b0 = _system_busy()
        time.sleep(0.5)
        if (_system_busy() - b0) / 0.5 < FOREIGN_LIMIT or time.monotonic() - t0 >= max_wait:
            return time.monotonic() - t0


def execute(task: Task, mode: Mode) -> None:
    peer = PEERS[task.peer]
    try:
        if task.kind == "echo":
            task.result = measure_echo(peer, task.params["c"], task.params["k"], mode)
        elif task.kind == "idle":
            task.result = measure_idle(peer, task.params["n"], mode)
        else:
            task.result = measure_bcast(peer, task.params["n"], task.params["r"], mode)
    except Exception as exc:  # recorded and reported; the suite goes on
        task.error = f"{type(exc).__name__}: {exc}"[:500]


# ------------------------------------------------------------------ progress


class Progress:
    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.quiet = total, 0, quiet
        self.t0 = time.monotonic()
        self._rich = None
        if not quiet:
            try:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self._rich = RP(
                    TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                )
                self._rich.start()
                self._id = self._rich.add_task("", total=total)
            except ImportError:
                self._rich = None

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(msg)
        else:
            print(msg, flush=True)

    def start(self, task: Task) -> None:
        if self._rich is not None:
            self._rich.update(self._id, description=task.describe())
        elif not self.quiet:
            print(f"[{self.done + 1}/{self.total}] {task.describe()}", flush=True)

    def finish(self, task: Task) -> None:
        self.done += 1
        r = task.result or {}
        if task.error:
            line = f"  {task.describe()}: ERROR {task.error}"
        elif task.kind == "echo":
            flag = "  (generator at {:.0%} of its core)".format(r["gen_cpu_frac"]) if r["gen_cpu_frac"] > GEN_CPU_LIMIT else ""
            line = f"  {task.describe()}: {r['rps']:,.0f} rt/s p50 {r['p50_us']:.0f}us p99 {r['p99_us']:.0f}us server cpu {r['server_cpu_frac']:.0%}{flag}"
        elif task.kind == "idle":
            line = f"  {task.describe()}: {r['kib_per_conn']:.1f} KiB/conn"
        else:
            line = f"  {task.describe()}: {r['deliveries_per_s']:,.0f} deliveries/s, last receiver {r['last_ms_p50']:.1f} ms"
        if r.get("foreign_cpu_frac", 0) > FOREIGN_LIMIT:
            line += f"  (other processes: {r['foreign_cpu_frac']:.0%} of a core)"
        self.log(line)
        if self._rich is not None:
            self._rich.advance(self._id)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------ report

FIGURES: list[tuple[str, str, str, bool]] = []  # filled by figure_specs: (id, title, unit, higher_is_better)


def figure_specs(mode: Mode) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for c, k in mode.echo_configs:
        specs.append(dict(id=f"rps_c{c}_k{k}", title=f"rt/s C={c} K={k}", kind="echo", params={"c": c, "k": k},
                          field="rps", fmt="k", better="high"))
    main = (50, 1) if (50, 1) in mode.echo_configs else mode.echo_configs[0]
    big = (500, 16) if (500, 16) in mode.echo_configs else mode.echo_configs[-1]
    specs += [
        dict(id="p50", title=f"p50 us (C={main[0]},K={main[1]})", kind="echo", params={"c": main[0], "k": main[1]},
             field="p50_us", fmt="int", better="low"),
        dict(id="p99", title=f"p99 us (C={main[0]},K={main[1]})", kind="echo", params={"c": main[0], "k": main[1]},
             field="p99_us", fmt="int", better="low"),
        dict(id="per_core", title=f"rt per server CPU-second (C={main[0]},K={main[1]})", kind="echo",
             params={"c": main[0], "k": main[1]}, field="rt_per_cpu_s", fmt="k", better="high"),
        dict(id="cpu", title=f"server CPU s / 100k msgs (C={main[0]},K={main[1]})", kind="echo",
             params={"c": main[0], "k": main[1]}, field="cpu_s_per_100k", fmt="2f", better="low"),
        dict(id="rss", title=f"peak RSS MiB (C={big[0]},K={big[1]})", kind="echo", params={"c": big[0], "k": big[1]},
             field="peak_rss_kib", fmt="mib", better="low"),
    ] + ([] if not mode.idle_n else [
        dict(id="idle", title=f"KiB per idle conn (N={mode.idle_n})", kind="idle", params={"n": mode.idle_n},
             field="kib_per_conn", fmt="1f", better="low"),
    ])
    for n, r in mode.bcast:
        specs.append(dict(id=f"bcast{n}", title=f"broadcast 1->{n:,} deliveries/s", kind="bcast",
                          params={"n": n, "r": r}, field="deliveries_per_s", fmt="k", better="high"))
        specs.append(dict(id=f"bcast{n}_last", title=f"broadcast 1->{n:,} ms to last receiver", kind="bcast",
                          params={"n": n, "r": r}, field="last_ms_p50", fmt="1f", better="low"))
    return specs


def _fmt(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    if fmt == "k":
        return f"{v / 1000:.1f}k"
    if fmt == "int":
        return f"{v:,.0f}"
    if fmt == "mib":
        return f"{v / 1024:.1f}"
    if fmt == "2f":
        return f"{v:.2f}"
    return f"{v:.1f}"


def summarize(tasks: list[Task], mode: Mode, peers: list[str]) -> dict[str, Any]:
    """Median, spread, and the median ratio to tether measured in the same run."""
    out: dict[str, Any] = {}
    for t in tasks:  # derived figures
        r = t.result
        if r and t.kind == "echo" and r.get("server_cpu_s") and "rt_per_cpu_s" not in r:
            r["rt_per_cpu_s"] = r["msgs"] / r["server_cpu_s"]
    for spec in figure_specs(mode):
        rows: dict[str, Any] = {}
        for peer in peers:
            per_run: dict[int, float] = {}
            flagged = errors = foreign = 0
            for t in tasks:
                if t.peer != peer or t.kind != spec["kind"] or t.params != spec["params"]:
                    continue
                if t.error or not t.result or t.result.get(spec["field"]) is None:
                    errors += 1
                    continue
                per_run[t.run] = float(t.result[spec["field"]])
                if t.result.get("gen_cpu_frac", 0) > GEN_CPU_LIMIT:
                    flagged += 1
                if t.result.get("foreign_cpu_frac", 0) > FOREIGN_LIMIT:
                    foreign += 1
            if not per_run:
                if errors:
                    rows[peer] = {"error": True}
                continue
            vals = list(per_run.values())
            med = statistics.median(vals)
            ratios = []
            for t in tasks:
                if (t.peer == BASELINE and t.kind == spec["kind"] and t.params == spec["params"] and t.result
                        and t.run in per_run and t.result.get(spec["field"])):
                    ratios.append(per_run[t.run] / float(t.result[spec["field"]]))
            rows[peer] = {
                "median": med, "min": min(vals), "max": max(vals), "n": len(vals),
                "spread_pct": (max(vals) - min(vals)) / 2 / med * 100 if med else 0.0,
                "ratio": statistics.median(ratios) if ratios else None,
                "gen_bound": flagged, "errors": errors, "foreign": foreign,
            }
        out[spec["id"]] = {"spec": spec, "rows": rows}
    return out


def machine() -> dict[str, str]:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cores": str(os.cpu_count())}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    for name, cmd in [("go", ["go", "version"]), ("node", ["node", "--version"])]:
        with contextlib.suppress(Exception):
            info[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    with contextlib.suppress(OSError):
        info["os"] = "Debian " + open("/etc/debian_version").read().strip()
    from importlib import metadata

    versions = []
    for dist in ["picows", "msgspec", "uvloop", "websockets", "aiohttp", "starlette", "uvicorn", "python-socketio"]:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    with contextlib.suppress(Exception):
        versions.append("ws " + json.loads((BENCH / "node/node_modules/ws/package.json").read_text())["version"])
    info["packages"] = ", ".join(versions)
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/tether"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["tether"] = f"git {rev}" + (" + uncommitted changes in src/tether" if dirty else "")
    return info


def plot(summary: dict[str, Any], mode: Mode, peers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rps_ids = [s["id"] for s in figure_specs(mode) if s["id"].startswith("rps_")]
    fig, ax = plt.subplots(figsize=(13, 5.5))
    cmap = plt.get_cmap("tab20")
    width = 0.8 / max(1, len(peers))
    for i, peer in enumerate(peers):
        meds, lo, hi = [], [], []
        for fid in rps_ids:
            row = summary[fid]["rows"].get(peer, {})
            m = row.get("median") or 0.0
            meds.append(m / 1000)
            lo.append((m - row.get("min", m)) / 1000)
            hi.append((row.get("max", m) - m) / 1000)
        xs = [j + i * width for j in range(len(rps_ids))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=PEERS[peer].label, color=cmap(i % 20),
               hatch="//" if PEERS[peer].proto == "tcp" else None,
               edgecolor="black" if peer == BASELINE else None, linewidth=1.5 if peer == BASELINE else 0)
    ax.set_xticks([j + width * (len(peers) - 1) / 2 for j in range(len(rps_ids))])
    ax.set_xticklabels([summary[f]["spec"]["title"].replace("rt/s ", "") for f in rps_ids])
    ax.set_ylabel("round trips / s (thousands), median of runs; bars = min..max")
    ax.set_title("Typed JSON echo: server on one core, Go load generator on the other")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(summary: dict[str, Any], tasks: list[Task], mode: Mode, peers: list[str], info: dict[str, str],
           plot_name: str | None, command: str, started: str, elapsed: float) -> str:
    specs = figure_specs(mode)
    has_base = BASELINE in peers
    L: list[str] = []
    L.append("# Benchmarks\n")
    L.append("<!-- generated by bench/run.py: edit the generator, not this file (the section between the"
             " PROFILE markers is kept across runs) -->\n")
    L.append(f"Generated {started} in {elapsed / 60:.1f} min by:\n\n```sh\n{command}\n```\n")
    L.append(
        "The job: the tutorial's conversation, typed. The client sends "
        '`{"type":"echo","data":{"message":"hello server!","n":<int>}}`; the server decodes it, validates it '
        '(`message` a string, `n` an integer) and replies `{"type":"echo","data":{"message":"Thanks for the '
        'message!","n":<same>}}`. The load generator (`bench/loadgen`, Go, speaking RFC 6455 itself) checks '
        "every reply's `n`.\n"
    )
    L.append(
        f"Method: every figure is the median of {mode.runs} run(s); ± is half the min..max range as a % of "
        "the median. Every measurement starts a fresh server, pinned to core 0 with `taskset`; the generator "
        "is pinned to core 1. Peers are visited in a different order in every run. "
        f"Round trips/s: C connections, K messages in flight on each, {mode.warmup:g} s warm-up, "
        f"{mode.duration:g} s measured. Server CPU and peak RSS come from `/proc/PID`. Idle memory: RSS growth "
        f"of the server when {mode.idle_n:,} connections that each made one round trip sit idle, divided by "
        "the count (kernel socket buffers are not in it). Broadcast: N receivers connected, one sender sends "
        "a ~100-byte message the server sends to every connection; the next broadcast leaves when the last "
        "receiver has the previous one.\n"
    )
    if has_base:
        L.append("**×tether** columns: the peer's figure divided by tether's, measured in the same run "
                 "(median of the per-run ratios). For rates >1 means the peer is faster; for costs "
                 "(latency, CPU, memory) >1 means the peer uses more.\n")
    L.append("† = in at least one run the load generator used more than "
             f"{GEN_CPU_LIMIT:.0%} of its core: that figure is bounded by the generator, not the server. "
             f"‡ = in at least one run other processes on the machine used more than {FOREIGN_LIMIT:.0%} of a core "
             "during the measured window (noise).\n")

    def table(ids: list[str], with_ratio: bool) -> None:
        cols = [s for s in specs if s["id"] in ids]
        head = ["peer"]
        for s in cols:
            head.append(s["title"])
            if with_ratio and has_base:
                head.append("×tether")
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for peer in peers:
            if not any(peer in summary[s["id"]]["rows"] for s in cols):
                continue
            cells = [PEERS[peer].label]
            for s in cols:
                row = summary[s["id"]]["rows"].get(peer)
                if row is None:
                    cells.append("")
                elif row.get("error"):
                    cells.append("error")
                else:
                    txt = _fmt(row["median"], s["fmt"])
                    if row["n"] > 1:
                        txt += f" ±{row['spread_pct']:.0f}%"
                    if row["gen_bound"]:
                        txt += " †"
                    if row["foreign"]:
                        txt += " ‡"
                    if row["errors"]:
                        txt += f" ({row['errors']} failed)"
                    cells.append(txt)
                if with_ratio and has_base:
                    cells.append("" if row is None or row.get("ratio") is None else f"{row['ratio']:.2f}")
            L.append("| " + " | ".join(cells) + " |")
        L.append("")

    rps_ids = [s["id"] for s in specs if s["id"].startswith("rps_")]
    L.append("## Round trips per second\n")
    table(rps_ids, with_ratio=False)
    if has_base:
        L.append("Ratios to tether (same run):\n")
        L.append("| peer | " + " | ".join(s["title"] for s in specs if s["id"] in rps_ids) + " |")
        L.append("|---|" + "---|" * len(rps_ids))
        for peer in peers:
            cells = [PEERS[peer].label]
            for fid in rps_ids:
                row = summary[fid]["rows"].get(peer) or {}
                cells.append("" if row.get("ratio") is None else f"{row['ratio']:.2f}")
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    if plot_name:
        L.append(f"![round trips per second]({plot_name})\n")
    L.append("## Latency, CPU, memory\n")
    table(["per_core", "cpu", "p50", "p99"], with_ratio=True)
    table(["rss", "idle"], with_ratio=True)
    bc_ids = [s["id"] for s in specs if s["id"].startswith("bcast")]
    if bc_ids:
        L.append("## Broadcast\n")
        L.append("Peers with a broadcast mode: websockets `broadcast()`, Node ws (loop over `wss.clients`), "
                 "picows (loop of `transport.send`). tether's entry comes with the rooms feature.\n")
        table(bc_ids, with_ratio=has_base)

    # targets (reported, not asserted)
    if has_base and "rps_c50_k1" in summary:
        L.append("## Targets (reported, not asserted)\n")
        rows = summary["rps_c50_k1"]["rows"]
        base = rows.get(BASELINE, {}).get("median")

        def ratio_line(peer: str, target: float, text: str) -> None:
            r = rows.get(peer, {}).get("ratio")
            if r is None or not base:
                L.append(f"- {text}: not measured")
                return
            pc = summary.get("per_core", {}).get("rows", {}).get(peer, {}).get("ratio")
            extra = f" (per server CPU-second: {1 / pc:.2f}x)" if pc else ""
            L.append(f"- {text}: tether / {PEERS[peer].label} = **{1 / r:.2f}x**{extra} → "
                     f"{'met' if 1 / r >= target else 'not met'}")

        ratio_line("aiohttp", 1.5, "tether >= 1.5x aiohttp at C=50,K=1")
        ratio_line("websockets", 2.5, "tether >= 2.5x websockets at C=50,K=1")
        ratio_line("picows-json", 1.0, "tether >= 1.0x picows by hand (stdlib json) at C=50,K=1")
        # per core: round trips per server CPU second
        def per_core(peer: str) -> float | None:
            vals = [t.result["msgs"] / t.result["server_cpu_s"] for t in tasks
                    if t.peer == peer and t.kind == "echo" and t.params == {"c": 50, "k": 1} and t.result
                    and t.result.get("server_cpu_s")]
            return statistics.median(vals) if vals else None

        tp, gp = per_core(BASELINE), per_core("go-xnet")
        if tp and gp:
            L.append(f"- tether >= Go x/net per core (round trips per server CPU second, C=50,K=1): "
                     f"{tp:,.0f} vs {gp:,.0f} = **{tp / gp:.2f}x** → {'met' if tp >= gp else 'not met'}")
        idle = summary.get("idle", {}).get("rows", {}).get(BASELINE, {}).get("median")
        if idle is not None:
            L.append(f"- tether <= 12 KiB per idle connection: **{idle:.1f} KiB** → {'met' if idle <= 12 else 'not met'}")
        L.append("- broadcast 10k >= Node ws: not measured yet (tether's broadcast needs rooms)")
        L.append("")

    # flags and errors
    bound = [t for t in tasks if t.result and t.result.get("gen_cpu_frac", 0) > GEN_CPU_LIMIT]
    L.append("## Was the load generator the bottleneck?\n")
    L.append(f"The generator reports the CPU it used during the measured window (fraction of its core). "
             f"{len(bound)} of {sum(1 for t in tasks if t.result)} measurements went over {GEN_CPU_LIMIT:.0%}"
             + (":" if bound else "."))
    for t in bound:
        L.append(f"- {t.describe()}: {t.result['gen_cpu_frac']:.0%}")  # type: ignore[index]
    L.append("")
    noisy = [t for t in tasks if t.result and t.result.get("foreign_cpu_frac", 0) > FOREIGN_LIMIT]
    L.append(f"Other processes on the machine (CPU busy time minus server and generator, from `/proc/stat`) used "
             f"more than {FOREIGN_LIMIT:.0%} of a core in {len(noisy)} measurement(s)"
             + (": " + ", ".join(f"{t.describe()} ({t.result['foreign_cpu_frac']:.0%})" for t in noisy[:40])  # type: ignore[index]
                + (" ..." if len(noisy) > 40 else "") if noisy else "") + ".\n")
    failed = [t for t in tasks if t.error]
    if failed:
        L.append("Failed measurements:\n")
        for t in failed:
            L.append(f"- {t.describe()}: `{t.error}`")
        L.append("")
    notes = [p for p in peers if PEERS[p].note]
    L.append("## Peers\n")
    for p in peers:
        peer = PEERS[p]
        src = next((c for c in peer.cmd if c.endswith((".py", ".js"))), peer.cmd[0])
        src_rel = os.path.relpath(src, ROOT) if os.path.isabs(src) else src
        if src_rel.startswith("bench/.build/"):
            src_rel = "bench/go/" + src_rel.rsplit("go-", 1)[1] + "/main.go"
        L.append(f"- **{peer.label}** (`{src_rel}`){': ' + peer.note if peer.note else ''}")
    L.append("")
    L.append("## Machine\n")
    for k, v in info.items():
        L.append(f"- {k}: {v}")
    L.append("")
    return "\n".join(L)


PROFILE_BEGIN, PROFILE_END = "<!-- PROFILE BEGIN -->", "<!-- PROFILE END -->"


NOTES_BEGIN, NOTES_END = "<!-- NOTES BEGIN -->", "<!-- NOTES END -->"


def write_report(md_path: Path, text: str) -> None:
    """Write the generated report; hand-written NOTES and the PROFILE section survive reruns."""
    notes = kept = ""
    if md_path.exists():
        old = md_path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN): old.index(NOTES_END) + len(NOTES_END)]
        if PROFILE_BEGIN in old and PROFILE_END in old:
            kept = old[old.index(PROFILE_BEGIN): old.index(PROFILE_END) + len(PROFILE_END)]
    if notes:  # right after the command line
        head, sep, rest = text.partition("```\n\n")
        text = head + sep + notes + "\n\n" + rest if sep else text + "\n" + notes + "\n"
    if kept:
        text = text.rstrip() + "\n\n" + kept + "\n"
    md_path.write_text(text)


# ------------------------------------------------------------------ main


def report_only(raw_path: Path, md_path: Path) -> int:
    raw = json.loads(raw_path.read_text())
    mode = Mode(**{k: (list(map(tuple, v)) if k in ("echo_configs", "bcast") else v) for k, v in raw["mode"].items()})
    tasks = [Task(**{**t, "params": t["params"]}) for t in raw["tasks"]]
    peers = raw["peers"]
    summary = summarize(tasks, mode, peers)
    png = md_path.with_suffix(".png")
    plot(summary, mode, peers, png)
    command = "make bench" if not raw["quick"] else "python bench/run.py --quick"
    write_report(md_path, render(summary, tasks, mode, peers, raw["machine"], png.name, command, raw["started"],
                                 raw["elapsed_s"]))
    print(f"wrote {md_path} and {png} from {raw_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per peer (used by the tests)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated, default: all")
    ap.add_argument("--bcast-peers", default=None, help="default: every selected peer with a broadcast mode")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=BENCH / "results", help="raw JSON goes here")
    ap.add_argument("--md", type=Path, default=None, help="Markdown report (default: docs/benchmarks.md; "
                    "in quick mode OUT/benchmarks.md)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--configs", default=None, metavar="CxK,...", help="echo settings, e.g. 50x1,500x16")
    ap.add_argument("--no-idle", action="store_true", help="skip the idle-memory measurement")
    ap.add_argument("--no-bcast", action="store_true", help="skip broadcast")
    ap.add_argument("--report-only", type=Path, metavar="RAW_JSON",
                    help="no measuring: rewrite the report and plot from a raw results file")
    args = ap.parse_args(argv)
    if args.report_only:
        return report_only(args.report_only, args.md or ROOT / "docs" / "benchmarks.md")

    mode = QUICK if args.quick else FULL
    if args.runs:
        mode.runs = args.runs
    if args.configs:
        mode.echo_configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]  # type: ignore[misc]
    if args.no_bcast:
        mode.bcast = []
    if args.no_idle:
        mode.idle_n = 0
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    bcast_peers = ([p for p in args.bcast_peers.split(",") if p] if args.bcast_peers is not None
                   else [p for p in peers if PEERS[p].bcast])
    md_path = args.md or (args.out / "benchmarks.md" if args.quick else ROOT / "docs" / "benchmarks.md")
    args.out.mkdir(parents=True, exist_ok=True)
    nofile = _raise_nofile()
    need = max([mode.idle_n] + [n for n, _ in mode.bcast]) + 100
    if nofile < need:
        print(f"warning: open files limit {nofile} < {need}; large runs may fail", file=sys.stderr)
    if not shutil.which("taskset"):
        print("taskset not found (util-linux)", file=sys.stderr)
        return 2
    if not args.no_build:
        build(print if not args.quiet else (lambda s: None))

    tasks = plan(peers, bcast_peers, mode, args.seed)
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    progress = Progress(len(tasks), quiet=args.quiet)
    try:
        for task in tasks:
            progress.start(task)
            task.waited = wait_quiet(mode)
            execute(task, mode)
            progress.finish(task)
        # measurements disturbed by other jobs on the machine are taken once more; the cleaner one is kept
        noisy = [t for t in tasks if t.result and t.result.get("foreign_cpu_frac", 0) > FOREIGN_LIMIT]
        if noisy and not args.quick:
            progress.log(f"retrying {len(noisy)} measurement(s) disturbed by other processes")
            progress.total += len(noisy)
            if progress._rich is not None:
                progress._rich.update(progress._id, total=progress.total)
            retry_end = time.monotonic() + mode.retry_budget
            noisy.sort(key=lambda t: -t.result.get("foreign_cpu_frac", 0))  # type: ignore[union-attr]
            for task in noisy:
                if time.monotonic() > retry_end:
                    progress.log("retry budget spent")
                    break
                progress.start(task)
                old = task.result
                task.waited = wait_quiet(mode)
                execute(task, mode)
                if task.result is None or task.result.get("foreign_cpu_frac", 0) > old.get("foreign_cpu_frac", 0):  # type: ignore[union-attr]
                    task.result, task.error = old, None
                task.retried = True
                progress.finish(task)
    except KeyboardInterrupt:
        progress.log("interrupted: reporting what was measured")
    finally:
        progress.close()
    elapsed = time.monotonic() - t0

    summary = summarize(tasks, mode, peers)
    info = machine()
    raw = {
        "started": started, "elapsed_s": elapsed, "quick": args.quick, "machine": info, "peers": peers,
        "mode": mode.__dict__, "tasks": [t.__dict__ for t in tasks], "summary": summary,
    }
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (args.out / f"bench-{stamp}.json").write_text(json.dumps(raw, indent=1, default=str))
    (args.out / "latest.json").write_text(json.dumps(raw, indent=1, default=str))
    png = md_path.with_suffix(".png")
    plot_name: str | None = png.name
    try:
        plot(summary, mode, peers, png)
    except Exception as exc:  # matplotlib missing: the table still gets written
        print(f"plot skipped: {exc}", file=sys.stderr)
        plot_name = None
    command = "make bench" if not args.quick and argv is None and len(sys.argv) == 1 else \
        "python bench/run.py " + " ".join(argv or sys.argv[1:])
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_report(md_path, render(summary, tasks, mode, peers, info, plot_name, command, started, elapsed))
    if not args.quiet:
        print(f"wrote {md_path} and {png}; raw results in {args.out}")
    return 0 if all(t.result for t in tasks) else 1


if __name__ == "__main__":
    sys.exit(main())
