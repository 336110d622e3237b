"""Many connections, held: the soak of issue 16, against tether, Node ws and Go x/net.

    python bench/soak.py                                   # what `make soak` runs: 50,000 x 300 s, 3 servers
    python bench/soak.py --peers tether --conns 2000 --hold 20 --idle 8 --ping-interval 4 --no-md
    python bench/soak.py --report-only bench/results/soak/latest.json   # re-render docs and plot

One server process on 127.0.0.1 (pinned to core 0 with --pin) and the Go load generator's
`-mode=soak` (bench/loadgen/soak.go, pinned to core 1) in as many processes as the file
descriptor limit needs, their connections bound to source addresses spread over 127.0.0.0/8.
Phases, each moved by this driver on the generators' stdin:

1. connect: every connection open; the first --members subscribed to room "b";
2. hold, heartbeats only (--idle seconds): no traffic but the servers' keepalive pings (and
   tether's heartbeat messages, echoed as its clients do): the server's CPU in this window is
   what heartbeats cost;
3. traffic (the rest of --hold): every connection sends a request about every --req-every
   seconds, and one connection a broadcast every --bcast-every seconds to the members;
4. drain (every reply and delivery in), then the server's own account (admin request
   `stats`), then close: a close frame from every client, which must get the server's close
   frame (1000) and EOF; then the server must come back to where it started: connections,
   tasks (tether) or goroutines (Go), socket fds in /proc/PID/fd.

Meanwhile /proc/PID of the server is sampled every --sample seconds: RSS, CPU, open fds.
Results: raw JSON in --out, the section "50,000 connections held" of docs/benchmarks.md
(between the SOAK markers; --no-md to leave it), and a plot of RSS per connection over time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
LOADGEN = BUILD / "soak-loadgen"
XNET = BUILD / "soak-xnet"
GOENV = {"GO111MODULE": "off", "GOPATH": "/usr/share/gocode"}
PORTS = range(9300, 9350)  # bench/run.py uses 9110-9199
SERVER_CORE, LOADGEN_CORE = "0", "1"
FD_RESERVE = 100  # fds a server process needs beside its connections (listener, epoll, stdio, admin)
SOAK_BEGIN, SOAK_END = "<!-- SOAK BEGIN -->", "<!-- SOAK END -->"
MD = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "soak.png"


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    cmd: tuple[str, ...]  # {port} and {ping} are substituted
    src: str
    note: str


PEERS: dict[str, Peer] = {
    "tether": Peer("tether", "tether", (sys.executable, str(ROOT / "tests" / "servers" / "soak_scale_app.py"),
                                        "{port}", "{ping}"), "tests/servers/soak_scale_app.py",
                   "ping every interval per connection (one timer wheel for all), plus its heartbeat message "
                   "(echoed by the client) when nothing else was written; ping timeout = interval"),
    "tether-wheelfix": Peer("tether-wheelfix", "tether + wheel fix",
                            (sys.executable, str(ROOT / "tests" / "servers" / "soak_scale_app.py"),
                             "{port}", "{ping}", "wheel-fix"), "tests/servers/soak_scale_app.py wheel-fix",
                            "tether with the one-line fix proposed for tether.wheel's re-arm bug monkeypatched "
                            "in (diagnosis: what the bug costs; not in the default peers)"),
    "node-ws": Peer("node-ws", "Node ws", ("node", str(BENCH / "soak" / "ws_server.js"), "{port}", "{ping}"),
                    "bench/soak/ws_server.js",
                    "one setInterval pings every client at once each interval (the ws README); "
                    "no pong since the last ping: terminated"),
    "go-xnet": Peer("go-xnet", "Go x/net/websocket", (str(XNET), "{port}", "{ping}"), "bench/soak/xnet/main.go",
                    "a time.AfterFunc per connection pings each interval; x/net swallows pongs, so "
                    "dead peers are not detected by it"),
}


@dataclass
class Config:
    conns: int = 50_000
    members: int = 10_000
    hold: float = 300.0  # after every connection is open: heartbeats only, then traffic
    idle: float = 40.0  # the heartbeat-only window at the start of the hold
    ping_interval: float = 20.0
    req_every: float = 30.0
    bcast_every: float = 1.0
    per_proc: int = 10_000  # connections per generator process
    per_src: int = 5_000  # connections per source address
    sample: float = 2.0
    pin: bool = True
    phase_timeout: float = 60.0
    requested_conns: int = 0
    limited_by: str = ""


# ------------------------------------------------------------------ building and limits


def _go_build(srcdir: Path, target: Path, log: Callable[[str], None]) -> None:
    newest = max(f.stat().st_mtime for f in srcdir.glob("*.go"))
    if not target.exists() or target.stat().st_mtime < newest:
        log(f"building {target.name}")
        BUILD.mkdir(exist_ok=True)
        subprocess.run(["go", "build", "-o", str(target), "."], cwd=srcdir, env={**os.environ, **GOENV}, check=True)


def build(peers: list[str], log: Callable[[str], None] = print) -> None:
    _go_build(BENCH / "loadgen", LOADGEN, log)
    if "go-xnet" in peers:
        _go_build(BENCH / "soak" / "xnet", XNET, log)
    if "node-ws" in peers and not (BENCH / "node" / "node_modules" / "ws").exists():
        log("npm ci (ws)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=BENCH / "node", check=True)


def raise_nofile() -> tuple[int, int]:
    """RLIMIT_NOFILE soft limit up to the hard limit (children inherit it); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fit_to_limits(cfg: Config) -> Config:
    """One server process holds every connection: at most the hard fd limit minus a reserve.

    The hard limit can only be raised with CAP_SYS_RESOURCE; where it is lower than the soak
    needs, the soak holds what fits and says so (``limited_by``) rather than not running."""
    cfg.requested_conns = cfg.conns
    _, hard = raise_nofile()
    need = cfg.conns + 1 + FD_RESERVE  # + the broadcast sender
    if hard != resource.RLIM_INFINITY and hard < need:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        fit = (hard - FD_RESERVE - 1) // 100 * 100
        cfg.limited_by = (f"RLIMIT_NOFILE hard limit {hard} (raising it needs CAP_SYS_RESOURCE, which this "
                          f"process lacks): {fit:,} connections per server process, not {cfg.conns:,}")
        cfg.conns = fit
    cfg.members = min(cfg.members, cfg.conns)
    if hard != resource.RLIM_INFINITY:
        cfg.per_proc = min(cfg.per_proc, hard - FD_RESERVE)
    return cfg


# ------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def sched_wait_s(pid: int) -> float:
    """Seconds the process was runnable but waiting for a CPU (/proc/PID/schedstat, all threads
    of the main one): how much other processes held it back."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_fds(pid: int) -> int:
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
    return n


def meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tcp_mem_pages() -> int:
    """Pages of socket buffers held by every TCP socket of the machine (/proc/net/sockstat)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                v = line.split()
                return int(v[v.index("mem") + 1])
    return 0


def machine_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def load1() -> float:
    return os.getloadavg()[0]


def wait_quiet(max_wait: float, log: Callable[[str], None], threshold: float = 0.5) -> dict[str, float]:
    """Wait (at most max_wait s) until the machine's other work uses < threshold of a core over 5 s."""
    t0 = time.monotonic()
    busy = 0.0
    while True:
        b0 = machine_busy()
        time.sleep(5.0)  # the measuring window itself
        busy = (machine_busy() - b0) / 5.0
        waited = time.monotonic() - t0
        if busy < threshold or waited >= max_wait:
            break
        log(f"machine busy ({busy:.2f} cores, load {load1():.2f}): waiting for a quiet window "
            f"({waited:.0f}/{max_wait:.0f} s)")
    return {"waited_s": time.monotonic() - t0, "busy_cores": busy, "load1": load1()}


# ------------------------------------------------------------------ processes


class Lines:
    """A child's stdout, one line at a time, read by a thread: events to a callback, the rest kept."""

    def __init__(self, stream: TextIO, on_line: Callable[[str], None]):
        self.lines: list[str] = []
        self._on = on_line
        self._t = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._t.start()

    def _read(self, stream: TextIO) -> None:
        with stream:
            for line in stream:
                self.lines.append(line.rstrip("\n"))
                self._on(line.rstrip("\n"))

    def join(self, timeout: float) -> None:
        self._t.join(timeout)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Server:
    def __init__(self, peer: Peer, cfg: Config, timeout: float = 20.0):
        self.peer = peer
        self.port = next((p for p in PORTS if _port_free(p)), 0)
        if not self.port:
            raise RuntimeError(f"no free port in {PORTS}")
        cmd = [c.replace("{port}", str(self.port)).replace("{ping}", f"{cfg.ping_interval:g}") for c in peer.cmd]
        if cfg.pin:
            cmd = ["taskset", "-c", SERVER_CORE, *cmd]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        env.pop("PYTHONASYNCIODEBUG", None)  # make test's asyncio debug mode would be measured too
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid  # taskset execs the server: same pid
        self.listening = threading.Event()
        assert self.proc.stdout is not None
        self.out = Lines(self.proc.stdout, lambda line: "LISTENING" in line and self.listening.set())
        deadline = time.monotonic() + timeout
        while not self.listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{peer.name} did not start: {self.tail()}")

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.out.lines[-n:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.out.join(5)
        return self.proc.returncode


class Admin:
    """One more WebSocket connection to the server, for its `stats` request."""

    def __init__(self, port: int):
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(
            f"ws://127.0.0.1:{port}/", origin=f"http://127.0.0.1:{port}", open_timeout=10,  # type: ignore[arg-type]
            close_timeout=5, max_size=1 << 22))
        self.next_id = 1

    def stats(self, timeout: float = 20.0) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        self.ws.send(json.dumps({"type": "stats", "id": rid}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("type") == "reply" and msg.get("id") == rid:
                return dict(msg["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()


class Generator:
    """One soak load generator process: its events, its commands, its result."""

    def __init__(self, index: int, args: list[str], pin: bool, on_event: Callable[[int, str, dict[str, Any]], None]):
        self.index = index
        cmd = [str(LOADGEN), "-mode=soak", *args]
        if pin:
            cmd = ["taskset", "-c", LOADGEN_CORE, *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid
        self.result: dict[str, Any] | None = None
        self.events: dict[str, dict[str, Any]] = {}
        self.progress: dict[str, Any] = {}
        self._on = on_event
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out = Lines(self.proc.stdout, self._line)
        self.err = Lines(self.proc.stderr, lambda line: None)

    def _line(self, line: str) -> None:
        if line.startswith("RESULT "):
            self.result = json.loads(line[7:])
        elif line.startswith("EVENT "):
            name, _, rest = line[6:].partition(" ")
            data = json.loads(rest) if rest else {}
            if name == "progress":
                self.progress = data
            else:
                self.events[name] = data
            self._on(self.index, name, data)

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError, ValueError):  # ended, or its stdin closed already
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.out.join(5)
        self.err.join(5)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.result is None:
            raise RuntimeError(f"soak generator {self.index} ended without a result ({self.proc.returncode}): "
                               + "\n".join(self.err.lines[-10:]))
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.out.join(5)
        self.err.join(5)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def plan_generators(cfg: Config, port: int) -> list[list[str]]:
    """Generator 0 holds the members and the sender (time to all is measured in one process), the
    others the rest, at most per_proc each; each has its own block of source addresses."""
    sizes = [max(cfg.members, min(cfg.conns, cfg.per_proc))] if cfg.members else []
    rest = cfg.conns - sum(sizes)
    while rest > 0:
        sizes.append(min(rest, cfg.per_proc))
        rest -= sizes[-1]
    common = [f"-addr=127.0.0.1:{port}", f"-per-src={cfg.per_src}", f"-req-every={cfg.req_every}s",
              f"-bcast-every={cfg.bcast_every}s", f"-phase-timeout={cfg.phase_timeout}s",
              f"-lifetime={cfg.hold + 600 + cfg.conns / 100:.0f}s", "-progress=1s",
              f"-timeout={20 + cfg.conns / 1000:.0f}s"]
    out = []
    for i, n in enumerate(sizes):
        args = [*common, f"-n={n}", f"-src=127.0.{i + 1}.1"]
        if i == 0 and cfg.members:
            args += [f"-members={cfg.members}", "-sender"]
        out.append(args)
    return out


# ------------------------------------------------------------------ progress


class Progress:
    """A rich progress bar over the soak's wall time (plain lines with --quiet or without rich)."""

    def __init__(self, label: str, total: float, quiet: bool):
        self.quiet, self._rich, self._last = quiet, None, 0.0
        if not quiet:
            with contextlib.suppress(ImportError):
                from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
                from rich.progress import Progress as RP

                self._rich = RP(TextColumn(f"[bold]soak {label}[/]"), BarColumn(), TimeElapsedColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"))
                self._rich.start()
                self._id = self._rich.add_task("", total=total)

    def update(self, done: float, text: str) -> None:
        if self._rich is not None:
            self._rich.update(self._id, completed=done, description=text)
        elif time.monotonic() - self._last >= 10:
            self._last = time.monotonic()
            print(f"  [{done:5.0f} s] {text}", flush=True)

    def log(self, msg: str) -> None:
        if self._rich is not None:
            self._rich.console.print(msg, highlight=False)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------ one soak


@dataclass
class Sample:
    t: float  # s since the server started
    phase: str
    rss_kib: int
    cpu_s: float
    fds: int
    open: int  # connections open, as the generators count them
    busy_s: float  # the machine's busy CPU seconds so far
    gen_cpu_s: float
    load1: float
    slab_kib: int = 0  # the kernel's slab caches (socket structures live there), the whole machine
    tcp_mem_pages: int = 0
    wait_s: float = 0.0  # the server runnable, waiting for a CPU (schedstat)


@dataclass
class Soak:
    peer: str
    cfg: Config
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # phase -> t
    base: dict[str, Any] = field(default_factory=dict)
    before_close: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    gens: list[dict[str, Any]] = field(default_factory=list)
    idle: dict[str, float] = field(default_factory=dict)
    quiet: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    error: str | None = None


def _total(gens: list[Generator], key: str) -> int:
    return sum(int(g.progress.get(key, 0)) for g in gens)


def _wait(pred: Callable[[], bool], timeout: float, tick: Callable[[], None], what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        tick()
        time.sleep(0.2)


def run_soak(peer_name: str, cfg: Config, quiet: bool = False, log: Callable[[str], None] = print) -> Soak:
    """One soak against one server; never raises for what went wrong in it (see Soak.error)."""
    peer = PEERS[peer_name]
    soak = Soak(peer_name, cfg)
    try:
        srv = Server(peer, cfg)
    except Exception as exc:
        soak.error = f"{type(exc).__name__}: {exc}"[:800]
        return soak
    t0 = time.monotonic()
    gens: list[Generator] = []
    admin: Admin | None = None
    stop_sampling = threading.Event()
    phase = ["start"]

    def mark(name: str) -> None:
        phase[0] = name
        soak.marks[name] = time.monotonic() - t0

    def sample() -> Sample:
        gen_cpu = 0.0
        for g in gens:
            with contextlib.suppress(OSError):
                gen_cpu += cpu_seconds(g.pid)
        return Sample(time.monotonic() - t0, phase[0], status_kib(srv.pid, "VmRSS"), cpu_seconds(srv.pid),
                      fd_count(srv.pid), _total(gens, "open"), machine_busy(), gen_cpu, load1(),
                      meminfo_kib("Slab"), tcp_mem_pages(), sched_wait_s(srv.pid))

    def sampler() -> None:
        while not stop_sampling.wait(cfg.sample):
            with contextlib.suppress(OSError):
                soak.samples.append(sample())

    total_s = cfg.hold + 30 + cfg.conns / 2000
    bar = Progress(peer.label, total_s, quiet)

    def tick() -> None:
        s = soak.samples[-1] if soak.samples else None
        rss = f"RSS {s.rss_kib / 1024:,.0f} MiB" if s else ""
        bar.update(time.monotonic() - t0, f"{phase[0]}: {_total(gens, 'open'):,} open, "
                   f"{_total(gens, 'req_ok'):,} replies, {_total(gens, 'bcast_complete'):,} broadcasts, "
                   f"{_total(gens, 'pings'):,} pings; {rss}")

    try:
        time.sleep(1.0)  # let the server settle before the baseline
        admin = Admin(srv.port)
        soak.base = {"rss_kib": status_kib(srv.pid, "VmRSS"), "fds": fd_count(srv.pid),
                     "socket_fds": socket_fds(srv.pid), "stats": admin.stats(), "cpu_s": cpu_seconds(srv.pid)}
        soak.samples.append(sample())
        threading.Thread(target=sampler, daemon=True).start()
        mark("connect")
        for i, args in enumerate(plan_generators(cfg, srv.port)):
            gens.append(Generator(i, args, cfg.pin, lambda *a: None))
        _wait(lambda: all("ready" in g.events or "failed" in g.events or g.proc.poll() is not None for g in gens),
              60 + cfg.conns / 200, tick, "connecting")
        failed = [g.events.get("failed") or g.err.lines[-3:] for g in gens if "ready" not in g.events]
        if failed:
            raise RuntimeError(f"connecting failed: {failed}")
        mark("hold")
        # The heartbeat-only window: the server's CPU while nothing but keepalive happens.
        c0, b0, w0 = cpu_seconds(srv.pid), machine_busy(), time.monotonic()
        g0 = sum(cpu_seconds(g.pid) for g in gens)
        p0 = _total(gens, "pings")
        _wait(lambda: time.monotonic() - w0 >= cfg.idle, cfg.idle + 5, tick, "idle window")
        c1, b1, w1 = cpu_seconds(srv.pid), machine_busy(), time.monotonic()
        g1 = sum(cpu_seconds(g.pid) for g in gens)
        soak.idle = {"secs": w1 - w0, "server_cpu_s": c1 - c0, "gen_cpu_s": g1 - g0,
                     "foreign_cpu_s": max(0.0, (b1 - b0) - (c1 - c0) - (g1 - g0)), "pings": _total(gens, "pings") - p0}
        mark("traffic")
        for g in gens:
            g.command("traffic")
        _wait(lambda: time.monotonic() - w0 >= cfg.hold, cfg.hold + 5, tick, "hold")
        mark("drain")
        for g in gens:
            g.command("drain")
        _wait(lambda: all("drained" in g.events or g.proc.poll() is not None for g in gens),
              cfg.phase_timeout + 15, tick, "draining")
        mark("drained")
        soak.before_close = {"stats": admin.stats(), "socket_fds": socket_fds(srv.pid),
                             "rss_kib": status_kib(srv.pid, "VmRSS")}
        mark("close")
        for g in gens:
            g.command("close")
        for g in gens:
            soak.gens.append(g.wait(cfg.phase_timeout + 30))
        mark("closed")
        # The server must come back to its baseline: connections, tasks, sockets.
        want = soak.base["stats"]

        def settled() -> bool:
            st = admin.stats() if admin else {}
            soak.after = {"stats": st, "socket_fds": socket_fds(srv.pid), "rss_kib": status_kib(srv.pid, "VmRSS")}
            keys = [k for k in ("connections", "tasks", "goroutines") if k in want]
            return all(st.get(k) == want[k] for k in keys) and soak.after["socket_fds"] == soak.base["socket_fds"]

        with contextlib.suppress(TimeoutError):
            _wait(settled, 30, tick, "settling")
        mark("settled")
    except Exception as exc:  # recorded in the report; the other servers still run
        soak.error = f"{type(exc).__name__}: {exc}"[:800]
        log(f"{peer_name}: {soak.error}\n{srv.tail()}")
    finally:
        stop_sampling.set()
        try:
            for g in gens:
                g.command("close")
            for g in gens:
                with contextlib.suppress(Exception):
                    if g.result is None:
                        g.wait(cfg.phase_timeout + 10)
                g.kill()
            if admin is not None:
                admin.close()
        finally:
            soak.exit_code = srv.stop()  # whatever happened above: no server left behind
            bar.close()
        if len(soak.gens) < len(gens):
            soak.gens = [g.result for g in gens if g.result is not None]
    return soak


# ------------------------------------------------------------------ figures

HIST_SIZE = 128 + 64 * 58  # bench/loadgen/main.go's log-linear histogram of nanoseconds


def h_val(i: int) -> float:
    if i < 128:
        return float(i)
    e, m = (i - 128) // 64 + 1, (i - 128) % 64 + 64
    return (m + 0.5) * float(1 << e)


def merge_hist(hists: list[dict[str, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hists:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + int(v)
    return out


def quantile(h: dict[int, int], q: float) -> float | None:
    total = sum(h.values())
    if not total:
        return None
    target = int(q * (total - 1)) + 1
    acc = 0
    for i in sorted(h):
        acc += h[i]
        if acc >= target:
            return h_val(i)
    return None


def _ms(ns: float | None) -> float | None:
    return None if ns is None else ns / 1e6


def summarize(s: Soak) -> dict[str, Any]:
    """The figures of one soak, and the checks that say nothing was lost or stuck."""
    cfg, g = s.cfg, s.gens
    add = lambda key: sum(int(r.get(key) or 0) for r in g)  # noqa: E731
    req = merge_hist([r.get("req_hist") or {} for r in g])
    gaps = merge_hist([r.get("ping_gap_hist") or {} for r in g])
    bc = merge_hist([r.get("bcast_hist") or {} for r in g])
    codes: dict[str, int] = {}
    for r in g:
        for k, v in (r.get("close_codes") or {}).items():
            codes[k] = codes.get(k, 0) + v
    pings: dict[str, int] = {}
    for r in g:
        for k, v in (r.get("pings") or {}).items():
            pings[k] = pings.get(k, 0) + v
    conns = add("connections") + (1 if any(r.get("sender") for r in g) else 0)
    base_rss = s.base.get("rss_kib", 0)
    t_hold, t_drain = s.marks.get("hold"), s.marks.get("drain")
    t_close = s.marks.get("close", float("inf"))
    per_conn = [(x.t, (x.rss_kib - base_rss) / x.open) for x in s.samples
                if x.open >= max(1, cfg.conns // 2) and x.t <= t_close]
    held = [v for t, v in per_conn if t_hold is not None and t_drain is not None and t_hold <= t <= t_drain]
    # Kernel memory beside RSS: slab growth from before connecting to the start of the hold, per
    # socket (each connection is two sockets here, the client's and the server's: about the same size).
    hold_samples = [x for x in s.samples if t_hold is not None and x.t >= t_hold]
    first = s.samples[0] if s.samples else None
    slab_per_socket = ((hold_samples[0].slab_kib - first.slab_kib) / (2 * hold_samples[0].open)
                       if first and hold_samples and hold_samples[0].open and first.slab_kib else None)
    idle = dict(s.idle)
    if idle:
        idle["pings"] = pings.get("hold", 0)  # counted by the generators in the heartbeat-only phase
    # What holding idle connections costs: the window's CPU scaled to one ping interval and 10,000
    # connections (whatever the server did in it: pings, heartbeat messages, timers); and per ping.
    intervals = idle.get("secs", 0) / cfg.ping_interval if cfg.ping_interval else 0
    hb_cpu = (idle["server_cpu_s"] / intervals / (cfg.conns / 10_000)) if intervals and idle else None
    per_ping = (idle["server_cpu_s"] / idle["pings"] * 10_000) if idle.get("pings") else None
    sent = add("bcast_sent")
    bcount = [c for r in g if r.get("sender") for c in (r.get("bcast_count") or [])]
    st_before, st_after = s.before_close.get("stats", {}), s.after.get("stats", {})
    base_stats = s.base.get("stats", {})
    traffic = [x for x in s.samples if t_drain is not None and s.marks.get("traffic", 1e18) <= x.t <= t_drain]
    foreign = waited = busy_traffic = None
    if len(traffic) >= 2:
        a, b = traffic[0], traffic[-1]
        foreign = max(0.0, (b.busy_s - a.busy_s) - (b.cpu_s - a.cpu_s) - (b.gen_cpu_s - a.gen_cpu_s)) / (b.t - a.t)
        waited = (b.wait_s - a.wait_s) / (b.t - a.t)
        busy_traffic = (b.cpu_s - a.cpu_s) / (b.t - a.t)
    timeline = []
    for a, b in zip(s.samples, s.samples[1:], strict=False):
        dt = b.t - a.t
        if dt > 0:
            timeline.append((round(b.t, 1), b.phase, round(b.rss_kib / 1024, 1), round((b.cpu_s - a.cpu_s) / dt * 100),
                             round((b.wait_s - a.wait_s) / dt * 100), round((b.busy_s - a.busy_s) / dt, 2),
                             round(b.load1, 2), b.open))
    bcast_ms = [round(v / 1e3, 1) for r in g if r.get("sender") for v in (r.get("bcast_last_us") or [])]
    out: dict[str, Any] = {
        "peer": s.peer, "label": PEERS[s.peer].label, "error": s.error,
        "conns": cfg.conns, "requested_conns": cfg.requested_conns or cfg.conns, "limited_by": cfg.limited_by,
        "members": cfg.members, "processes": len(g),
        "setup_s": max((r.get("setup_s") or 0) for r in g) if g else None,
        "opened": add("opened"), "conns_with_sender": conns,
        "rss_base_mib": base_rss / 1024,
        "rss_peak_mib": max((x.rss_kib for x in s.samples), default=0) / 1024,
        "kib_per_conn_start": held[0] if held else None,
        "kib_per_conn_end": held[-1] if held else None,
        "kib_per_conn_max": max(held) if held else None,
        "rss_after_close_mib": s.after.get("rss_kib", 0) / 1024,
        "kernel_slab_kib_per_socket": slab_per_socket,
        "tcp_buffer_pages_max": max((x.tcp_mem_pages for x in s.samples), default=None),
        "idle": idle, "heartbeat_cpu_ms_per_interval_per_10k": hb_cpu * 1e3 if hb_cpu is not None else None,
        "heartbeat_core_pct_per_10k": (hb_cpu / cfg.ping_interval * 100) if hb_cpu is not None else None,
        "heartbeat_cpu_ms_per_10k_pings": per_ping * 1e3 if per_ping is not None else None,
        "pings_per_conn_per_interval": (idle["pings"] / cfg.conns / intervals) if intervals and idle else None,
        "pings": pings, "ping_gap_s_p50": (quantile(gaps, 0.5) or 0) / 1e9,
        "ping_gap_s_p99": (quantile(gaps, 0.99) or 0) / 1e9, "ping_gap_s_max": (quantile(gaps, 1) or 0) / 1e9,
        "heartbeats_echoed": add("heartbeats_echoed"),
        "req_sent": add("req_sent"), "req_ok": add("req_ok"), "req_lost": add("req_lost"),
        "req_unanswered": add("req_unanswered"), "overdue": add("overdue"),
        "req_p50_ms": _ms(quantile(req, 0.5)), "req_p99_ms": _ms(quantile(req, 0.99)),
        "req_p999_ms": _ms(quantile(req, 0.999)), "req_max_ms": _ms(quantile(req, 1.0)),
        "bcast_sent": sent, "bcast_complete": add("bcast_complete"), "bcast_order_errors": add("bcast_order_errors"),
        "bcast_receivers_min": min((r["bcast_receivers_min"] for r in g if r.get("sender")), default=None),
        "bcast_deliveries": sum(bcount),
        "bcast_all_ms_p50": _ms(quantile(bc, 0.5)), "bcast_all_ms_p99": _ms(quantile(bc, 0.99)),
        "bcast_all_ms_max": _ms(quantile(bc, 1.0)),
        "bad": add("bad"), "why": [r["why"] for r in g if r.get("why")][:3],
        "server_closed": {k: v for r in g for k, v in (r.get("server_closed") or {}).items()},
        "lost": {k: v for r in g for k, v in (r.get("lost") or {}).items()},
        "close_started": add("close_started"), "close_codes": codes, "close_no_frame": add("close_no_frame"),
        "close_reset": add("close_reset"), "close_client_fin": add("close_client_fin"),
        "close_stuck": add("close_stuck"),
        "close_s": (s.marks["closed"] - s.marks["close"]) if "closed" in s.marks else None,
        "server_before_close": st_before, "server_after": st_after, "server_base": base_stats,
        "socket_fds_base": s.base.get("socket_fds"), "socket_fds_after": s.after.get("socket_fds"),
        "settle_s": (s.marks["settled"] - s.marks["closed"]) if "settled" in s.marks else None,
        "exit_code": s.exit_code, "gen_cpu_s": sum(r.get("gen_cpu_s") or 0 for r in g),
        "server_cpu_s": (s.samples[-1].cpu_s - s.base.get("cpu_s", 0)) if s.samples else None,
        "foreign_cores_traffic": foreign, "server_wait_frac_traffic": waited, "quiet": s.quiet,
        "server_core_frac_traffic": busy_traffic,
        # (t, phase, RSS MiB, server CPU %, server waiting for a CPU %, machine busy cores, load1, open)
        "timeline": timeline, "bcast_ms_each": bcast_ms,
        "load1_max": max((x.load1 for x in s.samples), default=None),
        "series": [(round(t, 1), round(v, 3)) for t, v in per_conn], "marks": s.marks,
    }
    out["checks"] = checks(out, s)
    out["ok"] = all(out["checks"].values())
    held_ok = None not in (out["kib_per_conn_start"], out["kib_per_conn_end"])
    out["rss_growth_pct"] = ((out["kib_per_conn_end"] / out["kib_per_conn_start"] - 1) * 100) if held_ok else None
    return out


def checks(r: dict[str, Any], s: Soak) -> dict[str, bool]:
    """Nothing lost or stuck. Each entry is one claim of the report."""
    base, after = r["server_base"], r["server_after"]
    return {
        "no error": r["error"] is None,
        "every connection opened": r["opened"] == r["conns_with_sender"],
        "every request answered": r["req_sent"] > 0 and r["req_ok"] == r["req_sent"] and r["req_lost"] == 0
        and r["req_unanswered"] == 0,
        "no request overdue": r["overdue"] == 0,
        "every broadcast reached every member, in order": r["bcast_sent"] > 0
        and r["bcast_complete"] == r["bcast_sent"] and r["bcast_order_errors"] == 0
        and r["bcast_deliveries"] == r["bcast_sent"] * r["members"],
        "the server counted every member": r["bcast_receivers_min"] == r["members"],
        "no message refused or malformed": r["bad"] == 0,
        "no connection dropped during the soak": not r["server_closed"] and not r["lost"],
        "every connection closed cleanly (1000 and EOF)": r["close_started"] == r["conns_with_sender"]
        and r["close_codes"].get("1000", 0) == r["close_started"] and r["close_no_frame"] == 0
        and r["close_reset"] == 0 and r["close_stuck"] == 0,
        "the server is back to its baseline (connections, tasks or goroutines, sockets)":
        bool(after) and all(after.get(k) == base.get(k) for k in ("connections", "tasks", "goroutines") if k in base)
        and r["socket_fds_after"] == r["socket_fds_base"],
        # tether and Node exit 0 on SIGINT; Go's default SIGINT handling ends it by the signal (-2)
        "the server exited cleanly": r["exit_code"] == 0 or (r["peer"] == "go-xnet" and r["exit_code"] == -2),
    }


# ------------------------------------------------------------------ report


def _f(v: float | None, fmt: str = "{:,.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(results: list[dict[str, Any]], cfg: Config, info: dict[str, Any], cmd: str) -> str:
    n = cfg.requested_conns or cfg.conns
    L = [SOAK_BEGIN, "", f"## {n:,} connections held", "",
         "<!-- generated by bench/soak.py (make soak): edit the generator, not this section -->", "",
         f"`{cmd}` ({info['when']}, {info['secs'] / 60:.0f} min; machine: {info['machine']}; "
         f"other engineers' tests share it: see the load rows).", ""]
    if cfg.limited_by:
        L += [f"**Held {cfg.conns:,} connections, not {n:,}: {cfg.limited_by}.** Per-connection figures "
              "(KiB per connection, heartbeat CPU per 10,000 connections) do not depend on the count; the "
              "absolute ones do. On a machine where the hard limit can be raised (`ulimit -Hn`, "
              "`LimitNOFILE=` in systemd, root with CAP_SYS_RESOURCE) the same command holds the full count.", ""]
    L += [f"One server process on 127.0.0.1, pinned to core 0; the Go generator's `-mode=soak` "
          f"(bench/loadgen/soak.go) pinned to core 1 in {max(r['processes'] for r in results)} process(es), "
          f"client sockets bound to 127.0.1.1, 127.0.1.2, ... ({cfg.per_src:,} per source address). "
          f"After every connection is open: **{cfg.idle:.0f} s of heartbeats only** (keepalive pings every "
          f"{cfg.ping_interval:.0f} s, answered by the clients), then **{cfg.hold - cfg.idle:.0f} s of trickle**: "
          f"each connection sends a typed request about every {cfg.req_every:.0f} s "
          f"(±20% jitter), and one more connection a broadcast every {cfg.bcast_every:g} s to "
          f"{cfg.members:,} members (time to all = the last member's read minus the send timestamp carried in "
          f"the broadcast); then every reply and delivery is waited for, and every client closes (1000).", ""]
    head = ["", *[f"**{r['label']}**" if r["peer"] == "tether" else r["label"] for r in results]]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("measured; load average before (1 min), waited for quiet",
         lambda r: f"{r.get('when', info['when'])}; {r['quiet'].get('load1', 0):.2f}, "
                   f"{r['quiet'].get('waited_s', 0):.0f} s"),
        ("connections held (+1 sender)", lambda r: f"{r['conns']:,}"),
        ("connect time, s", lambda r: _f(r["setup_s"])),
        ("server RSS before / peak, MiB", lambda r: f"{r['rss_base_mib']:.0f} / {r['rss_peak_mib']:,.0f}"),
        ("RSS per connection, KiB: start of hold → end of traffic (max)",
         lambda r: f"{_f(r['kib_per_conn_start'])} → {_f(r['kib_per_conn_end'])} ({_f(r['kib_per_conn_max'])})"),
        ("… growth while held", lambda r: _f(r["rss_growth_pct"], "{:+.1f}%")),
        ("kernel slab per socket (not in RSS; machine-wide, approximate), KiB",
         lambda r: _f(r.get("kernel_slab_kib_per_socket"))),
        ("server CPU per ping interval per 10,000 idle connections, ms",
         lambda r: _f(r["heartbeat_cpu_ms_per_interval_per_10k"])),
        ("… as % of a core per 10,000 idle connections", lambda r: _f(r["heartbeat_core_pct_per_10k"], "{:.2f}%")),
        ("pings per connection per ping interval in that window",
         lambda r: _f(r["pings_per_conn_per_interval"], "{:.2f}")),
        ("… server CPU per 10,000 pings answered, ms", lambda r: _f(r["heartbeat_cpu_ms_per_10k_pings"])),
        ("gap between two pings of a connection, s: p50 / max",
         lambda r: f"{r['ping_gap_s_p50']:.1f} / {r['ping_gap_s_max']:.1f}"),
        ("requests sent / answered", lambda r: f"{r['req_sent']:,} / {r['req_ok']:,}"),
        ("request latency p50 / p99 / max, ms",
         lambda r: f"{_f(r['req_p50_ms'], '{:.2f}')} / {_f(r['req_p99_ms'], '{:.1f}')} / "
                   f"{_f(r['req_max_ms'], '{:.0f}')}"),
        ("broadcasts sent / reached all members", lambda r: f"{r['bcast_sent']:,} / {r['bcast_complete']:,}"),
        ("broadcast time to all, ms: p50 / p99 / max",
         lambda r: f"{_f(r['bcast_all_ms_p50'])} / {_f(r['bcast_all_ms_p99'])} / {_f(r['bcast_all_ms_max'])}"),
        ("server CPU for the whole soak, s", lambda r: _f(r["server_cpu_s"])),
        ("server's share of its core during the trickle", lambda r: _f(r.get("server_core_frac_traffic"), "{:.1%}")),
        ("clean closes (1000, then EOF) / closes",
         lambda r: f"{r['close_codes'].get('1000', 0):,} / {r['close_started']:,}"
         + (f" ({r['close_client_fin']:,} after a 2 s wait for the server's FIN)" if r["close_client_fin"] else "")),
        ("close time for all, s", lambda r: _f(r["close_s"])),
        ("left in the server after the close", _leftovers),
        ("RSS after the close, MiB", lambda r: f"{r['rss_after_close_mib']:,.0f}"),
        ("Python's cyclic GC: full passes, longest, ms", _gc),
        ("other processes during traffic, cores", lambda r: _f(r["foreign_cores_traffic"], "{:.2f}")),
        ("server runnable but waiting for its core during traffic",
         lambda r: _f(r.get("server_wait_frac_traffic"), "{:.1%}")),
        ("highest load average during the soak", lambda r: _f(r["load1_max"], "{:.1f}")),
        ("nothing lost or stuck", lambda r: "yes" if r["ok"] else "**no**: " + "; ".join(
            k for k, v in r["checks"].items() if not v)),
    ]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for name, fn in rows:
        L.append("| " + " | ".join([name, *[fn(r) for r in results]]) + " |")
    L += ["", "![RSS per connection over time](soak.png)", "", "How each server keeps connections alive:", ""]
    for r in results:
        L.append(f"- **{r['label']}** (`{PEERS[r['peer']].src}`): {PEERS[r['peer']].note}.")
    L += ["", "Raw results: `bench/results/soak/latest.json`.", "", SOAK_END]
    return "\n".join(L)


def _leftovers(r: dict[str, Any]) -> str:
    a, b = r["server_after"], r["server_base"]
    parts = [f"connections {a.get('connections', '?')} (before: {b.get('connections', '?')}, the admin)"]
    if "tasks" in b:
        parts.append(f"tasks {a.get('tasks', '?')} (before: {b['tasks']})")
    if "goroutines" in b:
        parts.append(f"goroutines {a.get('goroutines', '?')} (before: {b['goroutines']})")
    parts.append(f"socket fds {r['socket_fds_after']} (before: {r['socket_fds_base']})")
    return ", ".join(parts)


def _gc(r: dict[str, Any]) -> str:
    gc_ = r["server_before_close"].get("gc")
    if not gc_:
        return "–"
    return f"{gc_['count'][2]:,}, {gc_['longest_ms'][2]:,.0f} (younger: {max(gc_['longest_ms'][:2]):,.0f})"


def write_section(md: Path, section: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import run  # bench/run.py (imported here only: the soak needs nothing else of it)

    run.replace_section(md, SOAK_BEGIN, SOAK_END, section)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for r in results:
        t0 = r["marks"].get("hold", 0)
        xs = [t - t0 for t, _ in r["series"]]
        ax.plot(xs, [v for _, v in r["series"]], label=f"{r['label']} ({r['conns']:,} connections)")
    for r in results[:1]:
        t0 = r["marks"].get("hold", 0)
        for name in ("traffic", "drain"):
            if name in r["marks"]:
                ax.axvline(r["marks"][name] - t0, color="grey", lw=0.8, ls="--")
                ax.text(r["marks"][name] - t0, ax.get_ylim()[1] * 0.02, f" {name}", color="grey", fontsize=8)
    ax.set_xlabel("seconds since every connection was open")
    ax.set_ylabel("server RSS growth per connection, KiB")
    ax.set_ylim(bottom=0)
    ax.set_title("Connections held: RSS per connection over time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine_info() -> str:
    mem = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    rev = ""
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if subprocess.run(["git", "status", "--porcelain", "--", "src/tether"], cwd=ROOT, capture_output=True,
                          text=True, timeout=10).stdout.strip():
            rev += " + uncommitted changes in src/tether"
    return f"{os.cpu_count()} cores{mem}, tether git {rev}"


def line(r: dict[str, Any]) -> str:
    return (f"{r['label']}: {r['conns']:,} connections, RSS/conn {_f(r['kib_per_conn_start'])} -> "
            f"{_f(r['kib_per_conn_end'])} KiB ({_f(r['rss_growth_pct'], '{:+.1f}%')}), heartbeats {_f(r['heartbeat_cpu_ms_per_interval_per_10k'])} ms CPU "
            f"per interval per 10k, requests {r['req_ok']:,}/{r['req_sent']:,} p50 {_f(r['req_p50_ms'], '{:.2f}')} "
            f"p99 {_f(r['req_p99_ms'], '{:.1f}')} ms, broadcasts {r['bcast_complete']}/{r['bcast_sent']} to all in "
            f"p50 {_f(r['bcast_all_ms_p50'])} p99 {_f(r['bcast_all_ms_p99'])} ms, closes "
            f"{r['close_codes'].get('1000', 0):,}/{r['close_started']:,} clean, after: {_leftovers(r)}; "
            + ("OK" if r["ok"] else "FAILED: " + "; ".join(k for k, v in r["checks"].items() if not v)))


def main(argv: list[str] | None = None) -> int:
    d = Config()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="tether,node-ws,go-xnet")
    ap.add_argument("--conns", type=int, default=d.conns)
    ap.add_argument("--members", type=int, default=d.members)
    ap.add_argument("--hold", type=float, default=d.hold, help="seconds held once connected (idle window included)")
    ap.add_argument("--idle", type=float, default=d.idle, help="heartbeat-only seconds at the start of the hold")
    ap.add_argument("--ping-interval", type=float, default=d.ping_interval)
    ap.add_argument("--req-every", type=float, default=d.req_every)
    ap.add_argument("--bcast-every", type=float, default=d.bcast_every)
    ap.add_argument("--per-proc", type=int, default=d.per_proc, help="connections per generator process")
    ap.add_argument("--sample", type=float, default=d.sample, help="seconds between /proc samples of the server")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and generators to cores 0 and 1")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="before each soak, wait at most this many seconds for the machine to be quiet")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "soak")
    ap.add_argument("--md", type=Path, default=MD)
    ap.add_argument("--no-md", action="store_true", help="leave docs/benchmarks.md and docs/soak.png alone")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--report-only", type=Path, help="re-render the docs section and plot from a results JSON")
    ap.add_argument("--keep", type=Path, help="a results JSON whose servers not in --peers join this report "
                    "(each column says when it was measured)")
    args = ap.parse_args(argv)
    if args.report_only:
        raw = json.loads(args.report_only.read_text())
        cfg = Config(**raw["config"])
        write_section(args.md, render(raw["results"], cfg, raw["info"], raw["command"]))
        plot(raw["results"], args.md.parent / "soak.png")
        return 0
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        ap.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    if args.idle >= args.hold:
        ap.error("--idle must be shorter than --hold")
    cfg = fit_to_limits(Config(conns=args.conns, members=args.members, hold=args.hold, idle=args.idle,
                               ping_interval=args.ping_interval, req_every=args.req_every,
                               bcast_every=args.bcast_every, per_proc=args.per_proc, sample=args.sample,
                               pin=not args.no_pin))
    log = print
    if cfg.limited_by:
        log(f"NOTE: {cfg.limited_by}")
    build(peers, log)
    cmd = "python bench/soak.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:]))
    info = {"when": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
            "load_start": load1()}
    t0 = time.monotonic()
    results = []
    for peer in peers:
        quiet = wait_quiet(args.wait_quiet, log) if args.wait_quiet > 0 else {"load1": load1()}
        log(f"soak {peer}: {cfg.conns:,} connections, hold {cfg.hold:.0f} s (heartbeats only for {cfg.idle:.0f} s), "
            f"load average {load1():.2f}")
        when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        s = run_soak(peer, cfg, quiet=args.quiet, log=log)
        s.quiet = quiet
        r = summarize(s)
        r["when"] = when
        results.append(r)
        log(line(r))
    info["secs"] = time.monotonic() - t0
    if args.keep:
        kept = json.loads(args.keep.read_text())
        results += [r for r in kept["results"] if r["peer"] not in peers]
        results.sort(key=lambda r: list(PEERS).index(r["peer"]))
        cmd += f"; the other columns from an earlier run ({kept['command']})"
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {"config": asdict(cfg), "info": info, "command": cmd, "results": results}
    (args.out / "latest.json").write_text(json.dumps(raw, indent=1))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (args.out / f"soak-{stamp}.json").write_text(json.dumps(raw))
    if not args.no_md:
        write_section(args.md, render(results, cfg, info, cmd))
        plot(results, args.md.parent / "soak.png")
        log(f"wrote {args.md} (section '{cfg.requested_conns:,} connections held') and {args.md.parent / 'soak.png'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
