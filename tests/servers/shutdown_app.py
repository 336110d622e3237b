"""A typed app served by ``tether.run`` in a child process, for graceful-shutdown tests.

    python tests/servers/shutdown_app.py [--port 0] [--shutdown-spread S] [--shutdown-timeout S]

Prints ``listening <port>`` on stdout once it accepts connections (``tether.run`` logs the
port; a filter passes only that line). Handlers:

- ``echo`` data -> data (a request);
- ``slow`` seconds -> ``"done after <seconds>"``: emits ``started`` first, then awaits that long
  (an in-flight request for the shutdown to drain).

Plain handlers: ``/push`` pushes 64 KiB messages as fast as the peer reads (a peer that never
reads fills every buffer); ``/stubborn`` ignores its connection and never returns.

SIGTERM or SIGINT shut it down gracefully (``tether.run``); it exits with code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import tether


def make_app() -> tether.App:
    app = tether.App()

    @app.on("echo")
    def echo(conn: tether.Conn, data: Any) -> Any:
        return data

    @app.on("slow")
    async def slow(conn: tether.Conn, seconds: float) -> str:
        await conn.emit("started", seconds)
        await asyncio.sleep(seconds)  # the work the shutdown must wait for
        return f"done after {seconds}"

    @app.on("slow_concurrent", concurrent=True)
    async def slow_concurrent(conn: tether.Conn, seconds: float) -> str:
        await conn.emit("started", seconds)
        await asyncio.sleep(seconds)
        return f"concurrent done after {seconds}"

    return app


async def push(conn: tether.Conn) -> None:
    chunk = "x" * 65536
    while True:
        await conn.send(chunk)


async def stubborn(conn: tether.Conn) -> None:
    while True:  # never looks at its connection: only cancelling it ends it
        await asyncio.sleep(0.05)


class _PortLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("tether serving on "):
            record.msg, record.args = "listening %s", (record.getMessage().rsplit(":", 1)[1],)
            return True
        return False


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--shutdown-spread", type=float, default=5.0)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_PortLine())
    logger = logging.getLogger("tether")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    tether.run(
        {"/ws": make_app(), "/push": push, "/stubborn": stubborn},
        "127.0.0.1",
        args.port,
        shutdown_spread=args.shutdown_spread,
        shutdown_timeout=args.shutdown_timeout,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
