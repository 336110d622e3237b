"""The benchmark harness works end to end (quick mode): it builds the Go load generator,
starts fresh servers, measures, and writes the raw JSON, the Markdown report and the plot.
The numbers themselves are not checked, only that they were measured."""

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
        assert r["errors"] == 0 and r["mismatched"] == 0
        assert 0 < r["p50_us"] <= r["p99_us"]
        assert r["server_cpu_s"] > 0 and r["cpu_s_per_100k"] > 0
        assert r["peak_rss_kib"] > 0
        assert 0 < r["gen_cpu_frac"] <= 1.5
    assert echo["tether"]["other"] >= 1  # the welcome message was read and skipped

    idle = {t["peer"]: t["result"] for t in tasks if t["kind"] == "idle"}
    assert set(idle) == set(PEERS)
    assert all(r["connections"] == raw["mode"]["idle_n"] for r in idle.values())

    bcasts = {t["peer"]: t["result"] for t in tasks if t["kind"] == "bcast"}
    assert set(bcasts) == {"tether", "websockets"}
    for bcast in bcasts.values():
        assert bcast["delivered"] == bcast["receivers"] * bcast["broadcasts"] and bcast["timed_out"] == 0

    # every figure has a ratio to tether measured in the same run
    assert raw["summary"]["rps_c50_k1"]["rows"]["websockets"]["ratio"] > 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| tether |" in md and "websockets + uvloop" in md and "benchmarks.png" in md
    assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loadgen_refuses_non_loopback(tmp_path: Path) -> None:
    loadgen = tmp_path / "loadgen"
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode")
    subprocess.run(["go", "build", "-o", str(loadgen), "."], cwd=ROOT / "bench" / "loadgen", env=env, check=True, timeout=240)
    proc = subprocess.run([str(loadgen), "-addr", "10.0.0.1:80"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "127.0.0.1" in proc.stderr
