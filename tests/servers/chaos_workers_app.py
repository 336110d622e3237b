"""tests/test_chaos.py's workload for worker processes, its ledger in Redis (issue 12).

    CHAOS_REDIS=redis://127.0.0.1:P/0 tether run --app-dir tests/servers chaos_workers_app:routes \\
        --workers 2 --broker redis://127.0.0.1:P/0

Clients connect to ``/app``. The handlers record into Redis (``CHAOS_REDIS``), so that the
test can read one ledger written by every worker process:

- the chaos client's session joins ``feed`` (``presence=False``) in ``on_connect`` (a resumed
  session is in it already); each of its connections, new (``on_connect``) or resumed
  (``on_resume``), RPUSHes ``"<port> <pid> <new|resumed>"`` to ``chaos:conns`` (``port``: the
  connection's remote port, the proxy's upstream socket), so that the test knows which worker
  served each connection;
- ``note`` n (one-way): RPUSH n to ``chaos:notes``, HINCRBY ``chaos:notes:pid`` <pid>;
- ``work`` n (request) -> n + 1: HINCRBY ``chaos:work`` n (its executions), HINCRBY
  ``chaos:work:pid`` <pid>;
- ``chaos:trace``: all of the above in one list, in the order Redis got them (``note n pid port``,
  ``work n pid port``, ``conn port pid kind``), to tell what happened when a check fails;
- publishers connect with ``?role=publisher`` (no room, nothing recorded): ``publish``
  ``{"first", "count", "step"}`` broadcasts ``tick`` n to ``feed`` for n = first, first + step,
  ... (count of them, one after the other, through ``app.broadcast``) and replies with the
  worker's pid; ``whoami`` -> the worker's pid.

``CHAOS_HANDLER_DELAY`` (seconds, default 0): ``note`` and ``work`` take that long (an
``asyncio.sleep``) before they record, as handlers that do some work.

Each record is written before the handler returns (the handler suspends until Redis answered),
so a session that moves to the other worker moves after what its handlers recorded.
"""

from __future__ import annotations

import asyncio
import os

import msgspec
import redis.asyncio as aioredis

import tether

NOTES, NOTES_BY_PID = "chaos:notes", "chaos:notes:pid"
WORK, WORK_BY_PID = "chaos:work", "chaos:work:pid"
CONNS = "chaos:conns"
TRACE = "chaos:trace"
DELAY = float(os.environ.get("CHAOS_HANDLER_DELAY") or 0)  # seconds each note and work handler takes

_ledger: tuple[int, aioredis.Redis] | None = None  # (pid, client): workers are forked


def ledger() -> aioredis.Redis:
    """This process's Redis client for the ledger (made in the worker, on first use)."""
    global _ledger
    if _ledger is None or _ledger[0] != os.getpid():
        _ledger = (os.getpid(), aioredis.Redis.from_url(os.environ["CHAOS_REDIS"]))
    return _ledger[1]


class Burst(msgspec.Struct):
    first: int
    count: int
    step: int


app = tether.App()


def _port(conn: tether.Conn) -> int:
    return conn.remote_address[1] if conn.remote_address else 0


def _is_publisher(conn: tether.Conn) -> bool:
    return conn.query.get("role") == "publisher"


async def _record_connection(conn: tether.Conn, kind: str) -> None:
    entry = f"{_port(conn)} {os.getpid()} {kind}"
    await ledger().pipeline(transaction=False).rpush(CONNS, entry).rpush(TRACE, f"conn {entry}").execute()


@app.on_connect
async def hello(conn: tether.Conn) -> None:
    if _is_publisher(conn):
        return
    await conn.join("feed", presence=False)
    await _record_connection(conn, "new")


@app.on_resume
async def back(conn: tether.Conn) -> None:
    if not _is_publisher(conn):
        await _record_connection(conn, "resumed")


@app.on("note")
async def note(conn: tether.Conn, n: int) -> None:
    if DELAY:
        await asyncio.sleep(DELAY)  # a handler doing some work before it records
    pid = os.getpid()
    pipe = ledger().pipeline(transaction=False).rpush(NOTES, n).hincrby(NOTES_BY_PID, str(pid), 1)
    await pipe.rpush(TRACE, f"note {n} {pid} {_port(conn)}").execute()


@app.on("work")
async def work(conn: tether.Conn, n: int) -> int:
    if DELAY:
        await asyncio.sleep(DELAY)
    pid = os.getpid()
    pipe = ledger().pipeline(transaction=False).hincrby(WORK, str(n), 1).hincrby(WORK_BY_PID, str(pid), 1)
    await pipe.rpush(TRACE, f"work {n} {pid} {_port(conn)}").execute()
    return n + 1


@app.on("publish")
async def publish(conn: tether.Conn, burst: Burst) -> int:
    for i in range(burst.count):
        await app.broadcast("feed", "tick", burst.first + i * burst.step)
    return os.getpid()


@app.on("whoami")
def whoami(conn: tether.Conn) -> int:
    return os.getpid()


routes = {"/app": app}
