"""The ``tether run`` command as a child process, and small clients for the operations tests.

``TetherRun(*args)`` runs ``python -m tether run --app-dir tests/servers <args>`` (the same
entry point as ``.venv/bin/tether``) with ``--port 0`` unless a port is given and JSON logs;
``await proc.start()`` returns once the log says ``tether serving on <scheme>://host:port``
(the port the OS picked). Every stderr line is kept (``proc.lines``, parsed JSON in
``proc.records``); ``await proc.wait_for(predicate)`` waits for a record. Nothing sleeps to
wait: reads of the pipe are awaited under a scaled timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.conftest import TIMEOUT_SCALE, timeout

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "tests" / "servers"
SERVING = re.compile(r"tether serving on (https?)://([^ :]+|\[[^\]]+\]):(\d+)")


class TetherRun:
    """``python -m tether run`` with ``args``; see the module docstring."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, bare: bool = False) -> None:
        self.args = list(args)
        if not bare and "--app-dir" not in self.args:
            self.args = ["--app-dir", str(SERVERS), *self.args]
        if not bare and "--port" not in self.args:
            self.args += ["--port", "0"]
        if not bare and "--log-format" not in self.args:
            self.args += ["--log-format", "json"]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.port = 0
        self.scheme = "http"
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, seconds: float = 20) -> TetherRun:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tether", "run", *self.args, cwd=self.cwd, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        workers = int(self.args[self.args.index("--workers") + 1]) if "--workers" in self.args else 1

        def listening(text: str) -> bool:  # each process logs once it listens (the parent of workers first)
            return sum(1 for line in self.lines if _serving(_message(line))) >= workers

        line = await self.wait_line(lambda text: _serving(text) and listening(text), seconds)
        match = SERVING.search(line)
        assert match is not None
        self.scheme, self.port = match.group(1), int(match.group(3))
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                break
            text = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if isinstance(record, dict):
                self.records.append(record)
            self._changed.set()
        self._changed.set()

    async def wait_line(self, matches: Callable[[str], bool], seconds: float = 10) -> str:
        """The first stderr line (message of a JSON record, or the raw line) that ``matches``."""
        async with timeout(seconds):
            while True:
                for line in self.lines:
                    text = _message(line)
                    if matches(text):
                        return text
                if self.exited:
                    raise AssertionError(f"tether run exited with {self.returncode}:\n" + "\n".join(self.lines))
                self._changed.clear()
                await self._changed.wait()

    async def wait_for(self, matches: Callable[[dict[str, Any]], bool], seconds: float = 10) -> dict[str, Any]:
        """The first JSON log record that ``matches``."""
        async with timeout(seconds):
            while True:
                for record in self.records:
                    if matches(record):
                        return record
                if self.exited:
                    raise AssertionError(f"tether run exited with {self.returncode}:\n" + "\n".join(self.lines))
                self._changed.clear()
                await self._changed.wait()

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def url(self, path: str = "/ws", query: str = "") -> str:
        scheme = "wss" if self.scheme == "https" else "ws"
        return f"{scheme}://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")

    def http(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, seconds: float = 30) -> int:
        """The exit code (the process must exit within ``seconds``, scaled)."""
        assert self.proc is not None
        async with timeout(seconds):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.proc is None or self.proc.returncode is not None:
            if self._reader is not None:
                await self._reader
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30 * TIMEOUT_SCALE)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


def _serving(text: str) -> bool:
    """A process's "listening" line (not the workers' parent's, which comes before they listen)."""
    return SERVING.search(text) is not None and " workers (pids " not in text


def _message(line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        return line
    return str(record.get("message", line)) if isinstance(record, dict) else line


@pytest.fixture
async def tether_run() -> AsyncIterator[Callable[..., TetherRun]]:
    """``proc = await tether_run("ops_app:app", ...).start()``; every process is stopped at teardown."""
    started: list[TetherRun] = []

    def make(*args: str, **kwargs: Any) -> TetherRun:
        proc = TetherRun(*args, **kwargs)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        await proc.stop()


class Typed:
    """A typed client over ``tether.connect``: ``request`` returns the reply's data (raises
    ``tether.ReplyError`` for an error reply); other messages are kept in ``events``."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []
        self._ids = 0

    async def request(self, type: str, data: Any = None) -> Any:
        import tether

        self._ids += 1
        id = self._ids
        await self.conn.send(msgspec.json.encode({"type": type, "data": data, "id": id}).decode())
        while True:
            message = msgspec.json.decode(await self.conn.receive())
            if message.get("id") == id:
                if message["type"] == "error":
                    raise tether.ReplyError(message["data"]["code"], message["data"]["message"])
                return message.get("data")
            self.events.append(message)

    async def event(self, type: str) -> dict[str, Any]:
        for i, message in enumerate(self.events):
            if message["type"] == type:
                return self.events.pop(i)
        while True:
            message = msgspec.json.decode(await self.conn.receive())
            if message["type"] == type:
                return message  # type: ignore[no-any-return]
            self.events.append(message)


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10 * TIMEOUT_SCALE, verify=kwargs.pop("verify", True)) as client:
        return await client.get(url, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


__all__ = ["ROOT", "SERVERS", "TetherRun", "Typed", "free_port", "get", "tether_run"]
