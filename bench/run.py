"""tether's benchmark runner: same job, same machine, same run, for every peer.

    python bench/run.py                 # full mode: what `make bench` runs
    python bench/run.py --quick --peers tether,picows-msgspec --out /tmp/b
    python bench/run.py --gen-cost      # the generator's own cost, old generator vs new, same servers

Every measurement starts a fresh server pinned to core 0 (taskset) and drives
it with the Go load generator (bench/loadgen) pinned to core 1. The generator
samples the server's CPU time (/proc/PID/stat utime+stime), its own
(getrusage) and the machine's (/proc/stat) at the edges of the measured
window, so the primary figures are per server CPU-second: round trips (or
deliveries) divided by the CPU the server used for them. Peers are
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
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from io import BytesIO
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
LOADGEN = BUILD / "loadgen"
PY = sys.executable
GOENV = {"GO111MODULE": "off", "GOPATH": "/usr/share/gocode"}
SERVER_CORE, LOADGEN_CORE = "0", "1"
PORTS = range(9110, 9200)
GEN_CPU_LIMIT = 0.85  # a run where the generator used more of its core is flagged †
FOREIGN_LIMIT = 0.15  # ... and one where other processes used more than this much of a core ‡
OLD_LOADGEN_REV = "035bba0"  # the goroutine/epoll generator this one replaced (for --gen-cost)
TETHER_SRC = ROOT / "src"  # --tether-src: benchmark another tree's tether (e.g. a worktree)


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    cmd: tuple[str, ...]  # "{port}" is substituted
    proto: str = "ws"  # ws | sio | tcp
    bcast: bool = False  # has the broadcast mode
    note: str = ""
    src: str = ""  # shown in the report; default: the script in cmd
    gen: tuple[str, ...] = ()  # extra load generator arguments (e.g. -session)


def _py(script: str, *args: str) -> tuple[str, ...]:
    return (PY, str(BENCH / "servers" / script), "{port}", *args)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in [
        Peer("tether", "tether", _py("tether_server.py"), bcast=True),
        Peer("tether-resume", "tether, resume on", _py("tether_server.py"), bcast=True, gen=("-session",),
             note="the same server; the generator offers a session (`Sec-WebSocket-Protocol: tether, session`, as "
                  "tether.js and tether.Client do): replies are numbered and kept until acked, requests carry "
                  "seq and ack (`-session`, bench/loadgen/session.go)"),
        Peer("tether-metrics", "tether, metrics on", _py("tether_server.py", "--metrics"), bcast=True,
             note="the same server with `metrics=True` (Prometheus metrics kept on the message path)"),
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
        Peer("go-xnet", "Go x/net/websocket (tutorial)", (str(BUILD / "go-xnet"), "{port}"), bcast=True,
             src="bench/go/xnet/main.go"),
        Peer("go-gorilla", "Go gorilla/websocket", (str(BUILD / "go-gorilla"), "{port}"), bcast=True,
             src="bench/go/gorilla/main.go"),
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
        Peer(
            "floor",
            "trivial Go epoll echo (floor)",
            (str(LOADGEN), "-mode=serve", "-addr=127.0.0.1:{port}", "-hold=30m"),
            note="the generator's own `-mode=serve`: WebSocket framing, no JSON (a canned reply with n copied "
                 "in), one read and one write per wake-up; what any server costs at least on this machine",
            src="bench/loadgen/serve.go",
        ),
    ]
}
BASELINE = "tether"
FEATURES = ("tether-resume", "tether-metrics")  # tether with one feature on: the cost of each, same run


@dataclass
class Mode:
    runs: int
    warmup: float
    duration: float
    echo_configs: list[tuple[int, int]]
    idle_n: int
    bcast: list[int]  # receiver counts
    bcast_inflight: int = 8
    bcast_lat: int = 30  # broadcasts sent one at a time after the throughput phase (fan-out time)
    server_start_timeout: float = 15.0
    quiet_wait: float = 20.0  # before each measurement, wait up to this long for the machine to be idle
    quiet_budget: float = 420.0  # ... and at most this long in total
    retry_budget: float = 420.0  # time for re-taking measurements disturbed by other processes


FULL = Mode(
    runs=3,
    warmup=1.0,
    duration=3.0,
    echo_configs=[(50, 1), (500, 1), (50, 16)],
    idle_n=5000,
    bcast=[1000, 10000],
)
QUICK = Mode(runs=1, warmup=0.3, duration=0.7, echo_configs=[(50, 1)], idle_n=200, bcast=[100], bcast_lat=5,
             quiet_wait=1.0)


# ------------------------------------------------------------------ building


def _go_build(srcdir: Path, target: Path, log: Callable[[str], None]) -> None:
    newest = max(f.stat().st_mtime for f in srcdir.glob("*.go"))
    if not target.exists() or target.stat().st_mtime < newest:
        log(f"building {target.name}")
        subprocess.run(["go", "build", "-o", str(target), "."], cwd=srcdir, env={**os.environ, **GOENV}, check=True)


def build(log: Callable[[str], None] = print) -> None:
    """Build the Go binaries and install Node's ws if they are missing or stale."""
    BUILD.mkdir(exist_ok=True)
    for out, src in [("loadgen", "loadgen"), ("go-xnet", "go/xnet"), ("go-gorilla", "go/gorilla")]:
        _go_build(BENCH / src, BUILD / out, log)
    if not (BENCH / "node" / "node_modules" / "ws").exists():
        log("npm ci (ws)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH / "node", check=True)


def build_old_loadgen(rev: str, log: Callable[[str], None] = print) -> Path:
    """The generator as it was at git revision rev, built into bench/.build/loadgen-REV."""
    target = BUILD / f"loadgen-{rev}"
    if target.exists():
        return target
    src = BUILD / f"loadgen-src-{rev}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    tar = subprocess.run(["git", "archive", rev, "bench/loadgen"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as tf:
        tf.extractall(src)
    log(f"building the generator of {rev}")
    _go_build(src / "bench" / "loadgen", target, log)
    return target


# ------------------------------------------------------------------ processes


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields_ = f.read().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def _system_busy() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores; steal not counted)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


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
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TETHER_SRC), os.environ.get("PYTHONPATH", "")])}
        BUILD.mkdir(exist_ok=True)
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

    def __init__(self, args: list[str], on_event: Callable[[str], None], stdin: bool = False,
                 binary: Path | None = None):
        cmd = ["taskset", "-c", LOADGEN_CORE, str(binary or LOADGEN), *args]
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


class Marks:
    """The runner's own samples of the server's CPU at the generator's events: a cross-check of the
    generator's -server-pid figures, and the only server figures for a generator without them."""

    def __init__(self, srv: Server):
        self.srv, self.v = srv, {}

    def __call__(self, name: str) -> None:
        if name in ("measure_start", "measure_end"):
            with contextlib.suppress(OSError):
                self.v[name] = (time.monotonic(), self.srv.cpu(), _system_busy())

    def window(self) -> tuple[float, float, float] | None:
        if "measure_start" not in self.v or "measure_end" not in self.v:
            return None
        (t0, c0, b0), (t1, c1, b1) = self.v["measure_start"], self.v["measure_end"]
        return t1 - t0, c1 - c0, b1 - b0


def _per_cpu(res: dict[str, Any], marks: Marks, count_key: str, unit: str) -> None:
    """Per server CPU-second figures; the runner's samples fill in when the generator had none."""
    w = marks.window()
    if w:
        res["server_cpu_s_runner"] = w[1]
    if res.get("server_cpu_s") is None and w:  # an older generator: the runner's samples
        secs = res.get("secs") or w[0]
        res["server_cpu_s"], res["server_cpu_frac"] = w[1], w[1] / secs
        res["foreign_cpu_frac"] = max(0.0, w[2] - w[1] - res.get("gen_cpu_s", 0.0)) / secs
    n, cpu = res.get(count_key) or 0, res.get("server_cpu_s") or 0.0
    if n and cpu > 0:
        res[f"{unit}_per_server_cpu_s"] = n / cpu
        res[f"server_us_per_{unit}"] = cpu / n * 1e6
    if n and res.get("gen_cpu_s") is not None:
        res[f"gen_us_per_{unit}"] = res["gen_cpu_s"] / n * 1e6


def measure_echo(peer: Peer, c: int, k: int, mode: Mode, binary: Path | None = None) -> dict[str, Any]:
    srv = Server(peer, mode.server_start_timeout)
    try:
        marks = Marks(srv)
        args = [
            "-mode=echo", f"-proto={peer.proto}", f"-addr=127.0.0.1:{srv.port}",
            f"-c={c}", f"-k={k}", f"-warmup={mode.warmup}s", f"-duration={mode.duration}s", *peer.gen,
        ]
        if binary is None:
            args.append(f"-server-pid={srv.pid}")
        gen = Loadgen(args, marks, binary=binary)
        res = gen.wait(mode.warmup + mode.duration + 60 + c * 0.05)
        if "error" in res:
            raise RuntimeError(f"loadgen: {res['error']}")
        _per_cpu(res, marks, "msgs", "rt")
        res["cpu_s_per_100k"] = res["server_cpu_s"] / res["msgs"] * 1e5 if res.get("msgs") else None
        res["peak_rss_kib"] = srv.hwm_kib()
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
             "-warmup=0.1s", "-duration=0.3s", *peer.gen],
            lambda e: None,
        )
        warm.wait(30)
        time.sleep(0.3)
        before = srv.rss_kib()
        holding = threading.Event()
        gen = Loadgen(
            ["-mode=idle", f"-proto={peer.proto}", f"-addr=127.0.0.1:{srv.port}", f"-n={n}", "-hold=60s",
             "-timeout=30s", *peer.gen],
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


def measure_bcast(peer: Peer, n: int, mode: Mode) -> dict[str, Any]:
    srv = Server(peer, mode.server_start_timeout)
    try:
        marks = Marks(srv)
        gen = Loadgen(
            ["-mode=bcast", f"-proto={peer.proto}", f"-addr=127.0.0.1:{srv.port}", f"-n={n}",
             f"-inflight={mode.bcast_inflight}", f"-lat={mode.bcast_lat}", f"-warmup={mode.warmup}s",
             f"-duration={mode.duration}s", "-timeout=20s", f"-server-pid={srv.pid}", *peer.gen],
            marks,
        )
        res = gen.wait(mode.warmup + mode.duration + 60 + n * 0.01)
        if "error" in res:
            raise RuntimeError(f"loadgen: {res['error']}")
        _per_cpu(res, marks, "delivered", "delivery")
        res["deliveries_per_server_cpu_s"] = res.pop("delivery_per_server_cpu_s", None) or res.get(
            "deliveries_per_server_cpu_s")
        if not srv.alive():
            raise RuntimeError(f"server died: {srv.tail()}")
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
        for n in mode.bcast:
            tasks += [Task(run, "bcast", p, {"n": n}) for p in order if p in bcast_peers]
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
            task.result = measure_bcast(peer, task.params["n"], mode)
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
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
                from rich.progress import Progress as RP

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
            self._rich.console.print(msg, highlight=False)
        else:
            print(msg, flush=True)

    def grow(self, n: int) -> None:
        self.total += n
        if self._rich is not None:
            self._rich.update(self._id, total=self.total)

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
            line = (f"  {task.describe()}: {r.get('rt_per_server_cpu_s', 0):,.0f} rt per server CPU-s, "
                    f"{r['rps']:,.0f} rt/s (server {r.get('server_cpu_frac', 0):.0%} of its core), "
                    f"p50 {r['p50_us']:.0f}us p99 {r['p99_us']:.0f}us, "
                    f"generator {r.get('gen_us_per_rt', 0):.2f} us/rt ({r['gen_cpu_frac']:.0%})")
        elif task.kind == "idle":
            line = f"  {task.describe()}: {r['kib_per_conn']:.1f} KiB/conn"
        else:
            line = (f"  {task.describe()}: {r.get('deliveries_per_server_cpu_s') or 0:,.0f} deliveries per server "
                    f"CPU-s, {r['deliveries_per_s']:,.0f}/s, all receivers p50 {r['last_ms_p50']:.1f} ms "
                    f"p99 {r['last_ms_p99']:.1f} ms, generator {r.get('gen_us_per_delivery', 0):.2f} us/delivery "
                    f"({r['gen_cpu_frac']:.0%})")
        if r.get("gen_cpu_frac", 0) > GEN_CPU_LIMIT:
            line += f"  [†: generator over {GEN_CPU_LIMIT:.0%} of its core]"
        if r.get("foreign_cpu_frac", 0) > FOREIGN_LIMIT:
            line += f"  [‡: other processes {r['foreign_cpu_frac']:.0%} of a core]"
        self.log(line)
        if self._rich is not None:
            self._rich.advance(self._id)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------ report


def _cfg(c: int, k: int) -> str:
    return f"c{c}_k{k}"


def figure_specs(mode: Mode) -> list[dict[str, Any]]:
    """Every figure of the report: id, title, which task and result field, format, better high/low.
    ratio=False: no ×tether (the generator's own figures)."""
    specs: list[dict[str, Any]] = []
    for c, k in mode.echo_configs:
        p, s = {"c": c, "k": k}, _cfg(c, k)
        specs += [
            dict(id=f"cpu_{s}", title="rt per server CPU-s", field="rt_per_server_cpu_s", fmt="k", better="high"),
            dict(id=f"srvus_{s}", title="server µs/rt", field="server_us_per_rt", fmt="2f", better="low",
                 ratio=False),  # the reciprocal of the first column: no second ratio
            dict(id=f"rps_{s}", title="rt/s", field="rps", fmt="k", better="high"),
            dict(id=f"p50_{s}", title="p50 µs", field="p50_us", fmt="int", better="low", ratio=False),
            dict(id=f"p99_{s}", title="p99 µs", field="p99_us", fmt="int", better="low", ratio=False),
            dict(id=f"srvcore_{s}", title="server core", field="server_cpu_frac", fmt="pct", better="high",
                 ratio=False),
            dict(id=f"genus_{s}", title="generator µs/rt", field="gen_us_per_rt", fmt="2f", better="low",
                 ratio=False),
            dict(id=f"gencore_{s}", title="generator core", field="gen_cpu_frac", fmt="pct", better="low",
                 ratio=False),
        ]
        for sp in specs[-8:]:
            sp.update(kind="echo", params=p, group=f"C={c:,} K={k}")
    if mode.echo_configs:
        big = max(mode.echo_configs, key=lambda ck: ck[0] * ck[1])
        specs.append(dict(id="rss", title=f"peak RSS MiB (C={big[0]},K={big[1]})", kind="echo",
                          params={"c": big[0], "k": big[1]}, field="peak_rss_kib", fmt="mib", better="low",
                          group="memory"))
    if mode.idle_n:
        specs.append(dict(id="idle", title=f"KiB per idle conn (N={mode.idle_n:,})", kind="idle",
                          params={"n": mode.idle_n}, field="kib_per_conn", fmt="1f", better="low", group="memory"))
    for n in mode.bcast:
        p = {"n": n}
        grp = f"broadcast 1 -> {n:,}"
        specs += [
            dict(id=f"bcpu{n}", title="deliveries per server CPU-s", field="deliveries_per_server_cpu_s", fmt="k",
                 better="high"),
            dict(id=f"bcast{n}", title=f"deliveries/s ({mode.bcast_inflight} in flight)", field="deliveries_per_s",
                 fmt="k", better="high"),
            dict(id=f"blast50_{n}", title="ms to all receivers p50", field="last_ms_p50", fmt="1f", better="low"),
            dict(id=f"blast99_{n}", title="p99", field="last_ms_p99", fmt="1f", better="low"),
            dict(id=f"bfirst_{n}", title="ms to the first p50", field="first_ms_p50", fmt="2f", better="low",
                 ratio=False),
            dict(id=f"bgenus{n}", title="generator µs/delivery", field="gen_us_per_delivery", fmt="2f",
                 better="low", ratio=False),
        ]
        for sp in specs[-6:]:
            sp.update(kind="bcast", params=p, group=grp)
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
    if fmt == "pct":
        return f"{v:.0%}"
    return f"{v:.1f}"


def summarize(tasks: list[Task], mode: Mode, peers: list[str]) -> dict[str, Any]:
    """Median, spread, and the median ratio to tether measured in the same run."""
    out: dict[str, Any] = {}
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
        if TETHER_SRC != ROOT / "src":
            info["tether"] = f"from {TETHER_SRC} (--tether-src)"
    return info


def plot(summary: dict[str, Any], mode: Mode, peers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[str], str]] = []
    cfgs = [_cfg(c, k) for c, k in mode.echo_configs]
    if cfgs:
        panels.append(("Round trips per server CPU-second (the primary figure)", [f"cpu_{s}" for s in cfgs],
                       "round trips per server CPU-s (thousands)"))
        panels.append(("Round trips per second", [f"rps_{s}" for s in cfgs], "round trips / s (thousands)"))
    if mode.bcast:
        panels.append(("Broadcast: deliveries per server CPU-second", [f"bcpu{n}" for n in mode.bcast],
                       "deliveries per server CPU-s (thousands)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4.2 * len(panels)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, (title, ids, ylabel) in zip(axes[:, 0], panels, strict=True):
        shown = [p for p in peers if any(summary.get(f, {}).get("rows", {}).get(p, {}).get("median") for f in ids)]
        width = 0.8 / max(1, len(shown))
        for i, peer in enumerate(shown):
            meds, lo, hi = [], [], []
            for fid in ids:
                row = summary[fid]["rows"].get(peer, {})
                m = row.get("median") or 0.0
                meds.append(m / 1000)
                lo.append((m - row.get("min", m)) / 1000)
                hi.append((row.get("max", m) - m) / 1000)
            xs = [j + i * width for j in range(len(ids))]
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=PEERS[peer].label,
                   color=cmap(peers.index(peer) % 20),
                   hatch="//" if PEERS[peer].proto == "tcp" or peer == "floor" else None,
                   edgecolor="black" if peer == BASELINE else None, linewidth=1.5 if peer == BASELINE else 0)
        ax.set_xticks([j + width * (len(shown) - 1) / 2 for j in range(len(ids))])
        ax.set_xticklabels([summary[f]["spec"]["group"] for f in ids])
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Typed JSON echo and broadcast: server on one core, the epoll load generator on the other; "
                 "median of runs, bars = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _gen_cost_lines(tasks: list[Task], mode: Mode) -> list[str]:
    """The generator's cost beside the server's, measurement by measurement: it must stay below, so that
    the server's core fills first (the floor apart: it does what the generator does)."""
    L: list[str] = []
    settings = [("echo", {"c": c, "k": k}, f"echo C={c:,} K={k}", "rt") for c, k in mode.echo_configs]
    settings += [("bcast", {"n": n}, f"broadcast 1 -> {n:,}", "delivery") for n in mode.bcast]
    rows = []
    for kind, params, name, unit in settings:
        done = [t for t in tasks if t.kind == kind and t.params == params and t.result
                and t.result.get(f"gen_us_per_{unit}") and t.result.get(f"server_us_per_{unit}")]
        real = [t for t in done if t.peer != "floor"]
        if not real:
            continue

        def ratio(t: Task, unit: str = unit) -> float:
            return t.result[f"gen_us_per_{unit}"] / t.result[f"server_us_per_{unit}"]  # type: ignore[index]

        worst = max(real, key=ratio)
        busiest = max(real, key=lambda t: t.result["gen_cpu_frac"])  # type: ignore[index]
        gens = [t.result[f"gen_us_per_{unit}"] for t in real]  # type: ignore[index]
        floor = [t for t in done if t.peer == "floor"]
        rows.append((name, unit, gens, statistics.median(ratio(t) for t in real), worst, ratio(worst), busiest,
                     floor))
    if not rows:
        return L
    L.append("| setting | generator µs per message, median (min..max) | generator ÷ server, median | ... highest "
             "(server) | generator's busiest core (server) | the floor: generator / floor µs |")
    L.append("|---|---|---|---|---|---|")
    for name, unit, gens, med, worst, wr, busiest, floor in rows:
        fl = floor[0].result if floor else None
        L.append(f"| {name} | {statistics.median(gens):.2f} ({min(gens):.2f}..{max(gens):.2f}) per {unit} | "
                 f"{med:.2f} | {wr:.2f} ({PEERS[worst.peer].label}, run {worst.run + 1}) | "
                 f"{busiest.result['gen_cpu_frac']:.0%} ({PEERS[busiest.peer].label}) | "  # type: ignore[index]
                 + (f"{fl[f'gen_us_per_{unit}']:.2f} / {fl[f'server_us_per_{unit}']:.2f}" if fl else "-") + " |")
    L.append("")
    over = [t for t in tasks if t.peer != "floor" and t.result and any(
        t.result.get(f"gen_us_per_{u}") and t.result.get(f"server_us_per_{u}")
        and t.result[f"gen_us_per_{u}"] >= t.result[f"server_us_per_{u}"] for u in ("rt", "delivery"))]
    if over:
        L.append("The generator cost as much as the server or more per message in: "
                 + ", ".join(t.describe() for t in over) + " (those servers' figures may be bounded by it).\n")
    else:
        L.append("Below 1 in every measurement: the generator cost less per message than the server it drove, "
                 "so the server's core fills before the generator's.\n")
    L.append("At low rates the generator's µs per message is mostly its polling tick (an empty poll sleeps 100 µs; "
             "a sleep and wake-up costs ~5 µs of CPU on this VM), not work.\n")
    return L


def _feature_lines(summary: dict[str, Any], mode: Mode, peers: list[str]) -> list[str]:
    """tether with each feature on against tether with it off, measured in the same runs: the cost per
    message (server CPU) and per idle connection (memory)."""
    shown = [p for p in FEATURES if p in peers]
    if BASELINE not in peers or not shown:
        return []
    cols: list[tuple[str, str, bool]] = [(f"cpu_{_cfg(c, k)}", f"C={c:,} K={k}", True) for c, k in mode.echo_configs]
    cols += [(f"bcpu{n}", f"broadcast 1 -> {n:,}", True) for n in mode.bcast]
    if mode.idle_n:
        cols.append(("idle", "idle memory", False))
    L = ["## tether's features, on and off\n",
         "Each feature's cost on these workloads: tether with it on against tether with it off (the `tether` rows "
         "above), same runs, median of the per-run ratios. For the message workloads the figure is the server CPU "
         "per message (round trip or delivery) with the feature on, as a change from off (the reciprocal of the "
         "per server CPU-second ratio); for idle memory, the change in KiB per connection.\n"]
    L.append("| feature | " + " | ".join(name for _, name, _ in cols) + " |")
    L.append("|---|" + "---|" * len(cols))
    for peer in shown:
        cells = []
        for fid, _, rate in cols:
            row = summary.get(fid, {}).get("rows", {}).get(peer) or {}
            r = row.get("ratio")
            if r is None:
                cells.append("-")
            elif rate:
                cells.append(f"{1 / r - 1:+.0%} CPU per message")
            else:
                base = summary[fid]["rows"].get(BASELINE, {}).get("median")
                cells.append(f"{row['median'] - base:+.1f} KiB ({r - 1:+.0%})" if base else f"{r - 1:+.0%}")
        L.append(f"| {PEERS[peer].label} | " + " | ".join(cells) + " |")
    L.append("")
    for peer in shown:
        L.append(f"- **{PEERS[peer].label}**: {PEERS[peer].note}")
    L.append("")
    return L


def render(summary: dict[str, Any], tasks: list[Task], mode: Mode, peers: list[str], info: dict[str, str],
           plot_name: str | None, command: str, started: str, elapsed: float) -> str:
    specs = figure_specs(mode)
    has_base = BASELINE in peers
    L: list[str] = []
    L.append("# Benchmarks\n")
    L.append("<!-- generated by bench/run.py: edit the generator, not this file (the sections between the"
             " NOTES and the PROFILE markers are kept across runs) -->\n")
    L.append(f"Generated {started} in {elapsed / 60:.1f} min by:\n\n```sh\n{command}\n```\n")
    L.append(
        "The job: the tutorial's conversation, typed. The client sends "
        '`{"type":"echo","data":{"message":"hello server!","n":<int>}}`; the server decodes it, validates it '
        '(`message` a string, `n` an integer) and replies `{"type":"echo","data":{"message":"Thanks for the '
        'message!","n":<same>}}`. The load generator (`bench/loadgen`, Go, one epoll thread speaking RFC 6455 '
        "itself) checks every reply: the first of each connection in full (JSON decoded: type, message, n), "
        "the others byte for byte against it with the expected n; a server that sends one wrong reply fails "
        "the measurement.\n"
    )
    L.append(
        f"Method: every figure is the median of {mode.runs} run(s); ± is half the min..max range as a % of "
        "the median. Every measurement starts a fresh server, pinned to core 0 with `taskset`; the generator "
        "is pinned to core 1. Peers are visited in a different order in every run. "
        f"Echo: C connections, K requests in flight on each, {mode.warmup:g} s warm-up, {mode.duration:g} s "
        "measured. **The primary figure is per server CPU-second**: round trips (deliveries) in the window "
        "divided by the CPU time the server process used in it (`/proc/PID/stat` utime+stime, sampled by the "
        "generator at the window's edges; 10 ms resolution). It does not depend on whether the server's core "
        "was saturated, so it ranks servers even where the generator or the latency of K=1 limits rt/s. "
        "Broadcast: N receivers and one sender; the sender keeps "
        f"{mode.bcast_inflight} broadcasts (~100-byte messages) in flight, each one complete when every "
        f"receiver has it; then {mode.bcast_lat} broadcasts one at a time give the time from the write to the "
        "last receiver's read (p50/p99). Idle memory: RSS growth of the server when "
        f"{mode.idle_n:,} connections that each made one round trip sit idle, divided by the count (kernel "
        "socket buffers are not in it).\n"
    )
    if has_base:
        L.append("**×tether** columns: the peer's figure divided by tether's, measured in the same run "
                 "(median of the per-run ratios). For rates >1 means the peer is faster; for costs "
                 "(µs, ms, memory) >1 means the peer uses more.\n")
    L.append(f"† = in at least one run the load generator used more than {GEN_CPU_LIMIT:.0%} of its core (its "
             "µs per message is beside every figure). ‡ = in at least one run other processes on the machine "
             f"used more than {FOREIGN_LIMIT:.0%} of a core during the measured window (noise).\n")

    def cell(row: dict[str, Any] | None, fmt: str) -> str:
        if row is None:
            return ""
        if row.get("error"):
            return "error"
        txt = _fmt(row["median"], fmt)
        if row["n"] > 1 and fmt not in ("pct",):
            txt += f" ±{row['spread_pct']:.0f}%"
        if row["errors"]:
            txt += f" ({row['errors']} failed)"
        return txt

    def table(cols: list[dict[str, Any]], flags: bool = True) -> None:
        """One row per peer; † and ‡ (the same for every column of a group: the same measurements) go
        next to the peer's name."""
        head = ["peer"]
        for s in cols:
            head.append(s["title"])
            if s.get("ratio", True) and has_base:
                head.append("×tether")
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for peer in peers:
            if not any(peer in summary[s["id"]]["rows"] for s in cols):
                continue
            name = f"**{PEERS[peer].label}**" if peer == BASELINE else PEERS[peer].label
            rows = [summary[s["id"]]["rows"].get(peer) or {} for s in cols]
            if flags and any(r.get("gen_bound") for r in rows):
                name += " †"
            if flags and any(r.get("foreign") for r in rows):
                name += " ‡"
            cells = [name]
            for s in cols:
                row = summary[s["id"]]["rows"].get(peer)
                cells.append(cell(row, s["fmt"]))
                if s.get("ratio", True) and has_base:
                    cells.append("" if row is None or row.get("ratio") is None else f"{row['ratio']:.2f}")
            L.append("| " + " | ".join(cells) + " |")
        L.append("")

    groups: dict[str, list[dict[str, Any]]] = {}
    for s in specs:
        groups.setdefault(s["group"], []).append(s)
    L.append("## Round trips\n")
    for c, k in mode.echo_configs:
        L.append(f"### C={c:,} K={k}\n")
        table(groups[f"C={c:,} K={k}"])
    if plot_name:
        L.append(f"![per server CPU-second and per second]({plot_name})\n")
    if mode.bcast:
        L.append("## Broadcast\n")
        L.append("Peers with a broadcast mode: tether `app.broadcast` (a room: encoded once; picows adds each header), picows "
                 "(a loop of `transport.send`), websockets `broadcast()`, Node ws (a loop over `wss.clients`), Go "
                 "x/net (encoded once, `websocket.Message.Send` per connection), gorilla (one `PreparedMessage`). "
                 "The sender gets its own broadcast too where the server sends it; it is not counted.\n")
        for n in mode.bcast:
            L.append(f"### 1 -> {n:,} receivers\n")
            table(groups[f"broadcast 1 -> {n:,}"])
    if "memory" in groups:
        L.append("## Memory\n")
        table(groups["memory"], flags=False)
    L += _feature_lines(summary, mode, peers)

    # targets (reported, not asserted)
    def med(fid: str, peer: str) -> float | None:
        return summary.get(fid, {}).get("rows", {}).get(peer, {}).get("median")

    def ratio(fid: str, peer: str) -> float | None:
        return summary.get(fid, {}).get("rows", {}).get(peer, {}).get("ratio")

    if has_base:
        L.append("## Targets (reported, not asserted)\n")
        L.append("Same-run ratios (median of the per-run ratios), tether / peer; per server CPU-second unless "
                 "said otherwise.\n")
        main_ck = (50, 1) if (50, 1) in mode.echo_configs else (mode.echo_configs[0] if mode.echo_configs else None)
        main = _cfg(*main_ck) if main_ck else ""
        where = f"C={main_ck[0]:,} K={main_ck[1]}" if main_ck else ""

        def target(fid: str, peer: str, want: float, text: str, higher: bool = True) -> None:
            r = ratio(fid, peer)
            if r is None:
                L.append(f"- {text}: not measured")
                return
            v = 1 / r if higher else r  # tether / peer for rates; peer / tether flipped for costs
            L.append(f"- {text}: **{v:.2f}x** → {'met' if v >= want else 'not met'}")

        if main:
            target(f"cpu_{main}", "go-xnet", 1.0, f"tether >= 1.0x Go x/net (tutorial), rt per server CPU-s, {where}")
            target(f"cpu_{main}", "aiohttp", 1.5, f"tether >= 1.5x aiohttp, {where}")
            target(f"cpu_{main}", "websockets", 2.5, f"tether >= 2.5x websockets, {where}")
            target(f"cpu_{main}", "picows-json", 1.0, f"tether >= 1.0x picows by hand (stdlib json), {where}")
            target(f"rps_{main}", "go-xnet", 1.0, f"tether >= 1.0x Go x/net, rt/s (not per CPU), {where}")
        for n in mode.bcast:
            for peer in ("picows-json", "picows-msgspec", "go-xnet"):
                target(f"bcast{n}", peer, 1.0, f"broadcast 1 -> {n:,}: tether >= 1.0x {PEERS[peer].label}, "
                       "deliveries/s")
                pc = ratio(f"bcpu{n}", peer)
                if pc and L[-1].endswith(("→ met", "→ not met")):
                    L[-1] += f" (per server CPU-s: {1 / pc:.2f}x)"
                r = ratio(f"blast50_{n}", peer)
                r99 = ratio(f"blast99_{n}", peer)
                if r is not None and r99 is not None:
                    # ratio = peer / tether for a cost: >= 1 means tether is no slower
                    ok = r >= 1.0 and r99 >= 1.0
                    L.append(f"- broadcast 1 -> {n:,}: time to all receivers no worse than {PEERS[peer].label}: "
                             f"p50 {PEERS[peer].label} / tether = **{r:.2f}x**, p99 **{r99:.2f}x** → "
                             f"{'met' if ok else 'not met'}")
        idle, node = med("idle", BASELINE), med("idle", "node-ws")
        if idle is not None:
            L.append(f"- idle memory at or under Node ws: tether **{idle:.1f} KiB** per connection"
                     + (f", Node ws {node:.1f} KiB" if node is not None else "")
                     + f" → {'met' if node is not None and idle <= node else 'not met' if node is not None else 'Node ws not measured'}")
        L.append("")

    # the generator
    bound = [t for t in tasks if t.result and t.result.get("gen_cpu_frac", 0) > GEN_CPU_LIMIT]
    L.append("## The load generator's cost\n")
    L.append("The generator reports the CPU it used in the measured window; per message it must stay below the "
             "server's it drives, so that the server's core fills first. `make bench-selftest` measures it against "
             "the trivial server, `make bench-gencost` against chosen peers, the generator it replaced beside it "
             "in the same run (bench/README.md).\n")
    L += _gen_cost_lines(tasks, mode)
    L.append(f"{len(bound)} of {sum(1 for t in tasks if t.result)} measurements had the generator over "
             f"{GEN_CPU_LIMIT:.0%} of its core" + (":" if bound else "."))
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
    L.append("## Peers\n")
    for p in peers:
        peer = PEERS[p]
        src = peer.src or next((c for c in peer.cmd if c.endswith((".py", ".js"))), peer.cmd[0])
        src_rel = os.path.relpath(src, ROOT) if os.path.isabs(src) else src
        L.append(f"- **{peer.label}** (`{src_rel}`){': ' + peer.note if peer.note else ''}")
    L.append("")
    L.append("## Machine\n")
    for k, v in info.items():
        L.append(f"- {k}: {v}")
    L.append("")
    return "\n".join(L)


PROFILE_BEGIN, PROFILE_END = "<!-- PROFILE BEGIN -->", "<!-- PROFILE END -->"


NOTES_BEGIN, NOTES_END = "<!-- NOTES BEGIN -->", "<!-- NOTES END -->"
SOAK_BEGIN, SOAK_END = "<!-- SOAK BEGIN -->", "<!-- SOAK END -->"  # bench/soak.py's section
WORKERS_BEGIN, WORKERS_END = "<!-- WORKERS BEGIN -->", "<!-- WORKERS END -->"  # bench/workers.py's section


def replace_section(md: Path, begin: str, end: str, section: str) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) in place of the one
    between those markers in ``md``, or at its end (bench/soak.py, bench/workers.py)."""
    text = md.read_text() if md.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    md.write_text(text)


def write_report(md_path: Path, text: str) -> None:
    """Write the generated report; hand-written NOTES, the PROFILE section, the SOAK section
    (bench/soak.py, make soak) and the WORKERS section (bench/workers.py) survive reruns."""
    notes = ""
    kept: list[str] = []
    if md_path.exists():
        old = md_path.read_text()
        if NOTES_BEGIN in old and NOTES_END in old:
            notes = old[old.index(NOTES_BEGIN): old.index(NOTES_END) + len(NOTES_END)]
        for begin, end in ((PROFILE_BEGIN, PROFILE_END), (SOAK_BEGIN, SOAK_END), (WORKERS_BEGIN, WORKERS_END)):
            if begin in old and end in old:
                kept.append(old[old.index(begin): old.index(end) + len(end)])
    if notes:  # right after the command line
        head, sep, rest = text.partition("```\n\n")
        text = head + sep + notes + "\n\n" + rest if sep else text + "\n" + notes + "\n"
    for section in kept:
        text = text.rstrip() + "\n\n" + section + "\n"
    md_path.write_text(text)


# ------------------------------------------------------------------ the generator's cost


def gen_cost(peers: list[str], configs: list[tuple[int, int]], runs: int, old_rev: str, warmup: float,
             duration: float, out: Path, quiet_wait: float) -> int:
    """Old generator vs new against the same servers, interleaved; prints a Markdown table."""
    old = build_old_loadgen(old_rev)
    mode = Mode(runs=runs, warmup=warmup, duration=duration, echo_configs=configs, idle_n=0, bcast=[],
                quiet_wait=quiet_wait)
    rows: list[dict[str, Any]] = []
    gens = [("new", None), (f"old ({old_rev})", old)]
    for run in range(runs):
        for c, k in configs:
            for peer in peers:
                for name, binary in (gens if run % 2 == 0 else gens[::-1]):
                    _wait_quiet(quiet_wait)
                    try:
                        r = measure_echo(PEERS[peer], c, k, mode, binary=binary)
                    except Exception as exc:
                        print(f"{peer} C={c} K={k} {name}: ERROR {exc}", flush=True)
                        continue
                    row = {"run": run, "peer": peer, "c": c, "k": k, "gen": name, **{
                        key: r.get(key) for key in ("rps", "msgs", "secs", "gen_us_per_rt", "gen_cpu_frac",
                                                    "p50_us", "p99_us", "foreign_cpu_frac", "server_cpu_s",
                                                    "server_cpu_s_runner")}}
                    # the server's CPU as the runner sampled it on the generator's events: one method for both
                    srv = row["server_cpu_s_runner"] or 0.0
                    row["server_us_per_rt"] = srv / row["msgs"] * 1e6 if row["msgs"] else None
                    row["server_cpu_frac"] = srv / row["secs"] if row["secs"] else None
                    rows.append(row)
                    print(f"run {run + 1} {peer:<14} C={c:<4} K={k:<3} {name:<14} {row['rps']:>9,.0f} rt/s  generator "
                          f"{row['gen_us_per_rt']:5.2f} us/rt ({row['gen_cpu_frac']:.0%})  server "
                          f"{row['server_us_per_rt']:5.2f} us/rt ({row['server_cpu_frac']:.0%})  other processes "
                          f"{row['foreign_cpu_frac'] or 0:.0%}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"gencost-{stamp}.json").write_text(json.dumps(rows, indent=1))
    print("\n| server | setting | generator | rt/s | generator µs/rt | generator core | server µs/rt | server core |")
    print("|---|---|---|---|---|---|---|---|")
    for peer in peers:
        for c, k in configs:
            for name, _ in gens:
                rs = [r for r in rows if r["peer"] == peer and (r["c"], r["k"]) == (c, k) and r["gen"] == name]
                if not rs:
                    continue
                m = {key: statistics.median(r[key] for r in rs) for key in
                     ("rps", "gen_us_per_rt", "gen_cpu_frac", "server_us_per_rt", "server_cpu_frac")}
                print(f"| {PEERS[peer].label} | C={c} K={k} | {name} | {m['rps']:,.0f} | {m['gen_us_per_rt']:.2f} | "
                      f"{m['gen_cpu_frac']:.0%} | {m['server_us_per_rt']:.2f} | {m['server_cpu_frac']:.0%} |")
    print(f"\n(medians of {runs} run(s); raw rows in {out}/gencost-{stamp}.json)")
    return 0


# ------------------------------------------------------------------ main


def _mode_from_raw(d: dict[str, Any]) -> Mode:
    known = {f.name for f in fields(Mode)}
    kw = {k: v for k, v in d.items() if k in known}
    kw["echo_configs"] = [tuple(x) for x in kw.get("echo_configs", [])]
    kw["bcast"] = [x if isinstance(x, int) else x[0] for x in kw.get("bcast", [])]
    return Mode(**kw)


def report_only(raw_path: Path, md_path: Path) -> int:
    raw = json.loads(raw_path.read_text())
    mode = _mode_from_raw(raw["mode"])
    tasks = [Task(**{**t, "params": t["params"]}) for t in raw["tasks"]]
    peers = [p for p in raw["peers"] if p in PEERS]
    summary = summarize(tasks, mode, peers)
    png = md_path.with_suffix(".png")
    plot(summary, mode, peers, png)
    command = raw.get("command") or ("make bench" if not raw["quick"] else "python bench/run.py --quick")
    write_report(md_path, render(summary, tasks, mode, peers, raw["machine"], png.name, command, raw["started"],
                                 raw["elapsed_s"]))
    print(f"wrote {md_path} and {png} from {raw_path}")
    return 0


def _configs(s: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in c.split("x")) for c in s.split(",") if c]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> int:
    global TETHER_SRC
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few seconds per peer (used by the tests)")
    ap.add_argument("--peers", default=None, help="comma-separated, default: all")
    ap.add_argument("--bcast-peers", default=None, help="default: every selected peer with a broadcast mode")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=BENCH / "results", help="raw JSON goes here")
    ap.add_argument("--md", type=Path, default=None, help="Markdown report (default: docs/benchmarks.md; "
                    "in quick mode OUT/benchmarks.md)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--configs", default=None, metavar="CxK,...", help="echo settings, e.g. 50x1,500x1,50x16")
    ap.add_argument("--bcast", default=None, metavar="N,...", help="broadcast receiver counts, e.g. 1000,10000")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per measurement")
    ap.add_argument("--no-idle", action="store_true", help="skip the idle-memory measurement")
    ap.add_argument("--no-bcast", action="store_true", help="skip broadcast")
    ap.add_argument("--tether-src", type=Path, default=None, help="the src/ directory tether is imported from "
                    "(default: this tree's)")
    ap.add_argument("--report-only", type=Path, metavar="RAW_JSON",
                    help="no measuring: rewrite the report and plot from a raw results file")
    ap.add_argument("--gen-cost", action="store_true", help="old generator vs new against the same servers "
                    "(default peers: floor,go-xnet,raw-tcp,tether; configs 50x1,500x1,50x16; 2 runs)")
    ap.add_argument("--old-rev", default=OLD_LOADGEN_REV, help="--gen-cost: the git revision of the old generator")
    ap.add_argument("--selftest", nargs=argparse.REMAINDER, metavar="LOADGEN_ARGS",
                    help="build, then run `loadgen -mode=selftest -runs=2 -gen=<the old generator>` (extra "
                         "arguments go to the generator, e.g. -configs=50x1 -duration=5s)")
    args = ap.parse_args(argv)
    if args.tether_src:
        TETHER_SRC = args.tether_src.resolve()
    if args.report_only:
        return report_only(args.report_only, args.md or ROOT / "docs" / "benchmarks.md")
    _raise_nofile()
    if not shutil.which("taskset"):
        print("taskset not found (util-linux)", file=sys.stderr)
        return 2
    if not args.no_build:
        build(print if not args.quiet else (lambda s: None))
    if args.selftest is not None:
        old = build_old_loadgen(args.old_rev)
        cmd = ["taskset", "-c", LOADGEN_CORE, str(LOADGEN), "-mode=selftest", "-runs=2", f"-gen={old}",
               *args.selftest]
        print("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in cmd), flush=True)
        return subprocess.run(cmd).returncode
    if args.gen_cost:
        peers = (args.peers or "floor,go-xnet,raw-tcp,tether").split(",")
        return gen_cost(peers, _configs(args.configs or "50x1,500x1,50x16"), args.runs or 2, args.old_rev,
                        1.0, args.duration or 3.0, args.out, 5.0)

    mode = QUICK if args.quick else FULL
    if args.runs:
        mode.runs = args.runs
    if args.configs:
        mode.echo_configs = _configs(args.configs)
    if args.bcast:
        mode.bcast = [int(x) for x in args.bcast.split(",") if x]
    if args.duration:
        mode.duration = args.duration
    if args.no_bcast:
        mode.bcast = []
    if args.no_idle:
        mode.idle_n = 0
    peers = [p for p in (args.peers or ",".join(PEERS)).split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    bcast_peers = ([p for p in args.bcast_peers.split(",") if p] if args.bcast_peers is not None
                   else [p for p in peers if PEERS[p].bcast])
    md_path = args.md or (args.out / "benchmarks.md" if args.quick else ROOT / "docs" / "benchmarks.md")
    args.out.mkdir(parents=True, exist_ok=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = max([mode.idle_n] + mode.bcast) + 100
    if nofile < need:
        print(f"warning: open files limit {nofile} < {need}; large runs may fail", file=sys.stderr)

    tasks = plan(peers, bcast_peers, mode, args.seed)
    started = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
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
            progress.grow(len(noisy))
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
    command = "make bench" if not args.quick and argv is None and len(sys.argv) == 1 else \
        "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    raw = {
        "started": started, "elapsed_s": elapsed, "quick": args.quick, "machine": info, "peers": peers,
        "mode": mode.__dict__, "tasks": [t.__dict__ for t in tasks], "summary": summary, "command": command,
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
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_report(md_path, render(summary, tasks, mode, peers, info, plot_name, command, started, elapsed))
    if not args.quiet:
        print(f"wrote {md_path} and {png}; raw results in {args.out}")
    return 0 if all(t.result for t in tasks) else 1


if __name__ == "__main__":
    sys.exit(main())
