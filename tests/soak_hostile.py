"""The hostile mix of the fault soak (tests/test_soak_faults.py): one coroutine per kind of bad
peer, each opening one connection, misbehaving, and checking that the server ends it in
bounded time; :func:`keep_arriving` starts them again and again, bounded in count,
concurrency and time.

Kinds (``KINDS``):

- ``non_reader``: a completed handshake with a 4 KiB receive buffer, joined to the room
  ``busy`` (a ticker fills it), never reading again (but its kernel answers, with a closed
  window): the server's keepalive closes it, and the server's side of the TCP connection must
  be gone from the *kernel* (not only from the process: ``/proc/net/tcp``, see
  :class:`KernelSockets`) within ping interval + ping timeout + close timeout;
- ``half_open``: a completed handshake through :class:`HalfOpenProxy`, which then goes dark
  for it (nothing forwarded either way, the client's socket gone, the server's TCP connection
  left open): the server must notice alone (keepalive, close timeout);
- ``cut_mid_frame``: a frame header declaring 64 KiB, half its payload, then RST or FIN;
- ``sigkill``: a ``tether.Client`` process (tests/soak_victim.py) killed with SIGKILL while
  it sends 256 KiB messages and requests;
- ``slowloris``: half an HTTP upgrade request, or a TCP connection with no byte at all:
  dropped by the handshake timeout;
- ``bad_json``: a burst of bad messages (not JSON, bad envelopes, unknown types, invalid data,
  handlers raising), each answered with its error, then a normal close;
- ``violator``: a protocol violation (oversized frame header, binary frame to the App,
  unmasked frame, invalid UTF-8): closed with its code (1009, 1003, 1002, 1007).

Half of the kinds that complete a handshake ask for a session (the server keeps it for the
resume window after the connection is gone), and some join rooms of their own (``tmp-<n>``)
that nobody else uses: sessions and rooms must not pile up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rawws import OP_BINARY, OP_CLOSE, OP_TEXT, RawWS, close_payload

VICTIM = str(Path(__file__).with_name("soak_victim.py"))
SESSION = {"Sec-WebSocket-Protocol": "tether, session"}
HALF_HANDSHAKE = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"

#: /proc/net/tcp's states, by number.
TCP_STATES = {
    1: "established", 2: "syn_sent", 3: "syn_recv", 4: "fin_wait1", 5: "fin_wait2", 6: "time_wait",
    7: "close", 8: "close_wait", 9: "last_ack", 10: "listen", 11: "closing", 12: "new_syn_recv",
}  # fmt: skip
#: States in which the kernel is done with a socket's data (or nearly: timers only).
DONE = {"fin_wait2", "time_wait", "close"}


def kernel_sockets(port: int) -> dict[int, str]:
    """The kernel's IPv4 TCP sockets whose local port is ``port``: remote port -> state."""
    found: dict[int, str] = {}
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split(None, 4)
            local, remote, state = fields[1], fields[2], int(fields[3], 16)
            if int(local[local.index(":") + 1 :], 16) == port:
                found[int(remote[remote.index(":") + 1 :], 16)] = TCP_STATES.get(state, str(state))
    return found


class KernelSockets:
    """Waits until the kernel is done with the server's side of given connections: one read
    of /proc/net/tcp every 0.2 s for every waiter at once."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._poller: asyncio.Task[None] | None = None

    async def gone(self, client_port: int) -> None:
        """Until the server's socket connected to ``client_port`` is gone, or only timers are left."""
        future = self._waiters[client_port] = asyncio.get_running_loop().create_future()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            await future
        finally:
            self._waiters.pop(client_port, None)

    async def _poll(self) -> None:
        while self._waiters:
            await asyncio.sleep(0.2)  # polling the kernel's table
            table = kernel_sockets(self.port)
            for client_port, future in list(self._waiters.items()):
                if table.get(client_port, "close") in DONE and not future.done():
                    future.set_result(None)


@dataclass
class Limits:
    """How long the server may take to end each kind (seconds, already scaled)."""

    keepalive: float  # ping_interval + ping_timeout + close_timeout + slack
    handshake: float  # handshake_timeout + slack
    answer: float  # any answer the server owes now


@dataclass
class Tally:
    """What the hostile mix did: started and finished per kind, what each saw, failures."""

    started: collections.Counter[str] = field(default_factory=collections.Counter)
    done: collections.Counter[str] = field(default_factory=collections.Counter)
    seen: collections.Counter[str] = field(default_factory=collections.Counter)
    reap_times: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, what: str) -> None:
        self.failures.append(f"{kind}: {what}")

    def reaped(self, kind: str, seconds: float) -> None:
        self.reap_times[kind].append(seconds)

    def summary(self) -> str:
        lines = []
        for kind in KINDS:
            times = self.reap_times.get(kind) or []
            reap = f", ended by the server after max {max(times):.2f} s (mean {sum(times) / len(times):.2f})" if times else ""
            lines.append(f"  {kind:14} {self.done[kind]:5} done of {self.started[kind]:5}{reap}")
        lines.append("  seen: " + ", ".join(f"{k} {v}" for k, v in sorted(self.seen.items())))
        return "\n".join(lines)


# -- the half-open proxy -------------------------------------------------------------------------


class _Pipe:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client, self.upstream = client, upstream
        self.dark_since: float | None = None
        self.server_gone = asyncio.Event()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class HalfOpenProxy:
    """A TCP proxy on 127.0.0.1 (:attr:`port`) to ``upstream_port`` that can go dark for one
    connection (:meth:`dark`): from then on nothing is forwarded either way and the client's
    going away is hidden from the server, whose TCP connection stays open until the *server*
    closes it (:meth:`wait_server_gone` says when). Every pipe is closed by then or by
    :meth:`aclose`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: dict[int, _Pipe] = {}  # client's port -> pipe
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> HalfOpenProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def open_pipes(self) -> int:
        return len(self._pipes)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        key = writer.get_extra_info("peername")[1]
        pipe = self._pipes[key] = _Pipe(writer, up_writer)
        loop = asyncio.get_running_loop()
        for source, sink, up in ((reader, up_writer, False), (up_reader, writer, True)):
            task = loop.create_task(self._pump(key, pipe, source, sink, up))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, key: int, pipe: _Pipe, source: asyncio.StreamReader, sink: asyncio.StreamWriter, from_server: bool) -> None:
        try:
            while data := await source.read(65536):
                if pipe.dark_since is None:
                    sink.write(data)
                    await sink.drain()
        except OSError:
            pass
        if from_server or pipe.dark_since is None:
            # The server closed (or, before going dark, either side did): end the pipe.
            if from_server:
                pipe.server_gone.set()
            pipe.close()
            if self._pipes.get(key) is pipe:
                del self._pipes[key]

    def dark(self, client_port: int) -> None:
        """Stop forwarding for the connection from ``client_port``."""
        self._pipes[client_port].dark_since = time.monotonic()

    async def wait_server_gone(self, client_port: int) -> float:
        """Seconds from going dark until the server closed its side."""
        pipe = self._pipes.get(client_port)
        if pipe is None:  # gone already
            return 0.0
        await pipe.server_gone.wait()
        assert pipe.dark_since is not None
        return time.monotonic() - pipe.dark_since

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes.values()):
            pipe.close()
        self._pipes.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


# -- the kinds -----------------------------------------------------------------------------------


@dataclass
class Target:
    """Where the hostile mix goes: the server's port, the proxy, the limits, the tally."""

    port: int
    proxy: HalfOpenProxy
    kernel: KernelSockets
    limits: Limits
    tally: Tally
    rooms: list[str]
    rng: random.Random = field(default_factory=lambda: random.Random(11))
    counter: itertools.count[int] = field(default_factory=itertools.count)
    victims: set[asyncio.subprocess.Process] = field(default_factory=set)


async def _welcome(ws: RawWS, seconds: float) -> dict[str, Any]:
    async with asyncio.timeout(seconds):
        while True:  # room broadcasts may come first
            opcode, _, payload = await ws.recv_frame()
            if opcode == OP_TEXT:
                message: dict[str, Any] = json.loads(payload)
                if message["type"] == "welcome":
                    return message


async def non_reader(t: Target) -> None:
    headers = SESSION if t.rng.random() < 0.5 else None
    ws = await RawWS.open(t.port, "/ws?room=busy", headers, rcvbuf=4096)
    try:
        if ws.status != 101:
            t.tally.fail("non_reader", f"handshake answered {ws.status}")
            return
        began = time.monotonic()
        async with asyncio.timeout(t.limits.keepalive):
            await t.kernel.gone(ws.writer.get_extra_info("sockname")[1])
        t.tally.reaped("non_reader", time.monotonic() - began)
    finally:
        ws.abort()


async def half_open(t: Target) -> None:
    n = next(t.counter)
    session = t.rng.random() < 0.5
    room = t.rng.choice(t.rooms)
    ws = await RawWS.open(t.proxy.port, f"/ws?room={room}&name=ghost{n}", SESSION if session else None)
    client_port = ws.writer.get_extra_info("sockname")[1]
    try:
        if ws.status != 101:
            t.tally.fail("half_open", f"handshake answered {ws.status}")
            return
        await _welcome(ws, t.limits.answer)
        if t.rng.random() < 0.5:  # a room of its own, then silence
            await ws.send_frame(OP_TEXT, json.dumps({"type": "join", "data": {"room": f"tmp-{n}"}, "id": 1}).encode())
        t.proxy.dark(client_port)
    finally:
        ws.abort()  # the client is gone; the proxy keeps the server's side open
    async with asyncio.timeout(t.limits.keepalive):
        t.tally.reaped("half_open", await t.proxy.wait_server_gone(client_port))


async def cut_mid_frame(t: Target) -> None:
    ws = await RawWS.open(t.port, "/ws", SESSION if t.rng.random() < 0.5 else None)
    if ws.status != 101:
        t.tally.fail("cut_mid_frame", f"handshake answered {ws.status}")
        ws.abort()
        return
    await _welcome(ws, t.limits.answer)
    body = json.dumps({"type": "echo", "data": "x" * 65536, "id": 1}).encode()
    ws.writer.write(ws.frame(OP_TEXT, body)[: len(body) // 2])
    await ws.writer.drain()
    if t.rng.random() < 0.5:
        t.tally.seen["cut_rst"] += 1
        ws.abort()
        return
    t.tally.seen["cut_fin"] += 1
    ws.writer.write_eof()  # FIN mid-frame: the server drops the connection, we see its end
    try:
        async with asyncio.timeout(t.limits.answer):
            await ws.eof()
    except ConnectionError:
        pass
    finally:
        ws.abort()


async def sigkill(t: Target) -> None:
    n = next(t.counter)
    url = f"ws://127.0.0.1:{t.port}/ws?room={t.rng.choice(t.rooms)}&name=victim{n}"
    proc = await asyncio.create_subprocess_exec(sys.executable, VICTIM, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    t.victims.add(proc)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(t.limits.answer + 20):  # an interpreter start, on a busy machine
            line = await proc.stdout.readline()
        if line != b"ready\n":
            t.tally.fail("sigkill", f"victim said {line!r}")
            return
        await asyncio.sleep(t.rng.uniform(0.05, 0.5))  # somewhere in its work, most likely mid-message
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
        t.victims.discard(proc)


async def slowloris(t: Target) -> None:
    ws = await RawWS.connect(t.port)
    try:
        if t.rng.random() < 0.7:
            ws.writer.write(HALF_HANDSHAKE)
            t.tally.seen["slowloris_half"] += 1
        else:
            t.tally.seen["slowloris_silent"] += 1
        began = time.monotonic()
        async with asyncio.timeout(t.limits.handshake):
            with contextlib.suppress(ConnectionError):
                await ws.eof()
        t.tally.reaped("slowloris", time.monotonic() - began)
    finally:
        ws.abort()


#: Bad messages and the error code each gets (``id``: whether it can carry one).
BAD = [
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_envelope"),
    (b'{"type": 5, "id": 1}', "bad_envelope"),
    (b'{"type": "nope", "id": 2}', "unknown_type"),
    (b'{"type": "say", "data": {"room": 1}, "id": 3}', "invalid_data"),
    (b'{"type": "boom", "data": "hostile", "id": 4}', "internal"),
    ("{\"type\": \"echo\", \"data\": \"\u00e9\", \"id\": ".encode(), "bad_json"),
]


async def bad_json(t: Target) -> None:
    ws = await RawWS.open(t.port, "/ws")
    try:
        if ws.status != 101:
            t.tally.fail("bad_json", f"handshake answered {ws.status}")
            return
        await _welcome(ws, t.limits.answer)
        burst = [t.rng.choice(BAD) for _ in range(100)]
        ws.writer.write(b"".join(ws.frame(OP_TEXT, payload) for payload, _ in burst))
        got: list[str] = []
        async with asyncio.timeout(t.limits.answer):
            while len(got) < len(burst):
                opcode, _, payload = await ws.recv_frame()
                if opcode == OP_TEXT:
                    message = json.loads(payload)
                    if message["type"] == "error":
                        got.append(message["data"]["code"])
        if got != [code for _, code in burst]:
            t.tally.fail("bad_json", f"errors {collections.Counter(got)} for {collections.Counter(c for _, c in burst)}")
        t.tally.seen["bad_messages"] += len(got)
        await ws.send_frame(OP_CLOSE, close_payload(1000))
        async with asyncio.timeout(t.limits.answer):
            code, _ = await ws.close_frame()
        if code != 1000:
            t.tally.fail("bad_json", f"closed with {code}")
    finally:
        ws.abort()


async def violator(t: Target) -> None:
    ws = await RawWS.open(t.port, "/ws")
    try:
        if ws.status != 101:
            t.tally.fail("violator", f"handshake answered {ws.status}")
            return
        await _welcome(ws, t.limits.answer)
        how = t.rng.randrange(4)
        if how == 0:
            ws.writer.write(ws.frame(OP_TEXT, b"", length=2 << 20))  # a 2 MiB header, over the limit
            expected = 1009
        elif how == 1:
            ws.writer.write(ws.frame(OP_BINARY, b"\x00\x01"))
            expected = 1003
        elif how == 2:
            ws.writer.write(ws.frame(OP_TEXT, b'{"type": "echo"}', mask=False))
            expected = 1002
        else:
            ws.writer.write(ws.frame(OP_TEXT, b'{"type": "echo", "data": "caf\xc3"}'))
            expected = 1007
        async with asyncio.timeout(t.limits.answer):
            code, _ = await ws.close_frame()
        t.tally.seen[f"closed_{code}"] += 1
        if code != expected:
            t.tally.fail("violator", f"closed with {code}, expected {expected}")
    finally:
        ws.abort()


Kind = Callable[[Target], Awaitable[None]]

#: kind -> (its coroutine, seconds between arrivals, most running at once)
KINDS: dict[str, tuple[Kind, float, int]] = {
    "non_reader": (non_reader, 1.0, 8),
    "half_open": (half_open, 1.0, 8),
    "cut_mid_frame": (cut_mid_frame, 0.5, 4),
    "sigkill": (sigkill, 4.0, 2),
    "slowloris": (slowloris, 0.5, 8),
    "bad_json": (bad_json, 1.0, 2),
    "violator": (violator, 1.0, 2),
}


async def _one(t: Target, name: str, kind: Kind) -> None:
    t.tally.started[name] += 1
    try:
        await kind(t)
    except TimeoutError as exc:
        t.tally.fail(name, f"not ended in time: {exc or 'timeout'}")
    except (OSError, asyncio.IncompleteReadError, AssertionError, ValueError, KeyError) as exc:
        t.tally.fail(name, repr(exc))
    else:
        t.tally.done[name] += 1


async def keep_arriving(t: Target, name: str, stop: asyncio.Event, max_count: int) -> None:
    """Start ``name`` every so often (at most its concurrency at once, at most ``max_count``
    in all) until ``stop``; then wait for those still running (each bounded by its own
    deadlines)."""
    kind, every, most = KINDS[name]
    running: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    for _ in range(max_count):
        if stop.is_set():
            break
        if len(running) < most:
            task = loop.create_task(_one(t, name, kind))
            running.add(task)
            task.add_done_callback(running.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)  # the pace of arrivals
    if running:
        await asyncio.wait(running)
