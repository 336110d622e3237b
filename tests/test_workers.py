"""N worker processes on one port (SO_REUSEPORT) sharing rooms through Redis, and the parent
that supervises them: restarts, backoff for a worker that fails at start-up, giving up.

The supervisor tests run ``serve_workers`` in a real parent process and read its log lines,
which carry the time they were logged: the backoff is checked on those times."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Callable

import pytest

import tether
from tether.rooms.broker import MemoryBroker
from tests.conftest import timeout, within
from tests.redis_fixture import AppProcess, Peer, RedisServer, app_processes, close_peers, eventually, free_port, redis_server  # noqa: F401
from tests.test_redis import _names, _said

Start = Callable[..., AppProcess]


@pytest.mark.redis
async def test_workers_share_one_port_and_rooms(redis_server: RedisServer, app_processes: Start) -> None:
    server = app_processes(redis_server.url, "--workers", "2")
    async with timeout(30):
        peers: list[Peer] = []
        pids: set[int] = set()
        for i in range(40):  # SO_REUSEPORT spreads connections by hash: both workers appear soon
            peer = await Peer.open(server.url, name=f"w{i}", room="lobby")
            pids.add((await peer.request("whoami"))["pid"])
            peers.append(peer)
            if len(pids) == 2 and i >= 5:
                break
        assert len(pids) == 2
        await peers[0].request("say", {"room": "lobby", "text": "one"})
        await peers[0].request("say", {"room": "lobby", "text": "two"})
        await _said(peers, ["one", "two"])
        assert await _names(peers[0], "lobby") == sorted(f"w{i}" for i in range(len(peers)))


def test_workers_without_shared_broker_are_refused() -> None:
    with pytest.raises(ValueError, match="shared broker"):
        tether.run(lambda conn: conn.close(), port=0, workers=2)
    with pytest.raises(ValueError, match="shared broker"):
        tether.serve_workers({"/": tether.App()}, port=0, workers=2, broker=MemoryBroker())


# -- the supervisor: real parent and worker processes ------------------------------------------
# The worker app, run as a script: a handler answering its pid; a "shared" in-memory broker (so
# workers=2 is allowed: nothing here needs shared rooms) whose start fails in worker 0 (FAIL=first),
# in every worker (all), or never (none). Extra arguments are serve_workers settings.
WORKERS_APP = '''
import logging, multiprocessing, os, sys
import tether

logging.basicConfig(level=logging.INFO, format="%(created).3f %(process)d %(levelname)s %(message)s")


class Shared(tether.MemoryBroker):
    shared = True

    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    async def start(self, node, deliver):
        name = multiprocessing.current_process().name
        if self.fail == "all" or (self.fail == "first" and name.endswith("-0")):
            raise RuntimeError(name + ": the broker cannot start")
        await super().start(node, deliver)


async def pid(conn):
    async for _ in conn:
        await conn.send(str(os.getpid()))


port, fail, *extra = sys.argv[1:]
settings = {"max_failed_starts": int(extra[0]), "stable_after": float(extra[1])} if extra else {}
tether.run({"/socket": pid}, "127.0.0.1", int(port), workers=2, broker=Shared(fail), ping_interval=None, shutdown_timeout=2.0, **settings)
'''

#: The parent's log line for a worker that died before it ran ``stable_after`` seconds.
FAILED_START = r"worker (\d) \(pid \d+\) exited with exit status 1 [\d.]+s after its start \(failed start (\d) of (\d)\); (?:restarting it in ([\d.]+)s|giving up)"


class Parent:
    """``serve_workers`` in a process of its own (the script above), with its log lines."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc, self.port = proc, port
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._reader = asyncio.get_running_loop().create_task(self._read(proc.stderr))

    @classmethod
    async def start(cls, tmp_path: Path, fail: str, *settings: str) -> Parent:
        script = tmp_path / "workers_app.py"
        script.write_text(WORKERS_APP)
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(port), fail, *settings, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        return cls(proc, port)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.lines.append(line.decode().rstrip())

    def records(self, pattern: str, start: int = 0) -> list[tuple[float, re.Match[str]]]:
        """``(time logged, match)`` of every line from line ``start`` on that matches."""
        found = []
        for line in self.lines[start:]:
            stamp, _, rest = line.partition(" ")
            match = re.search(pattern, rest)
            if match and stamp.replace(".", "").isdigit():
                found.append((float(stamp), match))
        return found

    async def logged(self, pattern: str, start: int = 0, seconds: float = 10) -> re.Match[str]:
        async def seen() -> bool:
            return bool(self.records(pattern, start))

        await eventually(seen, seconds, f"the parent logs {pattern!r}")
        return self.records(pattern, start)[0][1]

    async def pid(self) -> int:
        """The pid of the worker that answers a new connection."""
        async with tether.connect(f"ws://127.0.0.1:{self.port}/socket") as conn:
            await conn.send("pid?")
            return int(await conn.receive())

    async def served_by(self, pid: int, tries: int = 200) -> None:
        """Connect until worker ``pid`` answers (SO_REUSEPORT spreads connections by hash)."""
        for _ in range(tries):
            try:
                if await self.pid() == pid:
                    return
            except (OSError, tether.ConnectionClosed, tether.InvalidHandshake):
                await asyncio.sleep(0.05)  # a worker is starting: poll again
        raise AssertionError(f"worker {pid} never answered in {tries} connections")

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await within(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await within(self._reader, 5)


@pytest.fixture
async def parents() -> AsyncIterator[list[Parent]]:
    started: list[Parent] = []
    yield started
    for parent in started:
        await parent.stop()


def _uptime(pid: int) -> float:
    """Seconds since process ``pid`` started (/proc, in clock ticks since boot)."""
    with open(f"/proc/{pid}/stat") as f:
        started = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started / os.sysconf("SC_CLK_TCK")


def _backed_off(records: list[tuple[float, re.Match[str]]], delays: list[float]) -> None:
    """The failed starts announce ``delays``, and each next one came no sooner."""
    assert [float(m[4]) for _, m in records[:-1]] == delays, [m[0] for _, m in records]
    for (before, _), (after, _), delay in zip(records, records[1:], delays, strict=False):
        assert after - before >= delay - 0.01, (after - before, delay)


async def test_worker_failing_at_start_backs_off_then_parent_stops_the_others_and_exits_1(tmp_path: Path, parents: list[Parent]) -> None:
    parent = await Parent.start(tmp_path, "first", "3", "10")
    parents.append(parent)
    async with timeout(30):
        pids = await parent.logged(r"with 2 workers \(pids \[(\d+), (\d+)\]\)")
        await parent.served_by(int(pids[2]))  # worker 1 serves while worker 0 keeps failing
        conn = await tether.connect(f"ws://127.0.0.1:{parent.port}/socket")
        await conn.send("pid?")
        assert await conn.receive() == pids[2]
        assert await parent.proc.wait() == 1
        await conn.wait_closed()
        assert conn.close_code == 1001  # worker 1 was shut down gracefully
    await within(parent._reader, 5)
    failed = parent.records(FAILED_START)
    assert [(m[1], m[2], m[3]) for _, m in failed] == [("0", "1", "3"), ("0", "2", "3"), ("0", "3", "3")]
    assert failed[-1][1][0].endswith("giving up")
    _backed_off(failed, [0.5, 1.0])
    assert parent.records(r"worker 0 failed to start 3 times in a row; stopping the other workers, exiting with status 1")
    assert parent.records(rf"worker 1 \(pid {pids[2]}\) stopped: exit status 0")
    assert not parent.records(r"worker 1 \(pid \d+\) exited")


async def test_worker_killed_after_running_fine_is_restarted_every_time(tmp_path: Path, parents: list[Parent]) -> None:
    # One failed start would be enough to give up: a worker that ran stable_after is no failed start.
    parent = await Parent.start(tmp_path, "none", "1", "1")
    parents.append(parent)
    async with timeout(40):
        pids = await parent.logged(r"with 2 workers \(pids \[(\d+), (\d+)\]\)")
        victim, other = int(pids[1]), int(pids[2])
        for _ in range(2):
            await parent.served_by(victim)

            async def ran_fine(victim: int = victim) -> bool:
                return _uptime(victim) > 1.5

            await eventually(ran_fine, 5, "the worker runs longer than stable_after")
            mark = len(parent.lines)
            os.kill(victim, signal.SIGKILL)
            await parent.logged(rf"worker 0 \(pid {victim}\) exited with signal SIGKILL after running [\d.]+s; restarting it", mark)
            victim = int((await parent.logged(r"worker 0 restarted \(pid (\d+)\)", mark))[1])
        await parent.served_by(victim)
        await parent.served_by(other)  # never restarted
        assert parent.proc.returncode is None
        parent.proc.terminate()
        assert await parent.proc.wait() == 0
    assert not parent.records("failed start")


@pytest.mark.slow
async def test_run_with_workers_that_never_start_exits_1_after_five_failed_starts(tmp_path: Path, parents: list[Parent]) -> None:
    parent = await Parent.start(tmp_path, "all")  # tether.run's defaults
    parents.append(parent)
    async with timeout(40):
        assert await parent.proc.wait() == 1
    await within(parent._reader, 5)
    gave_up = parent.records(r"worker (\d) failed to start 5 times in a row; stopping the other workers, exiting with status 1")
    assert len(gave_up) == 1
    failed = parent.records(FAILED_START)
    for index in "01":
        mine = [(t, m) for t, m in failed if m[1] == index]
        # The other worker, as far as it got when the first gave up: its 5th start was under way.
        assert [m[2] for _, m in mine] == ["1", "2", "3", "4", "5"][: len(mine)] and len(mine) >= 4
        _backed_off(mine, [0.5, 1.0, 2.0, 4.0][: len(mine) - 1])
        assert (len(mine) == 5) == (index == gave_up[0][1][1])
