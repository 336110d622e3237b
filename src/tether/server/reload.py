"""``tether run --reload``: restart the server when a source file changes (development only).

The command becomes a supervisor: it reserves the port (bound, not listening, with
``SO_REUSEPORT``, so ``--port 0`` names one port for every restart), runs the server as a
child process (``python -m tether run ... --port P --reuse-port``), and polls the ``*.py``
files under the watched directories every quarter of a second, as uvicorn's ``StatReload``
does. On a change the child gets SIGTERM (a graceful shutdown), then a new child starts. A
child that fails (a syntax error being typed) is restarted on the next change. SIGTERM or
SIGINT stop the child and the supervisor, which exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Reloader", "child_command", "reserve", "source_files", "strip_options"]

logger = logging.getLogger("tether")

POLL_INTERVAL = 0.25  # seconds between two looks at the files
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "venv"}


class _Stop(Exception):
    """SIGTERM or SIGINT reached the supervisor."""


def source_files(directories: Iterable[str | Path]) -> Iterator[Path]:
    """Every ``*.py`` file under ``directories``, skipping hidden directories, ``__pycache__``,
    virtual environments and ``node_modules``."""
    for directory in directories:
        for root, dirs, files in os.walk(directory):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS]
            for name in files:
                if name.endswith(".py"):
                    yield Path(root, name)


def _mtimes(directories: Sequence[str | Path]) -> dict[Path, float]:
    found = {}
    for path in source_files(directories):
        try:
            found[path] = path.stat().st_mtime
        except OSError:
            continue  # removed between the listing and the stat
    return found


def strip_options(argv: Sequence[str], options: dict[str, int]) -> list[str]:
    """``argv`` without ``options`` (name -> how many values follow it; ``--name=value`` too)."""
    out: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in options:
            skip = 0 if "=" in arg else options[name]
            continue
        out.append(arg)
    return out


def reserve(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` without listening (``SO_REUSEPORT``: the children bind it too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Reloader:
    """Runs ``command`` (plus ``--port P --reuse-port``) and restarts it on source changes."""

    def __init__(self, command: Sequence[str], host: str, port: int, directories: Sequence[str], *, stop_timeout: float) -> None:
        self.command = list(command)
        self.host, self.port = host, port
        self.directories = [str(Path(d).resolve()) for d in directories]
        self.stop_timeout = stop_timeout
        self.child: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; returns the exit code (0)."""
        sock = reserve(self.host, self.port)
        self.port = sock.getsockname()[1]
        previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        logger.info("tether reloading on changes under %s", ", ".join(self.directories))
        try:
            seen = _mtimes(self.directories)
            self._start()
            while True:
                time.sleep(POLL_INTERVAL)  # the polling interval of the file watch
                now = _mtimes(self.directories)
                if now != seen:
                    changed = sorted({*now.keys() ^ seen.keys(), *(p for p in now if p in seen and now[p] != seen[p])})
                    logger.info("tether: %s changed; restarting", ", ".join(map(str, changed[:3])))
                    seen = now
                    self._stop()
                    self._start()
                elif self.child is not None and self.child.poll() is not None:
                    logger.warning("tether: the server exited with %s; waiting for a change", self.child.returncode)
                    self.child = None
        except _Stop:
            logger.info("tether: stopping")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop()
            sock.close()
        return 0

    def _start(self) -> None:
        argv = [*self.command, "--port", str(self.port), "--reuse-port"]
        env = {**os.environ, "TETHER_RELOAD": "false"}
        self.child = subprocess.Popen(argv, env=env)

    def _stop(self) -> None:
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            logger.warning("tether: the server did not stop in %.0fs; killing it", self.stop_timeout)
            child.kill()
            child.wait()


def child_command(argv: Sequence[str]) -> list[str]:
    """The child's command line: this one without the reload and port options."""
    rest = strip_options(argv, {"--reload": 0, "--no-reload": 0, "--reload-dir": 1, "--port": 1, "--reuse-port": 0})
    return [sys.executable, "-m", "tether", *rest]


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()
