"""A small typed app for reconnect tests, run as a subprocess so a test can SIGKILL/SIGSTOP it.

    python -m tests.servers.reconnect_app --port 0 [--static-dir DIR] [--ping-interval S] [--ping-timeout S]

Prints ``listening <port>`` on stdout once it accepts connections. Handlers:

- ``add`` ``{"a": int, "b": int}`` -> ``a + b`` (a request);
- ``append`` ``item`` records ``item`` (one-way); ``log`` -> every recorded item, in order.

State lives in the process: a restarted server starts with an empty log.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

import tether


class Add(msgspec.Struct):
    a: int
    b: int


def make_app() -> tether.App:
    app = tether.App()
    items: list[Any] = []

    @app.on("add")
    def add(conn: tether.Conn, data: Add) -> int:
        return data.a + data.b

    @app.on("append")
    def append(conn: tether.Conn, data: Any) -> None:
        items.append(data)

    @app.on("log")
    def log(conn: tether.Conn) -> list[Any]:
        return items

    return app


def _seconds(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--static-dir", default=None)
    parser.add_argument("--ping-interval", type=_seconds, default=20.0)
    parser.add_argument("--ping-timeout", type=_seconds, default=20.0)
    args = parser.parse_args(argv)
    settings = {"static_dir": args.static_dir, "ping_interval": args.ping_interval, "ping_timeout": args.ping_timeout}
    async with tether.serve({"/ws": make_app()}, "127.0.0.1", args.port, **settings) as server:
        print(f"listening {server.port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))


# -- the test side: a page for Chromium, this app as a child process ---------------------------------

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>tether reconnect test</title>
<script type="module">
  import { connect } from "/tether.js";
  const ws = new URLSearchParams(location.search).get("ws") ?? "/ws";
  window.events = [];
  const client = connect(ws, { backoff: { base: %(base)s, cap: %(cap)s }, requestTimeout: %(request_ms)d });
  for (const name of ["open", "close", "reconnecting", "reconnected"]) {
    client.addEventListener(name, (event) => window.events.push({ name, detail: event.detail, at: performance.now() }));
  }
  window.client = client;
</script>
"""


def write_page(directory: Path, *, scale: float = 1.0) -> Path:
    """Write ``index.html`` into ``directory`` (made if missing) and return ``directory``.

    The page connects to ``?ws=<url>`` (default ``/ws``) with a fast backoff (base 50 ms,
    cap 0.5 s, times ``scale``); it exposes ``window.client`` and ``window.events``
    (``{name, detail, at}`` for open, close, reconnecting, reconnected).
    """
    directory.mkdir(parents=True, exist_ok=True)
    page = PAGE % {"base": 0.05 * scale, "cap": 0.5 * scale, "request_ms": int(10_000 * scale)}
    (directory / "index.html").write_text(page)
    return directory


APP = __file__


class ServerProcess:
    """This app in a child process: ``port = await proc.start()``, ``proc.kill()``, ``proc.pause()``...

    ``start(port)`` restarts it on a given port (the same one after a kill).
    """

    def __init__(self, *args: str) -> None:
        self.args = args
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, port: int | None = None, *, timeout: float = 15.0) -> int:
        """Spawn the server (on ``port``, default: the last one, else a free one); return its port."""
        port = self.port if port is None else port
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, APP, "--port", str(port), *self.args, stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line.startswith(b"listening "):
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self.port

    async def kill(self) -> None:
        """SIGKILL: no close frames, the sockets just die with the process."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the kernel keeps the sockets open but nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    async def aclose(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            await proc.wait()


class ClientEvents:
    """Records a ``tether.Client``'s events as ``(name, args, monotonic time)``; wait on them."""

    NAMES = ("open", "reconnected", "close", "reconnecting", "outboxoverflow")

    def __init__(self, client: tether.Client) -> None:
        self.log: list[tuple[str, tuple[Any, ...], float]] = []
        self._changed = asyncio.Event()
        for name in self.NAMES:
            client.add_listener(name, self._recorder(name))

    def _recorder(self, name: str) -> Any:
        def record(*args: Any) -> None:
            self.log.append((name, args, time.monotonic()))
            self._changed.set()

        return record

    def of(self, name: str) -> list[tuple[tuple[Any, ...], float]]:
        return [(args, at) for n, args, at in self.log if n == name]

    def names(self) -> list[str]:
        return [n for n, _, _ in self.log]

    async def wait(self, name: str, count: int = 1) -> tuple[tuple[Any, ...], float]:
        """Wait (the caller bounds it with a timeout) until ``name`` happened ``count`` times;
        return the ``count``-th occurrence's ``(args, time)``."""
        while len(self.of(name)) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.of(name)[count - 1]


async def until(predicate: Any, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true (the caller bounds it with a timeout)."""
    while not predicate():
        await asyncio.sleep(interval)
