"""Per-message cost of a typed App, in-process: decode + dispatch + encode, no sockets.

    python bench/micro.py            # best of 5 repeats of 50,000 messages per case
    python bench/micro.py --quick    # 5,000 messages (what tests/test_bench_micro.py runs)

Each case feeds ``{"type":"echo","data":{"message":"hello server!","n":N}}`` (N = 0, 1, ...)
to the App's per-connection dispatcher, ``Dispatcher.message(text)`` (what ``Conn.on_message``
calls for every text message), on a ``Conn`` whose transport only counts the frames written. It is called from a plain loop callback
with the connection's task set aside, as picows' ``data_received`` does, so the App takes its
production path (enter the connection's task, handle, leave). Cases:

- raw baseline: ``msgspec`` decode of the envelope + encode of the reply, nothing else;
- sync handler, request: ``def echo(conn, data) -> Echo`` on a message with an ``id``
  (a sync handler sends through its return value: the reply path);
- async handler, emit: ``await conn.emit("echo", ...)``, no ``id``; the coroutine finishes
  without suspending (bench/servers/tether_server.py's handler);
- async handler, request: ``async def echo(conn, data) -> Echo`` on a message with an ``id``;
- the same with a session (what tether.js and tether.Client get by default, docs/protocol.md
  "Sessions and resume"): the request carries ``seq``, the reply is numbered, carries the
  ack and is kept until the client acks it (the client acks every message, as ours do);
- the whole Python path of the emit case as the server runs it: a frame handed to the picows
  listener (``_Listener.on_ws_frame``, a stand-in for picows' ``WSFrame``) through
  ``Conn.on_message``, the dispatcher and the handler to ``_Listener.write`` and a stand-in
  for picows' ``WSTransport.send`` (what picows and uvloop do in C is not in it).

Every case must write exactly one frame per message, and the first frame is checked, before
anything is timed. The figure is the best repeat's CPU time (this thread's: other processes
on a busy machine do not count) divided by the message count, with the garbage collector off
during a repeat (as timeit does).

``--instructions`` counts instead (valgrind's callgrind, ~1 min): each case run with 1 and
with 3 repeats of 3,000 messages, the difference divided by 6,000, so setup does not count.
The count does not move with the machine's load (hash seed fixed): use it to compare two
trees, e.g. ``PYTHONPATH=other/src python bench/micro.py --instructions``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
from picows import WSMsgType

import tether
from tether.app.dispatch import Dispatcher
from tether.conn import Conn, ConnSettings, make_request
from tether.proto.resume import Inbound
from tether.sessions import Resume, Session
from tether.transport.picows import TransportSettings, _Listener


class Echo(msgspec.Struct):
    message: str
    n: int


class CountingWire:
    """A :class:`tether.conn.Transport` that keeps only the count and the last frame written."""

    def __init__(self) -> None:
        self.frames = 0
        self.last = b""

    def write(self, opcode: int, payload: bytes) -> None:
        self.frames += 1
        self.last = payload

    def write_frame(self, frame: bytes, opcode: int, payload: bytes) -> None:
        self.write(opcode, payload)

    def write_close(self, code: int, reason: str) -> None: ...
    def ping(self, payload: bytes) -> None: ...
    def pong(self, payload: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def disconnect(self) -> None: ...
    def abort(self) -> None: ...


class FakeFrame:
    """What ``_Listener.on_ws_frame`` reads of picows' ``WSFrame``: one whole text frame."""

    msg_type = WSMsgType.TEXT
    fin = True
    rsv1 = rsv2 = rsv3 = False
    last_in_buffer = True

    def __init__(self, text: str) -> None:
        self.text = text
        self.payload_size = len(text)

    def get_payload_as_utf8_text(self) -> str:
        return self.text


class FakeWSTransport:
    """What ``_Listener`` uses of picows' ``WSTransport``: ``send`` counts like CountingWire."""

    def __init__(self, wire: CountingWire) -> None:
        self.wire = wire
        self.underlying_transport = self

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 1)

    def send(self, msg_type: WSMsgType, payload: bytes) -> None:
        self.wire.write(1, payload)  # text: the only type this benchmark sends


def sync_request_app() -> tether.App:
    app = tether.App()

    @app.on("echo")
    def echo(conn: tether.Conn, data: Echo) -> Echo:
        return Echo("Thanks for the message!", data.n)

    return app


def async_emit_app() -> tether.App:
    app = tether.App()

    @app.on("echo")
    async def echo(conn: tether.Conn, data: Echo) -> None:
        await conn.emit("echo", Echo("Thanks for the message!", data.n))

    return app


def async_request_app() -> tether.App:
    app = tether.App()

    @app.on("echo")
    async def echo(conn: tether.Conn, data: Echo) -> Echo:
        return Echo("Thanks for the message!", data.n)

    return app


# -- the raw baseline: what any msgspec server must do per message ------------------------


class EchoIn(msgspec.Struct, tag="echo", tag_field="type"):
    data: Echo
    id: int | str | None = None


class Out(msgspec.Struct, omit_defaults=True):
    type: str
    data: Echo
    id: int | str | None = None


def raw_baseline(wire: CountingWire) -> Callable[[str], object]:
    decode = msgspec.json.Decoder(EchoIn).decode
    encode = msgspec.json.Encoder().encode

    def on_message(text: str) -> None:
        msg = decode(text)
        wire.write(1, encode(Out("echo", Echo("Thanks for the message!", msg.data.n))))

    return on_message


def messages(n: int, *, with_id: bool, session: bool = False) -> list[str]:
    if session:  # each request acks the reply to the one before it
        return [f'{{"type":"echo","data":{{"message":"hello server!","n":{i}}},"id":{i},"seq":{i + 1},"ack":{i}}}' for i in range(n)]
    if with_id:
        return [f'{{"type":"echo","data":{{"message":"hello server!","n":{i}}},"id":{i}}}' for i in range(n)]
    return [f'{{"type":"echo","data":{{"message":"hello server!","n":{i}}}}}' for i in range(n)]


# (label, app factory or None for the raw baseline, messages carry an id, with a session, expected first frame)
# The label FULL_PATH runs through the picows listener (see the module docstring).
FULL_PATH = "async handler, emit, from the picows listener"
CASES: list[tuple[str, Callable[[], tether.App] | None, bool, bool, dict[str, object]]] = [
    ("raw msgspec decode+encode", None, False, False,
     {"type": "echo", "data": {"message": "Thanks for the message!", "n": 0}}),
    ("sync handler, request+reply", sync_request_app, True, False,
     {"type": "reply", "id": 0, "data": {"message": "Thanks for the message!", "n": 0}}),
    ("async handler, emit", async_emit_app, False, False,
     {"type": "echo", "data": {"message": "Thanks for the message!", "n": 0}}),
    ("async handler, request+reply", async_request_app, True, False,
     {"type": "reply", "id": 0, "data": {"message": "Thanks for the message!", "n": 0}}),
    ("async handler, request+reply, session", async_request_app, True, True,
     {"type": "reply", "id": 0, "data": {"message": "Thanks for the message!", "n": 0}, "seq": 1, "ack": 1}),
    (FULL_PATH, async_emit_app, False, False,
     {"type": "echo", "data": {"message": "Thanks for the message!", "n": 0}}),
]


async def setup(
    factory: Callable[[], tether.App] | None, with_session: bool, full_path: bool = False
) -> tuple[asyncio.Task[None] | None, CountingWire, Callable[[Any], object], Session | None]:
    wire = CountingWire()
    if full_path:
        assert factory is not None
        return await setup_listener(factory, wire)
    conn = Conn(wire, make_request("/", (), ("127.0.0.1", 1)), ConnSettings(ping_interval=None))
    if factory is None:
        return None, wire, raw_baseline(wire), None
    session = Session(Resume()) if with_session else None
    if session is not None:
        session.attach(conn)
    dispatcher = Dispatcher(conn, factory().table(), session)
    # The connection's own task, parked in Dispatcher.run (awaiting the next message).
    host = asyncio.get_running_loop().create_task(dispatcher.run())
    await asyncio.sleep(0)
    return host, wire, dispatcher.message, session


async def setup_listener(
    factory: Callable[[], tether.App], wire: CountingWire
) -> tuple[asyncio.Task[None] | None, CountingWire, Callable[[Any], object], Session | None]:
    """The server's picows listener, its Conn and the App's dispatcher, as in production."""
    app = factory()
    started: list[asyncio.Task[None]] = []

    def on_open(conn: Conn) -> None:
        dispatcher = Dispatcher(conn, app.table())
        started.append(asyncio.get_running_loop().create_task(dispatcher.run()))

    settings = TransportSettings(ConnSettings(ping_interval=None))
    listener = _Listener(make_request("/"), on_open, settings, is_client=False)
    transport = FakeWSTransport(wire)
    listener.on_ws_connected(transport)  # type: ignore[arg-type]
    await asyncio.sleep(0)

    def on_frame(frame: FakeFrame) -> None:
        listener.on_ws_frame(transport, frame)  # type: ignore[arg-type]

    return started[0], wire, on_frame, None


def run_case(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], tether.App] | None, texts: list[str], repeats: int,
    with_session: bool = False, full_path: bool = False,
) -> tuple[float, CountingWire, bytes]:
    """Best ns/message over ``repeats`` runs, each called from a loop callback (no current task)."""
    host, wire, on_message, session = loop.run_until_complete(setup(factory, with_session, full_path))
    items: list[object] = [FakeFrame(text) for text in texts] if full_path else list(texts)  # built before timing

    def fresh() -> None:
        """Each repeat sends the same seqs again: a new session stream, not duplicates."""
        if session is not None:
            session.inbound = Inbound()

    def in_callback(fn: Callable[[], int]) -> int:
        done: asyncio.Future[int] = loop.create_future()
        loop.call_soon(lambda: done.set_result(fn()))
        return loop.run_until_complete(done)

    def one_run() -> int:
        fresh()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            start = time.thread_time_ns()  # CPU time: robust to other processes on a busy machine
            for item in items:
                on_message(item)
            return time.thread_time_ns() - start
        finally:
            if gc_was_enabled:
                gc.enable()

    in_callback(lambda: on_message(items[0]) and 0)  # the check: one frame, the expected one
    first = wire.last if wire.frames == 1 else b""
    wire.frames = 0
    best = min(in_callback(one_run) for _ in range(repeats))
    if host is not None:
        host.cancel()
        loop.run_until_complete(asyncio.gather(host, return_exceptions=True))
    return best / len(texts), wire, first


def instructions(cases: list[int]) -> int:
    """Instructions per message of each case, under callgrind (see the module docstring)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("--instructions needs valgrind", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("PYTHONASYNCIODEBUG", None)

    def collected(case: int, repeats: int) -> int:
        cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
               "--messages", "3000", "--repeats", str(repeats), "--case", str(case)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stderr
        found = re.search(r"Collected : ([0-9]+)", out)
        assert found is not None, out[-500:]
        return int(found.group(1))

    print(f"tether micro-benchmark: instructions per message (callgrind); Python {platform.python_version()}, "
          f"msgspec {msgspec.__version__}, {platform.machine()}")
    print()
    print("| case | instructions/message |")
    print("|---|---:|")
    for case in cases:
        count = (collected(case, 3) - collected(case, 1)) / 6000
        print(f"| {CASES[case][0]} | {count:,.0f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 messages per repeat instead of 50,000")
    parser.add_argument("--messages", type=int, help="messages per repeat (overrides --quick)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats per case; the best is reported")
    parser.add_argument("--case", type=int, action="append", help="run only these cases (0-based; repeatable), e.g. under valgrind")
    parser.add_argument("--instructions", action="store_true", help="count instructions per message under callgrind")
    args = parser.parse_args(argv)
    if args.instructions:
        return instructions(args.case if args.case is not None else list(range(len(CASES))))
    n = args.messages or (5_000 if args.quick else 50_000)

    loop = asyncio.new_event_loop()
    loop.set_debug(False)  # PYTHONASYNCIODEBUG=1 (make test) would measure the debug checks
    asyncio.set_event_loop(loop)
    rows = []
    failed = False
    try:
        for index, (label, factory, with_id, with_session, expected) in enumerate(CASES):
            if args.case is not None and index not in args.case:
                continue
            texts = messages(n, with_id=with_id, session=with_session)
            ns, wire, first = run_case(loop, factory, texts, args.repeats, with_session, label == FULL_PATH)
            ok = wire.frames == n * args.repeats and first != b"" and msgspec.json.decode(first) == expected
            if not ok:
                failed = True
                print(f"{label}: {wire.frames} frames for {n * args.repeats} messages, first {first!r}", file=sys.stderr)
            rows.append((label, ns))
    finally:
        asyncio.set_event_loop(None)
        loop.close()

    print(f"tether micro-benchmark: best of {args.repeats} x {n:,} messages, CPU time; Python {platform.python_version()},"
          f" msgspec {msgspec.__version__}, {platform.machine()}")
    print()
    print("| case | ns/message |")
    print("|---|---:|")
    for label, ns in rows:
        print(f"| {label} | {ns:,.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
