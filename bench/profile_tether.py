"""Where tether's time goes: py-spy on the tether echo server under the C=50,K=1 load.

    python bench/profile_tether.py [--seconds 10] [--md docs/benchmarks.md] [--tether-src DIR] [--native]

Starts bench/servers/tether_server.py pinned to core 0, drives it with the Go
load generator on core 1, runs `py-spy record --format raw` (collapsed stacks,
native frames off, idle samples dropped) on the server pid, and
writes a summary (self time by function, and inclusive time for the layers
by layer) into the PROFILE section of the Markdown report.
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

DISPATCH = "tether/app/dispatch.py"


def _decode_line() -> str:
    """file:line of the envelope decode call in the dispatcher (found in the source, which moves)."""
    src = bench.ROOT / "src" / DISPATCH
    for i, line in enumerate(src.read_text().splitlines(), 1):
        if ".decoder.decode(" in line:
            return f"{DISPATCH}:{i}"
    return f"{DISPATCH}:?"


def _send_lines() -> set[str]:
    """file:line of the calls to picows' send that Conn makes itself (``Conn.write_directly``)."""
    src = bench.ROOT / "src" / "tether/conn.py"
    return {f"tether/conn.py:{i}" for i, line in enumerate(src.read_text().splitlines(), 1)
            if "direct(opcode, payload)" in line}


_SENDS = _send_lines()


def category(frame: str, decode_at: str) -> str:
    """Self time of a leaf frame -> a layer. C code is charged to the Python line that called it."""
    name, _, where = frame.partition(" (")
    if where.startswith(decode_at):
        return "msgspec: decode + validate the envelope (C, called from Dispatcher.message)"
    if name.endswith("_Listener.write") or where.rstrip(")") in _SENDS:
        return "picows transport.send: frame + write(2) syscall (C, called from Conn.write, or _Listener.write when corked)"
    if name == "encode_message" or "msgspec" in where:
        return "msgspec: encode the reply (C)"
    if "asyncio/runners.py" in where or "uvloop" in where or "asyncio/base_events" in where:
        return "uvloop: epoll, socket reads, picows frame parsing, callback dispatch (C)"
    if where.startswith("tether/"):
        return "tether Python: listener, Conn, dispatcher, stepping the handler"
    if "tether_server.py" in where:
        return "the app's handler"
    return "other"



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--md", type=Path, default=bench.ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--raw", type=Path, default=bench.BENCH / "results" / "tether-profile.txt")
    ap.add_argument("--tether-src", type=Path, help="the src/ directory tether is imported from (e.g. a mypyc build)")
    ap.add_argument("--native", action="store_true", help="py-spy --native: C frames too (compiled modules show "
                    "only there)")
    args = ap.parse_args()
    if args.tether_src:
        bench.TETHER_SRC = args.tether_src.resolve()
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
                        str(int(args.seconds)), "--rate", "250", "--format", "raw", "--output",
                        str(args.raw), "--nonblocking", *(["--native"] if args.native else [])], check=True,
                       capture_output=True)
        res = gen.wait(60)
    finally:
        srv.stop()

    self_t: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    decode_at = _decode_line()
    total = 0
    for line in args.raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        leaf = _short(stack.split(";")[-1])
        self_t[leaf] += n
        cats[category(leaf, decode_at)] += n

    L = [bench.PROFILE_BEGIN, "", "## Where tether's time goes", ""]
    L.append(f"`python bench/profile_tether.py`: py-spy {_version(pyspy)} sampling the tether echo server at 250 Hz for "
             f"{args.seconds:g} s under the C=50,K=1 load ({res.get('rps', 0):,.0f} round trips/s during the "
             f"profile; py-spy shares core 1 with the generator). {total:,} samples; raw collapsed stacks in "
             f"`{args.raw.relative_to(bench.ROOT) if args.raw.is_relative_to(bench.ROOT) else args.raw}`.")
    L.append("")
    L.append("Self time by layer (py-spy sees Python frames: time in C code is charged to the Python line "
             "that called it, which is how the C layers below are told apart):\n")
    L.append("| layer | share of busy samples |")
    L.append("|---|---|")
    for label, n in cats.most_common():
        L.append(f"| {label} | {n / total:.0%} |")
    L.append("")
    def share(prefix: str) -> str:
        n = sum(v for k, v in cats.items() if k.startswith(prefix))
        return f"{n / total:.0%}" if total else "-"

    L.append(
        f"Reading it: about {share('picows transport.send')} of the busy time is `transport.send`, i.e. one "
        f"`write(2)` per reply; {share('uvloop')} is uvloop's C loop (epoll, socket reads, picows parsing the "
        f"frame); msgspec's decode + validate and encode together are ~{share('msgspec')}. The rest, "
        f"{share('tether Python')}, is tether's Python glue per message: `_Listener.on_ws_frame`, "
        "`Conn.on_message`, `Dispatcher.message`, stepping the handler coroutine eagerly, `Conn.emit`/"
        "`write` (py-spy charges a frame's time to the line it is on, so a few percent of C calls may show on the "
        "line after them). `python bench/micro.py --instructions` counts that Python path per message, "
        "without the machine's noise.\n"
    )
    L.append("Top 15 functions by self time:\n")
    L.append("| function (file:line) | code at that line when profiled | self |")
    L.append("|---|---|---|")
    for f, n in self_t.most_common(15):
        code = _code(f).replace("|", "\\|")
        L.append(f"| `{f}` | {'`' + code + '`' if code else ''} | {n / total:.1%} |")
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


def _code(frame: str) -> str:
    where = frame.partition(" (")[2].rstrip(")")
    path, _, line = where.rpartition(":")
    for base in (bench.ROOT / "src", bench.BENCH / "servers"):
        f = base / path
        if path and line.isdigit() and f.is_file():
            lines = f.read_text().splitlines()
            return lines[int(line) - 1].strip()[:90] if int(line) <= len(lines) else ""
    return ""


def _version(pyspy: str) -> str:
    try:
        return subprocess.run([pyspy, "--version"], capture_output=True, text=True, timeout=10).stdout.split()[-1]
    except Exception:
        return ""


if __name__ == "__main__":
    sys.exit(main())
