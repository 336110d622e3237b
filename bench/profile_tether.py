"""Where tether's time goes: py-spy on the tether echo server under the C=50,K=1 load.

    python bench/profile_tether.py [--seconds 10] [--md docs/benchmarks.md]

Starts bench/servers/tether_server.py pinned to core 0, drives it with the Go
load generator on core 1, runs `py-spy record --format raw` (collapsed stacks,
native frames off, GIL-holding and idle samples both kept) on the server pid, and
writes a summary (self time by function, and inclusive time for the layers
that matter) into the PROFILE section of the Markdown report.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

LAYERS = [  # (label, substring of a frame "function (file)") - inclusive time
    ("picows frame parsing + on_ws_frame dispatch (tether/_picows.py)", "_picows.py"),
    ("envelope decode + validation (msgspec)", "decode"),
    ("handler coroutine (the app's echo)", "echo (tether_server.py"),
    ("conn.emit: encode + send", "emit"),
    ("event loop (uvloop run_forever / select)", "run_forever"),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--md", type=Path, default=bench.ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--raw", type=Path, default=bench.BENCH / "results" / "tether-profile.txt")
    args = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    bench.build(lambda s: None)
    args.raw.parent.mkdir(parents=True, exist_ok=True)
    mode = bench.Mode(runs=1, warmup=1.0, duration=args.seconds + 3, echo_configs=[], idle_n=0, bcast=[])
    srv = bench.Server(bench.PEERS["tether"], 15)
    try:
        gen = bench.Loadgen(["-mode=echo", f"-addr=127.0.0.1:{srv.port}", "-c=50", "-k=1", f"-warmup={mode.warmup}s",
                             f"-duration={mode.duration}s"], lambda e: None)
        time.sleep(1.5)
        # py-spy samples from core 1 (it competes with the generator there, not with the server)
        subprocess.run(["taskset", "-c", bench.LOADGEN_CORE, pyspy, "record", "--pid", str(srv.pid), "--duration",
                        str(int(args.seconds)), "--rate", "250", "--format", "raw", "--idle", "--output",
                        str(args.raw), "--nonblocking"], check=True, capture_output=True)
        res = gen.wait(60)
    finally:
        srv.stop()

    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in args.raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_t[_short(frames[-1])] += n
        for label, needle in LAYERS:
            if any(needle in f for f in frames):
                incl[label] += n

    L = [bench.PROFILE_BEGIN, "", "## Where tether's time goes", ""]
    L.append(f"`python bench/profile_tether.py`: py-spy {_version(pyspy)} sampling the tether echo server at 250 Hz for "
             f"{args.seconds:g} s under the C=50,K=1 load ({res.get('rps', 0):,.0f} round trips/s during the "
             f"profile; py-spy shares core 1 with the generator). {total:,} samples; raw collapsed stacks in "
             f"`{args.raw.relative_to(bench.ROOT) if args.raw.is_relative_to(bench.ROOT) else args.raw}`.")
    L.append("")
    L.append("Inclusive share of samples by layer (a sample can count in several layers):\n")
    L.append("| layer | share |")
    L.append("|---|---|")
    for label, _ in LAYERS:
        L.append(f"| {label} | {incl[label] / total:.0%} |" if total else f"| {label} | - |")
    L.append("")
    L.append("Top 15 functions by self time:\n")
    L.append("| function (file:line) | self |")
    L.append("|---|---|")
    for f, n in self_t.most_common(15):
        L.append(f"| `{f}` | {n / total:.1%} |")
    L.append("")
    L.append(bench.PROFILE_END)
    section = "\n".join(L)
    md = args.md.read_text() if args.md.exists() else "# Benchmarks\n"
    if bench.PROFILE_BEGIN in md and bench.PROFILE_END in md:
        a, b = md.index(bench.PROFILE_BEGIN), md.index(bench.PROFILE_END) + len(bench.PROFILE_END)
        md = md[:a] + section + md[b:]
    else:
        md = md.rstrip() + "\n\n" + section + "\n"
    args.md.write_text(md)
    print(section)
    return 0


def _short(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def _version(pyspy: str) -> str:
    try:
        return subprocess.run([pyspy, "--version"], capture_output=True, text=True, timeout=10).stdout.split()[-1]
    except Exception:
        return ""


if __name__ == "__main__":
    sys.exit(main())
