"""Zero loss under chaos across real worker processes (issue 12): ``tether run --workers 2
--broker redis://...`` serving tests/test_chaos.py's workload, the client behind the chaos proxy.

The app (tests/servers/chaos_workers_app.py) runs in two forked workers on one port; the proxy
has that one port as its backend and the kernel (``SO_REUSEPORT``) hands each new connection to
one of the workers, so after a cut the client lands on either: a resume on the other worker
takes the session over through Redis. The proxy cuts each connection after 100-500 ms while:

- the room ``feed`` gets 10,000 broadcasts, published by the workers themselves: the test holds
  one unproxied publisher connection to each worker and asks both each round (``publish``) to
  broadcast their share of 50 (worker 0 the even n, worker 1 the odd n). Not a separate
  publisher process: this way the broadcasts go through ``app.broadcast`` in the processes that
  serve the client, as an app's do, from both of them at once (the room's Redis stream orders
  them; ``check(publishers=2)``: each one's order is kept), and every move changes which of
  them is the client's own process;
- the client sends 10,000 one-way ``note`` and 1,000 ``work`` requests (paced as in
  tests/test_chaos.py).

The ledger outlives the processes: the handlers record into Redis (the notes in order, the
executions of each request, the worker of each connection), and the test reads it back for
tests/test_chaos.py's ``check`` (0 lost, 0 duplicated, order kept, every request executed exactly
once; the counts printed). Then: the client landed on both workers, moved between them, and
both handled its messages. For the Python client and for tether.js in headless Chromium
(tests/test_chaos_browser.py's page).

With handlers that take 2 ms (slower than the client sends) the same run once executed 834
messages and 93 requests twice: a connection whose session moved on still handled what was
queued in its inbox (see that test; fixed by Session.holds).

``CHAOS_RESUME=0`` runs the same tests with clients that have sessions off (``resume=False`` /
``resume: false``): they must fail, with the counts. ``CHAOS_DUMP=<dir>`` writes the workers'
trace (every record in the order Redis got it) and their log there, to see what went wrong.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from chaos_proxy import ChaosProxy
from conftest import TIMEOUT_SCALE, timeout
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from test_chaos import BROADCASTS, MESSAGES, REQUESTS, Ledger, check
from test_chaos_browser import MS, browser, static  # noqa: F401  (fixtures)

import tether
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401  (fixture)
from tests.servers.chaos_workers_app import CONNS, NOTES, NOTES_BY_PID, TRACE, WORK, WORK_BY_PID
from tests.tether_run import TetherRun, Typed, tether_run  # noqa: F401  (fixture)
from tether.proto.backoff import Backoff

RESUME = os.environ.get("CHAOS_RESUME", "1") != "0"  # 0: clients without sessions (must fail)
ROUND = 50  # broadcasts per round, half from each worker
SENDER = 60  # s (scaled): the most the client may take to send everything and get its replies
SETTLE = 30  # s (scaled): the most the last messages may take once the cuts stopped
SLOW_HANDLER = 0.002  # s: each handler's time in the slow-handlers test


@dataclass
class Workers:
    proc: TetherRun
    pids: list[int]
    redis: aioredis.Redis
    publishers: list[Typed]  # publishers[i] is connected to the worker pids[i]

    @property
    def port(self) -> int:
        return self.proc.port


@pytest.fixture
async def workers(
    request: pytest.FixtureRequest, redis_server: RedisServer, tether_run: Callable[..., TetherRun], static: Path  # noqa: F811
) -> AsyncIterator[Workers]:
    """``tether run chaos_workers_app:routes --workers 2 --broker <redis>`` (serving the chaos page
    too), and a publisher connection to each worker. (Redis first: it stops last.)

    Parametrized indirectly with the seconds each handler takes (``CHAOS_HANDLER_DELAY``, 0 by
    default). The workers run as deployed, without asyncio debug mode (the test's own process
    keeps it): debug mode makes every worker several times slower, and a worker slower than
    its client is what ``test_..._slow_handlers`` is about."""
    delay = getattr(request, "param", 0.0)
    env = {"CHAOS_REDIS": redis_server.url, "CHAOS_HANDLER_DELAY": str(delay), "PYTHONASYNCIODEBUG": ""}
    proc = await tether_run(
        "chaos_workers_app:routes", "--workers", "2", "--broker", redis_server.url, "--static", str(static),
        "--allowed-origins", "*", "--timeout-graceful-shutdown", "3", env=env,
    ).start(60)
    parent = await proc.wait_line(lambda text: " workers (pids " in text)
    pids = [int(p) for p in re.findall(r"\d+", parent.partition(" workers (pids ")[2])]
    assert len(pids) == 2, parent
    ledger = aioredis.Redis.from_url(redis_server.url)
    by_pid: dict[int, Typed] = {}
    extra: list[Typed] = []
    try:
        async with timeout(30):
            for _ in range(64):  # SO_REUSEPORT spreads connections by hash: both workers appear soon
                publisher = Typed(await tether.connect(f"ws://127.0.0.1:{proc.port}/app?role=publisher"))
                pid = await publisher.request("whoami")
                if pid in by_pid:
                    extra.append(publisher)
                else:
                    by_pid[pid] = publisher
                if len(by_pid) == 2:
                    break
        for publisher in extra:
            await publisher.conn.close()
        assert sorted(by_pid) == sorted(pids), f"one publisher per worker: {sorted(by_pid)} vs {pids}"
        yield Workers(proc, pids, ledger, [by_pid[pid] for pid in pids])
    finally:
        for publisher in [*by_pid.values(), *extra]:
            with suppress(tether.TetherError, OSError):
                await publisher.conn.close()
        await ledger.aclose()


async def broadcaster(workers: Workers) -> None:
    """10,000 ticks to ``feed``: each round, worker i broadcasts n = round + i, + 2, ... (its
    half), both at once; a steady feed over seconds, not one burst."""
    count = len(workers.publishers)
    for first in range(0, BROADCASTS, ROUND):
        await asyncio.gather(*(
            p.request("publish", {"first": first + i, "count": ROUND // count, "step": count})
            for i, p in enumerate(workers.publishers)
        ))
        await asyncio.sleep(0.02)  # pacing the feed (not waiting for a condition)


async def read_ledger(workers: Workers, result: dict[str, Any]) -> tuple[Ledger, dict[str, Any]]:
    """What the workers recorded in Redis: the ledger for ``check``, and per worker counts."""
    r = workers.redis
    ledger = Ledger()
    ledger.messages = [int(n) for n in await r.lrange(NOTES, 0, -1)]
    ledger.executed = collections.Counter({int(n): int(k) for n, k in (await r.hgetall(WORK)).items()})
    per = {
        "notes": {int(p): int(k) for p, k in (await r.hgetall(NOTES_BY_PID)).items()},
        "work": {int(p): int(k) for p, k in (await r.hgetall(WORK_BY_PID)).items()},
        "conns": [(int(port), int(pid), kind.decode()) for port, pid, kind in (e.split() for e in await r.lrange(CONNS, 0, -1))],
    }
    dump = os.environ.get("CHAOS_DUMP")
    if dump:
        trace = [e.decode() for e in await r.lrange(TRACE, 0, -1)]
        client = [f"{key} {value!r}" for key, value in result.items()]
        write_dump(Path(dump), {"trace.txt": trace, "workers.log": workers.proc.lines, "client.txt": client})
    return ledger, per


def write_dump(folder: Path, files: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_text("".join(line + "\n" for line in lines))


def log_summary(workers: Workers) -> str:
    """The workers' warnings and errors, counted by message."""
    levels = ("warning", "error", "critical")
    counts = collections.Counter(str(r.get("message"))[:100] for r in workers.proc.records if r.get("level") in levels)
    return "; ".join(f"{k}x {m!r}" for m, k in counts.most_common(5)) or "none"


async def settle(workers: Workers, received: Callable[[], Any]) -> None:
    """The cuts stopped: wait (bounded) for the last broadcasts and messages. What never comes
    is for ``check`` to report, with the counts."""
    deadline = time.monotonic() + SETTLE * TIMEOUT_SCALE
    while time.monotonic() < deadline:
        if await received() >= BROADCASTS and await workers.redis.llen(NOTES) >= MESSAGES:
            return
        await asyncio.sleep(0.05)  # polling the condition under a deadline


class Downtime:
    """How long the client was away, from each drop to its next open (reconnected, resumed)."""

    def __init__(self) -> None:
        self.spans: list[float] = []
        self._since: float | None = None
        #: How far the sender got (``sent`` of the messages) and when it was done (-1: not).
        self.sender: dict[str, float] = {}

    def down(self) -> None:
        if self._since is None:
            self._since = time.monotonic()

    def up(self) -> None:
        if self._since is not None:
            self.spans.append(time.monotonic() - self._since)
            self._since = None

    def __str__(self) -> str:
        spans = sorted(self.spans) or [0.0]
        sender = f"; sent {self.sender['sent']:.0f}/{MESSAGES}, done in {self.sender['seconds']:.1f}s" if self.sender else ""
        return f"away {len(self.spans)} times, median {spans[len(spans) // 2] * 1000:.0f} ms, longest {spans[-1] * 1000:.0f} ms{sender}"


def served_by(result: dict[str, Any], workers: Workers, per: dict[str, Any], label: str) -> dict[str, Any]:
    """The client's connections in the proxy's order, each with the worker that served it (the
    worker recorded its remote port: the proxy's upstream one); printed with the counts."""
    served: dict[int, collections.deque[tuple[int, str]]] = collections.defaultdict(collections.deque)
    for port, pid, kind in per["conns"]:
        served[port].append((pid, kind))
    path = [served[port].popleft() for port in result["upstreams"] if served[port]]
    moves = sum(1 for one, next in zip(path, path[1:], strict=False) if one[0] != next[0])
    a, b = workers.pids
    landed = collections.Counter(pid for pid, _ in path)
    resumed = collections.Counter(pid for pid, kind in path if kind == "resumed")
    print(
        f"{label}: workers {a} and {b}; {len(result['upstreams'])} connections through the proxy, {len(path)} served "
        f"(worker {a}: {landed[a]}, {resumed[a]} of them resumed; worker {b}: {landed[b]}, {resumed[b]} resumed), "
        f"{moves} moves between workers; notes handled per worker {per['notes'].get(a, 0)}/{per['notes'].get(b, 0)}, "
        f"requests executed per worker {per['work'].get(a, 0)}/{per['work'].get(b, 0)}; "
        f"worker warnings: {log_summary(workers)}"
    )
    return {"landed": set(landed), "moves": moves}


def check_workers(seen: dict[str, Any], workers: Workers, per: dict[str, Any]) -> None:
    """It landed on both workers (and no third: none was restarted), moved over and back, and
    both handled its messages and ran its requests."""
    both = set(workers.pids)
    assert seen["landed"] == both
    assert seen["moves"] >= 2
    assert set(per["notes"]) == both and set(per["work"]) == both


async def run_python_client(workers: Workers) -> tuple[dict[str, Any], Downtime]:
    """tests/test_chaos.py's client and sender through the proxy (its one backend: the
    workers' port), the workers broadcasting; the result for ``check``."""
    proxy = await ChaosProxy([workers.port], seed=7).start()
    received: list[int] = []
    gaps: list[tuple[Any, ...]] = []
    resumed: list[tuple[Any, ...]] = []
    client = tether.Client(
        f"ws://127.0.0.1:{proxy.port}/app", backoff=Backoff(base=0.005, cap=0.05), request_timeout=None, resume=RESUME
    )
    client.on("tick", received.append)
    client.add_listener("gap", lambda *a: gaps.append(a))
    client.add_listener("resumed", lambda *a: resumed.append(a))
    away = Downtime()
    client.add_listener("close", lambda *a: away.down())
    client.add_listener("open", away.up)
    requests: list[asyncio.Future[int]] = []
    progress: dict[str, float] = {"sent": 0, "seconds": -1}
    began = time.monotonic()
    try:
        async with timeout(SENDER + SETTLE + 20), client:
            await client.wait_open()
            proxy.chaos(0.1, 0.5)

            async def sender() -> None:
                for n in range(MESSAGES):
                    progress["sent"] = n
                    await client.emit("note", n)
                    if n % 10 == 0:
                        requests.append(asyncio.ensure_future(client.request("work", n // 10)))
                    if n % 20 == 19:
                        await asyncio.sleep(0.01)  # paced, so the run spans many cuts
                progress["sent"] = MESSAGES
                await asyncio.wait(requests)
                progress["seconds"] = time.monotonic() - began

            feed = asyncio.ensure_future(broadcaster(workers))
            try:
                with suppress(TimeoutError):  # what did not finish is for check() to report
                    async with timeout(SENDER):
                        await sender()
            finally:
                await feed
            proxy.calm()

            async def got() -> int:
                return len(received)

            await settle(workers, got)
    finally:
        cuts, upstreams = proxy.cuts, list(proxy.upstreams)
        await proxy.aclose()
        for request in requests:
            request.cancel()  # those never answered (none, when all is well)
    replies = [
        ({"error": type(r.exception()).__name__} if r.exception() else r.result())
        for r in requests if r.done() and not r.cancelled()
    ]
    result = {
        "received": received, "replies": replies, "gaps": gaps, "resumed": resumed,
        "cuts": cuts, "upstreams": upstreams, "seconds": time.monotonic() - began,
    }
    away.sender = progress
    return result, away


@pytest.mark.slow
@pytest.mark.redis
async def test_python_client_loses_nothing_landing_on_either_of_two_worker_processes(workers: Workers) -> None:
    result, away = await run_python_client(workers)
    ledger, per = await read_ledger(workers, result)
    try:
        check(result, ledger, "two worker processes (tether run --workers 2, Redis)", publishers=2)
    finally:
        seen = served_by(result, workers, per, f"two worker processes ({away})")
    check_workers(seen, workers, per)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("workers", [SLOW_HANDLER], indirect=True)
async def test_python_client_landing_on_either_of_two_worker_processes_with_slow_handlers(workers: Workers) -> None:
    """The same with handlers that take 2 ms each, slower than the client sends: a worker's
    inbox fills, it stops reading, and sees a cut only once it has read up to it. Meanwhile the
    client is back (on either worker) and resumes the session; the old connection, closing
    (4009) or its session already released to the other worker, still hands what is queued in
    its inbox to its dispatcher, which accepts each seq into the session it no longer holds:
    those messages and requests ran there, and again where the client resent them (the ack
    it resumed with came from a copy saved before), out of order (834 duplicated messages,
    1,093 executions of 1,000 requests, before the fix). Now such a connection drops what it
    queued once the session moved on (Session.holds), and the client's resend runs once."""
    result, away = await run_python_client(workers)
    ledger, per = await read_ledger(workers, result)
    try:
        check(result, ledger, f"two worker processes, handlers taking {SLOW_HANDLER * 1000:.0f} ms", publishers=2)
    finally:
        seen = served_by(result, workers, per, f"two worker processes, slow handlers ({away})")
    check_workers(seen, workers, per)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.browser
async def test_browser_client_loses_nothing_landing_on_either_of_two_worker_processes(
    browser: Any, workers: Workers  # noqa: F811
) -> None:
    """tests/test_chaos_browser.py's page (served by the workers; its socket goes through the
    proxy, so they allow any origin)."""
    proxy = await ChaosProxy([workers.port], seed=7).start()
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    began = time.monotonic()
    try:
        async with timeout(SENDER + SETTLE + 20):
            query = f"ws=ws://127.0.0.1:{proxy.port}/app" + ("" if RESUME else "&resume=0")
            await page.goto(f"http://127.0.0.1:{workers.port}/?{query}")
            await page.wait_for_function("window.client && client.state === 'open'", timeout=MS)
            proxy.chaos(0.1, 0.5)
            feed = asyncio.ensure_future(broadcaster(workers))
            try:
                await page.evaluate("(messages) => run(messages)", MESSAGES)
                with suppress(PlaywrightTimeoutError):  # what did not finish is for check() to report
                    await page.wait_for_function(
                        "replies !== null || failure !== null", polling=100, timeout=int(SENDER * 1000 * TIMEOUT_SCALE)
                    )
            finally:
                await feed
            proxy.calm()
            assert await page.evaluate("failure") is None

            async def got() -> int:
                return int(await page.evaluate("got.length"))

            await settle(workers, got)
            state = await page.evaluate("({ got, replies, gaps, resumed })")
    finally:
        cuts, upstreams = proxy.cuts, list(proxy.upstreams)
        await page.close()
        await proxy.aclose()
    result = {
        "received": state["got"], "replies": state["replies"] or [], "gaps": state["gaps"],
        "resumed": [(r["resumed"], r["lostMessages"]) for r in state["resumed"]],
        "cuts": cuts, "upstreams": upstreams, "seconds": time.monotonic() - began,
    }
    ledger, per = await read_ledger(workers, result)
    try:
        check(result, ledger, "tether.js, two worker processes (tether run --workers 2, Redis)", publishers=2)
    finally:
        seen = served_by(result, workers, per, "tether.js, two worker processes")
    assert errors == []
    assert len(ledger.executed) == REQUESTS
    check_workers(seen, workers, per)
