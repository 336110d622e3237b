"""The benchmark harness works end to end (quick mode): it builds the Go load generator,
starts fresh servers, measures, and writes the raw JSON, the Markdown report and the plot.
The numbers themselves are not checked, only that they were measured: per server CPU-second
figures, the generator's own cost beside them, broadcast fan-out times."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"

pytestmark = [
    pytest.mark.skipif(shutil.which("go") is None, reason="needs Go to build bench/loadgen"),
    pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)"),
    pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="pins server and generator to cores 0 and 1"),
]

PEERS = ["tether", "picows-msgspec", "websockets"]


@pytest.mark.timeout(300)
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("websockets")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--quiet", "--peers", ",".join(PEERS),
         "--bcast-peers", "tether,websockets", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    raw = json.loads((tmp_path / "latest.json").read_text())
    tasks = raw["tasks"]
    assert {t["peer"] for t in tasks} == set(PEERS)
    assert all(t["error"] is None for t in tasks), [t["error"] for t in tasks if t["error"]]

    echo = {t["peer"]: t["result"] for t in tasks if t["kind"] == "echo"}
    for peer in PEERS:
        r = echo[peer]
        assert r["msgs"] > 0 and r["rps"] > 0
        assert r["errors"] == 0 and r["mismatched"] == 0 and r["bad"] == 0
        assert 0 < r["p50_us"] <= r["p99_us"]
        assert r["peak_rss_kib"] > 0
        # the primary figures: per server CPU-second, from the generator's own samples of /proc/PID/stat
        assert r["server_cpu_s"] > 0 and r["cpu_s_per_100k"] > 0
        assert r["rt_per_server_cpu_s"] > 0 and r["server_us_per_rt"] > 0
        assert r["server_cpu_s_runner"] is not None  # the runner's cross-check was taken too
        # the generator's own cost, beside every run
        assert r["gen_us_per_rt"] > 0 and 0 < r["gen_cpu_frac"] <= 1.5
        assert r["allocs"] < 1000  # no allocation per message (a few hundred round trips at least)
        assert r["slow_checks"] <= r["c"]  # every reply after a connection's first matched its template
    assert echo["tether"]["other"] >= 1  # the welcome message was read and skipped

    idle = {t["peer"]: t["result"] for t in tasks if t["kind"] == "idle"}
    assert set(idle) == set(PEERS)
    assert all(r["connections"] == raw["mode"]["idle_n"] for r in idle.values())

    bcasts = {t["peer"]: t["result"] for t in tasks if t["kind"] == "bcast"}
    assert set(bcasts) == {"tether", "websockets"}
    for b in bcasts.values():
        assert b["timed_out"] == 0 and b["errors"] == 0
        assert b["broadcasts"] > 0 and b["delivered"] >= b["receivers"] * (b["broadcasts"] - b["inflight"])
        assert b["deliveries_per_s"] > 0 and b["deliveries_per_server_cpu_s"] > 0
        assert b["lat_broadcasts"] == raw["mode"]["bcast_lat"] and 0 < b["last_ms_p50"] <= b["last_ms_p99"]
        assert b["gen_us_per_delivery"] > 0
        assert b["slow_checks"] <= b["receivers"] and b["allocs"] < 1000  # tether's varying "off" included

    # every figure has a ratio to tether measured in the same run
    summary = raw["summary"]
    assert summary["cpu_c50_k1"]["rows"]["websockets"]["ratio"] > 0
    assert summary["rps_c50_k1"]["rows"]["websockets"]["ratio"] > 0
    assert summary["bcpu100"]["rows"]["websockets"]["ratio"] > 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| **tether**" in md and "websockets + uvloop" in md and "benchmarks.png" in md
    assert "| peer | rt per server CPU-s | ×tether |" in md  # per-CPU first
    assert "generator µs/rt" in md and "generator µs/delivery" in md and "## The load generator's cost" in md
    assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(120)
def test_loadgen_selftest_and_checks(tmp_path: Path) -> None:
    """The generator's self-test against its trivial server prints its cost; a server that answers
    wrongly fails the measurement."""
    loadgen = _build(tmp_path)
    proc = subprocess.run([str(loadgen), "-mode=selftest", "-configs=10x1,10x4", "-warmup=0.1s", "-duration=0.3s"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("new ")]  # this generator
    assert len(lines) == 2 and all("generator" in ln and "us/rt" in ln and "ERROR" not in ln for ln in lines)

    # a server that replies with the wrong n: the trivial server, asked with a broken frame pool, cannot
    # be made to lie, so use a tiny Python one
    srv = subprocess.Popen([sys.executable, "-c", _LIAR], stdout=subprocess.PIPE, text=True)
    try:
        port = srv.stdout.readline().strip()  # type: ignore[union-attr]
        proc = subprocess.run([str(loadgen), "-mode=echo", f"-addr=127.0.0.1:{port}", "-c=2", "-k=1",
                               "-warmup=0.1s", "-duration=0.3s", "-timeout=5s"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1 and '"error"' in proc.stdout
        assert "not in flight" in proc.stdout or "invalid" in proc.stdout
    finally:
        srv.kill()
        srv.wait()
        srv.stdout.close()  # type: ignore[union-attr]


# A WebSocket server (just enough of one) that answers every request with n + 1.
_LIAR = r"""
import base64, hashlib, re, socket, threading
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(8); print(ls.getsockname()[1], flush=True)
CRLF2 = b"\r\n\r\n"
def serve(c):
    buf = b""
    while CRLF2 not in buf:
        buf += c.recv(4096)
    key = re.search(rb"Sec-WebSocket-Key: *(\S+)", buf, re.I).group(1)
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Accept: " + acc + CRLF2)
    buf = buf.split(CRLF2, 1)[1]
    while True:
        while len(buf) < 6 or len(buf) < 6 + (buf[1] & 0x7F):
            d = c.recv(4096)
            if not d:
                return
            buf += d
        n = buf[1] & 0x7F; mask = buf[2:6]; p = bytes(b ^ mask[i % 4] for i, b in enumerate(buf[6:6 + n]))
        buf = buf[6 + n:]
        if b'"echo"' in p:
            v = int(re.search(rb'"n":(\d+)', p).group(1)) + 1
            out = b'{"type":"echo","data":{"message":"Thanks for the message!","n":%d}}' % v
            c.sendall(bytes([0x81, len(out)]) + out)
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _build(tmp_path: Path) -> Path:
    loadgen = tmp_path / "loadgen"
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode")
    subprocess.run(["go", "build", "-o", str(loadgen), "."], cwd=ROOT / "bench" / "loadgen", env=env, check=True,
                   timeout=240)
    return loadgen


@pytest.mark.timeout(300)
def test_loadgen_unit() -> None:
    """bench/loadgen/frames_test.go: pooled frames unmask to the request, templates, full checks."""
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode", GOFLAGS="-count=1")
    proc = subprocess.run(["go", "test", "."], cwd=ROOT / "bench" / "loadgen", env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_loadgen_refuses_non_loopback(tmp_path: Path) -> None:
    loadgen = _build(tmp_path)
    proc = subprocess.run([str(loadgen), "-addr", "10.0.0.1:80"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "127.0.0.1" in proc.stderr
