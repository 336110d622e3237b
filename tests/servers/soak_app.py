"""The server of the fault soak (tests/test_soak_faults.py): a typed App under ``tether.run``.

    python tests/servers/soak_app.py --broker memory|redis://127.0.0.1:PORT/0 [--port 0]
        [--ping-interval 1] [--ping-timeout 2] [--close-timeout 1] [--handshake-timeout 1]
        [--shutdown-timeout 5] [--window 5] [--history-age 10] [--busy-hz 50] [--busy-size 2048]

Prints ``listening <port>`` on stdout once it accepts connections; everything else tether
logs goes to stderr (the test keeps it and counts what it did not expect).

``/ws``, the App (sessions with a ``--window`` s resume window):

- on connect, joins ``?room=<room>`` if given (presence meta ``{"name": ?name}``; the room
  ``busy`` without presence). Every room's history is bounded by ``--history-age`` seconds
  (and 200 messages), so the soak reaches its steady state during its warm-up;
- ``echo`` data -> data; ``slow`` data -> data after 10 ms (a handler that suspends);
- ``say`` ``{"room", "n"}``: broadcasts ``said`` ``{"from": conn's name, "n"}`` to the room
  and replies ``n``;
- ``boom``: raises (the client gets the ``internal`` error);
- ``join`` (tether's room request): allowed for any room whose name starts with ``tmp-``
  (hostile clients churn through rooms nobody else uses).

The room ``busy`` gets a ``tick`` of ``--busy-size`` bytes ``--busy-hz`` times a second from
the first connection on (what fills the buffers of a client that never reads).

``/admin``, a plain handler: every text message is answered with this process's state, as
JSON: ``rss`` and ``hwm`` (kB, /proc/self/status), ``tasks`` (``len(asyncio.all_tasks())``),
``fds`` and ``sockets`` (entries of /proc/self/fd, those that are sockets),
``connections`` (``len(server.connections)``), ``sessions`` (``len(app.sessions)``),
``rooms`` (the hub's), ``blocks`` (``sys.getallocatedblocks()``), ``objects``
(``len(gc.get_objects())``), ``broker`` (its counters). The message ``"gc"`` collects first;
``"types"`` adds every object type with 20 or more instances and their counts. For hunting a
leak: ``"futures"`` (where live futures were made, and what holds them: asyncio debug mode) and
``"tuples"`` (the shapes of live tuples, and what holds a sample of them).

``TETHER_SOAK_LOG_LEVEL=INFO`` logs more to stderr (with the monotonic time, as the fleets'
logs and the test's prints).

SIGTERM or SIGINT shut it down gracefully (``tether.run``); it exits with code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

import tether
from tether.sessions import Resume

BUSY = "busy"


class Say(msgspec.Struct):
    room: str
    n: int


class Soak:
    """The App and what its admin route reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.app = tether.App(resume=Resume(window=args.window))
        self.configured: set[str] = set()
        self.ticker: asyncio.Task[None] | None = None
        self.ticks = 0
        self.tick_failures = 0
        self._server: tether.Server | None = None
        self._routes()

    def _bound(self, room: str) -> None:
        if room not in self.configured:
            self.configured.add(room)
            self.app.hub.set_history(room, max_count=200, max_age=self.args.history_age)

    def _routes(self) -> None:
        app = self.app

        @app.on_connect
        async def hello(conn: tether.Conn) -> None:
            self._start_ticker()
            room = conn.query.get("room")
            if room:
                self._bound(room)
                if room == BUSY:
                    await conn.join(room, presence=False)
                else:
                    await conn.join(room, {"name": conn.query.get("name")})

        @app.on_join
        def join(conn: tether.Conn, room: str, meta: Any) -> bool:
            if not room.startswith("tmp-"):
                return False
            self._bound(room)
            return True

        @app.on("echo")
        def echo(conn: tether.Conn, data: Any) -> Any:
            return data

        @app.on("slow")
        async def slow(conn: tether.Conn, data: Any) -> Any:
            await asyncio.sleep(0.01)  # the work of a handler that suspends
            return data

        @app.on("say")
        async def say(conn: tether.Conn, data: Say) -> int:
            await app.broadcast(data.room, "said", {"from": conn.query.get("name"), "n": data.n})
            return data.n

        @app.on("boom")
        def boom(conn: tether.Conn, data: Any) -> None:
            raise RuntimeError(f"boom {data!r}")

    def _start_ticker(self) -> None:
        if self.ticker is None:
            self._bound(BUSY)
            self.ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        payload = "t" * self.args.busy_size
        period = 1.0 / self.args.busy_hz
        while True:
            try:
                await self.app.broadcast(BUSY, "tick", payload)
                self.ticks += 1
            except Exception:  # the broker refused it (shutting down): the soak counts it
                self.tick_failures += 1
            await asyncio.sleep(period)  # the ticker's pace

    # -- /admin ----------------------------------------------------------------------------
    def server(self) -> tether.Server:
        """The Server ``tether.run`` made (it keeps it to itself): found once, among gc's objects."""
        if self._server is None:
            self._server = next(o for o in gc.get_objects() if isinstance(o, tether.Server))
        return self._server

    def state(self, types: bool) -> dict[str, Any]:
        status: dict[str, int] = {}
        with open("/proc/self/status") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    status[key] = int(value.split()[0])
        fds = os.listdir("/proc/self/fd")
        sockets = 0
        for fd in fds:
            try:
                sockets += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
            except OSError:
                pass  # the listing's own fd, closed by now
        hub = self.app.hub
        broker = hub.broker
        counters = {k: v for k in ("dropped", "published", "received", "resent", "repaired", "gaps") if isinstance(v := getattr(broker, k, None), int)}
        bus = getattr(broker, "bus", None)
        if bus is not None:
            counters.update(streams=len(bus.streams), saved_sessions=len(bus.sessions), presence_rooms=len(bus.presence), settings=len(bus.settings))
        if hasattr(broker, "state"):
            counters["state"] = str(broker.state)
        objects = gc.get_objects()
        state: dict[str, Any] = {
            "pid": os.getpid(),
            "rss": status.get("VmRSS", 0),
            "hwm": status.get("VmHWM", 0),
            "tasks": len(asyncio.all_tasks()),
            "fds": len(fds),
            "sockets": sockets,
            "connections": len(self.server().connections),
            "sessions": len(self.app.sessions) if self.app.sessions is not None else 0,
            "rooms": len(hub.rooms),
            "blocks": sys.getallocatedblocks(),
            "objects": len(objects),
            "ticks": self.ticks,
            "tick_failures": self.tick_failures,
            "broker": counters,
        }
        if types:
            state["types"] = [(t, n) for t, n in collections.Counter(type(o).__qualname__ for o in objects).most_common() if n >= 20]
        del objects
        return state

    def futures(self) -> dict[str, Any]:
        """Where the live futures (not tasks) were made, and what holds them (debug mode)."""
        gc.collect()
        made: collections.Counter[str] = collections.Counter()
        held: collections.Counter[str] = collections.Counter()
        for o in gc.get_objects():
            if isinstance(o, asyncio.Future) and not isinstance(o, asyncio.Task):
                tb = getattr(o, "_source_traceback", None) or []
                made[" < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in tb[-4:][::-1])] += 1
                for r in gc.get_referrers(o):
                    if r is not None and type(r).__name__ not in ("list", "frame"):
                        held[type(r).__qualname__ + (f" {sorted(r)[:3]}" if isinstance(r, dict) else "")] += 1
        return {"made": made.most_common(15), "held": held.most_common(15)}

    async def admin(self, conn: tether.Conn) -> None:
        async for message in conn:
            if message == "tuples":
                gc.collect()
                shapes: collections.Counter[str] = collections.Counter()
                holders: collections.Counter[str] = collections.Counter()
                tuples = [o for o in gc.get_objects() if type(o) is tuple]
                for o in tuples:
                    shapes[str(tuple(type(x).__name__ for x in o[:4]))] += 1
                for o in tuples[-3000:]:
                    for r in gc.get_referrers(o):
                        if r is not tuples:
                            holders[type(r).__qualname__ + (f" len {len(r)}" if isinstance(r, (list, dict, set)) else "")] += 1
                await conn.send(json.dumps({"shapes": shapes.most_common(12), "holders": holders.most_common(12)}))
                continue
            if message == "futures":
                await conn.send(json.dumps(self.futures(), default=str))
                continue
            if message == "gc":
                gc.collect()
            await conn.send(json.dumps(self.state(types=message == "types")))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = f"{record.levelname} {record.name}: {record.message}"
        if record.levelno < logging.WARNING:  # debugging: with the monotonic time, as the test prints it
            line = f"{time.monotonic():.3f} {line}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _PortLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("tether serving on "):
            record.msg, record.args = "listening %s", (record.getMessage().rsplit(":", 1)[1],)
            return True
        return False


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--broker", default="memory")
    parser.add_argument("--ping-interval", type=float, default=1.0)
    parser.add_argument("--ping-timeout", type=float, default=2.0)
    parser.add_argument("--close-timeout", type=float, default=1.0)
    parser.add_argument("--handshake-timeout", type=float, default=1.0)
    parser.add_argument("--shutdown-timeout", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--history-age", type=float, default=10.0)
    parser.add_argument("--busy-hz", type=float, default=50.0)
    parser.add_argument("--busy-size", type=int, default=2048)
    args = parser.parse_args(argv)

    port_line = logging.StreamHandler(sys.stdout)
    port_line.addFilter(_PortLine())
    logger = logging.getLogger("tether")
    logger.addHandler(port_line)
    logger.setLevel(logging.INFO)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(os.environ.get("TETHER_SOAK_LOG_LEVEL", "WARNING"))
    errors.setFormatter(_Formatter())
    errors.addFilter(lambda record: record.name != "tether.access")
    logging.getLogger().addHandler(errors)

    soak = Soak(args)
    tether.run(
        {"/ws": soak.app, "/admin": soak.admin},
        "127.0.0.1",
        args.port,
        broker=None if args.broker == "memory" else args.broker,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        close_timeout=args.close_timeout,
        handshake_timeout=args.handshake_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
