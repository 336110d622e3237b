"""Well-behaved clients of the fault soak (tests/test_soak_faults.py), in a process of their own:
one process cannot drive 200 ``tether.Client`` in asyncio debug mode *and* the hostile mix
on a loaded 2-core machine without lagging seconds behind (measured: see the test's docstring).

    python tests/soak_fleet.py --port PORT --first 0 --count 100 [--cut-every 10]

Opens ``count`` clients named ``c<first>..`` (client ``i`` in room ``r<i % 20>``; one in
``--cut-every`` through a :class:`ChaosProxy` of its own that cuts all of them every 3-6 s
while the traffic runs), prints ``{"open": ...}`` once all are open, then obeys one command
per line on stdin and answers each with one JSON line on stdout:

- ``start`` / ``resume``: traffic (and cuts) on; ``pause``: no new request, no cut, and the
  answer comes once no request is in flight (``{"paused": true}``);
- ``status``: counts so far, the clients' states, the worst event-loop lag;
- ``finish``: stop, and answer the whole ledger (outcomes, wrong replies, broadcasts made
  and heard, second answers, closes, resumes, gaps);
- ``close``: close every client and exit.

Each client does one request every 0.5-1 s: ``echo`` (small or 8 KiB), ``slow`` (a handler that
suspends), ``say`` (a broadcast to its room), ``boom`` (the handler raises: error
``internal``), now and then three at once, and a one-way message every 7th round. Every
request ends in exactly one outcome (reply, error, or the failure that ended it); a reply or
error handed over twice for one id, or for an id not pending, is counted (``SoakClient``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import sys
import time
from typing import Any

from chaos_proxy import ChaosProxy

import tether
from tether.proto.backoff import Backoff

ROOMS = 20
CUT_PERIOD = (3.0, 6.0)  # seconds between two cuts of every proxied client
REQUEST_TIMEOUT = 30.0  # a request that waits this long counts as lost: it must never happen


class SoakClient(tether.Client):
    """A tether.Client that counts every reply or error it is handed per request id (after the
    session's dedupe of resent messages): a second one, or one for a request that is not
    pending (it timed out or was lost), is a broken promise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: collections.Counter[int] = collections.Counter()
        self.unexpected = 0

    def _settle(self, incoming: Any) -> None:
        if isinstance(incoming.id, int):
            self.answers[incoming.id] += 1
            if incoming.id not in self._session.pending:
                self.unexpected += 1
        super()._settle(incoming)


class Fleet:
    def __init__(self, port: int, cut_port: int, first: int, count: int, cut_every: int) -> None:
        self.sent = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.wrong: list[str] = []
        self.says: list[tuple[str, str, int]] = []  # (room, sender, n): answered broadcasts
        self.heard: dict[str, collections.Counter[tuple[str, int]]] = collections.defaultdict(collections.Counter)
        self.gaps: collections.Counter[str] = collections.Counter()
        self.resumed: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()
        self.new_sessions: list[str] = []
        self.clients: list[SoakClient] = []
        self.names: list[str] = []
        self.rooms: list[str] = []
        self.cut = [False] * count
        for k, i in enumerate(range(first, first + count)):
            name, room = f"c{i}", f"r{i % ROOMS}"
            self.cut[k] = i % cut_every == 0
            via = cut_port if self.cut[k] else port
            client = SoakClient(f"ws://127.0.0.1:{via}/ws?room={room}&name={name}", request_timeout=None, backoff=Backoff(base=0.05, cap=0.5))
            client.on("said", self._heard(name))
            client.add_listener("gap", self._gap)
            client.add_listener("resumed", self._resumed(name))
            client.add_listener("close", self._closed(name, self.cut[k]))
            client.add_listener("open", self._opened(name))
            self.clients.append(client)
            self.names.append(name)
            self.rooms.append(room)
        self.last_close: dict[str, tuple[float, int | None, str]] = {}
        self.away: list[float] = []  # seconds from each close to the next open
        self.go = asyncio.Event()
        self.stop = asyncio.Event()
        self.in_flight = 0
        self.counting_says = False
        self.tasks: list[asyncio.Task[None]] = []
        self.lag = 0.0

    # -- listeners ---------------------------------------------------------------------------
    def _heard(self, name: str) -> Any:
        heard = self.heard[name]

        def said(data: dict[str, Any]) -> None:
            heard[(data["from"], data["n"])] += 1

        return said

    def _gap(self, room: str | None, first: Any, last: Any, reason: Any) -> None:
        self.gaps[str(reason)] += 1

    def _resumed(self, name: str) -> Any:
        def resumed(resumed: bool, lost: int) -> None:
            self.resumed["resumed" if resumed else "new session"] += 1
            if not resumed:
                at, code, reason = self.last_close.get(name, (0.0, None, ""))
                self.new_sessions.append(f"{name}: {time.monotonic() - at:.2f} s after close {code} {reason!r}, {lost} one-way messages lost")

        return resumed

    def _opened(self, name: str) -> Any:
        def opened() -> None:
            closed = self.last_close.get(name)
            if closed is not None:
                self.away.append(time.monotonic() - closed[0])

        return opened

    def _closed(self, name: str, cut: bool) -> Any:
        def closed(code: int | None, reason: str) -> None:
            self.closes[f"{'cut ' if cut else ''}{code} {reason}".strip()] += 1
            self.last_close[name] = (time.monotonic(), code, reason)

        return closed

    # -- traffic -------------------------------------------------------------------------------
    async def open(self) -> None:
        for start in range(0, len(self.clients), 50):  # the listen backlog is finite
            batch = self.clients[start : start + 50]
            for client in batch:
                client.start()
            async with asyncio.timeout(60):
                await asyncio.gather(*(client.wait_open() for client in batch))
        self.counting_says = True

    def start(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._work(k, seconds)) for k in range(len(self.clients))]
        self.tasks.append(loop.create_task(self._watch_lag()))

    async def pause(self) -> None:
        self.go.clear()
        deadline = time.monotonic() + REQUEST_TIMEOUT + 30
        while self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.in_flight} requests still in flight")
            await asyncio.sleep(0.05)  # polling a condition under a deadline

    async def finish(self) -> None:
        self.stop.set()
        self.go.set()
        async with asyncio.timeout(REQUEST_TIMEOUT + 30):
            await asyncio.gather(*self.tasks)

    async def _watch_lag(self) -> None:
        while not self.stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.1)  # measuring how late the loop wakes us
            self.lag = max(self.lag, time.monotonic() - before - 0.1)

    async def _request(self, client: SoakClient, kind: str, data: Any, room: str, name: str) -> None:
        self.sent += 1
        self.in_flight += 1
        try:
            reply = await client.request(kind, data, timeout=REQUEST_TIMEOUT)
        except tether.ReplyError as exc:
            self.outcomes[f"error {exc.code}"] += 1
            if not (kind == "boom" and exc.code == "internal"):
                self.wrong.append(f"{name} {kind}: error {exc.code}")
        except TimeoutError:
            self.outcomes["timeout"] += 1
        except tether.ConnectionLost:
            self.outcomes["lost"] += 1
        except tether.OutboxOverflow:
            self.outcomes["outbox overflow"] += 1
        except tether.ClientClosed:
            self.outcomes["client closed"] += 1
        else:
            self.outcomes["reply"] += 1
            expected = data["n"] if kind == "say" else data
            if kind == "boom" or reply != expected:
                self.wrong.append(f"{name} {kind}: reply {str(reply)[:40]!r}")
            elif kind == "say" and self.counting_says:
                self.says.append((room, name, data["n"]))
        finally:
            self.in_flight -= 1

    async def _work(self, k: int, seconds: float) -> None:
        client, name, room = self.clients[k], self.names[k], self.rooms[k]
        rng = random.Random(name)
        await asyncio.sleep(rng.uniform(0.0, 1.0))  # the clients' first requests spread over a second
        for n in range(int(seconds * 3) + 1000):  # rounds: bounded whatever the clock does
            await self.go.wait()
            if self.stop.is_set():
                return
            pick = rng.random()
            if pick < 0.04:  # three at once, answered in order
                await asyncio.gather(*(self._request(client, "echo", f"{name}-{n}-{j}", room, name) for j in range(3)))
            elif pick < 0.55:
                await self._request(client, "echo", {"n": n, "from": name}, room, name)
            elif pick < 0.65:
                await self._request(client, "echo", "e" * 8192, room, name)
            elif pick < 0.80:
                await self._request(client, "slow", n, room, name)
            elif pick < 0.95:
                await self._request(client, "say", {"room": room, "n": n}, room, name)
            else:
                await self._request(client, "boom", n, room, name)
            if n % 7 == 0:
                client.send("echo", n)  # one-way: nothing comes back
            await asyncio.sleep(rng.uniform(0.5, 1.0))  # the client's pace

    # -- reports -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "outcomes": dict(self.outcomes),
            "states": dict(collections.Counter(client.state for client in self.clients)),
            "all_open": all(client.state == "open" for client in self.clients),
            "closes": dict(self.closes),
            "resumed": dict(self.resumed),
            "lag": round(self.lag, 3),
            "away": sorted(self.away)[-3:] if self.away else [],
        }

    def ledger(self) -> dict[str, Any]:
        extra = sum(count - 1 for client in self.clients for count in client.answers.values() if count > 1)
        return {
            **self.status(),
            "wrong": self.wrong,
            "says": self.says,
            "members": list(zip(self.names, self.rooms, strict=True)),
            "heard": {name: [[sender, n, count] for (sender, n), count in heard.items()] for name, heard in self.heard.items()},
            "second_answers": extra,
            "unexpected_answers": sum(client.unexpected for client in self.clients),
            "gaps": dict(self.gaps),
            "new_sessions": self.new_sessions,
        }


async def cut_forever(proxy: ChaosProxy, fleet: Fleet, counter: list[int]) -> None:
    rng = random.Random(5)
    while not fleet.stop.is_set():
        await asyncio.sleep(rng.uniform(*CUT_PERIOD))  # the pace of the cuts
        if fleet.go.is_set() and not fleet.stop.is_set():
            proxy.cut_all()
            counter[0] += 1


class _Monotonic(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{time.monotonic():.3f} {record.levelname} {record.name}: {record.getMessage()}"


def answer(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    proxy = await ChaosProxy([args.port]).start()
    fleet = Fleet(args.port, proxy.port, args.first, args.count, args.cut_every)
    await fleet.open()
    answer({"open": len(fleet.clients)})
    cuts = [0]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cutter: asyncio.Task[None] | None = None
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "start":
                fleet.go.set()
                fleet.start(args.seconds)
                cutter = loop.create_task(cut_forever(proxy, fleet, cuts))
                answer({"started": True})
            elif line == "pause":
                await fleet.pause()
                answer({"paused": True})
            elif line == "resume":
                fleet.go.set()
                answer({"resumed": True})
            elif line == "status":
                answer({**fleet.status(), "cuts": cuts[0]})
            elif line == "finish":
                await fleet.finish()
                answer({**fleet.ledger(), "cuts": cuts[0]})
            elif line == "close":
                break
    finally:
        fleet.stop.set()
        fleet.go.set()
        if cutter is not None:
            cutter.cancel()
        for task in fleet.tasks:
            task.cancel()
        await asyncio.gather(*fleet.tasks, *([cutter] if cutter else []), return_exceptions=True)
        async with asyncio.timeout(20):
            await asyncio.gather(*(client.close() for client in fleet.clients), return_exceptions=True)
        await proxy.aclose()
    answer({"closed": True})


if __name__ == "__main__":
    if os.environ.get("TETHER_SOAK_LOG_LEVEL"):  # debugging: what the clients log, timed as the server's log is
        handler = logging.StreamHandler()
        handler.setFormatter(_Monotonic())
        logging.basicConfig(level=os.environ["TETHER_SOAK_LOG_LEVEL"], handlers=[handler])
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--cut-every", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=120.0)
    asyncio.run(main(parser.parse_args()))
