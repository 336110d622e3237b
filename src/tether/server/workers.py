"""N worker processes on one port: ``tether.run(app, workers=4, broker="redis://...")``.

Each worker is a forked process running its own event loop and server, listening on the
same ``host:port`` with ``SO_REUSEPORT``: the kernel spreads new connections over the
workers. Rooms span workers only through a shared broker, so ``workers > 1`` without one
is refused (each worker would silently have its own rooms). Across machines, run one
``tether.run`` (with workers or not) per machine with the same ``broker=`` URL.

The parent only supervises. SIGINT/SIGTERM is passed on to every worker (each shuts down
gracefully, see :meth:`tether.Server.close`). A worker that dies is restarted:

* one that ran at least ``stable_after`` seconds (default 10) had started fine: it is
  restarted at once, and its count of failed starts goes back to zero;
* one that died sooner *failed to start*: it is restarted after a delay that doubles from
  0.5 s up to 10 s. After ``max_failed_starts`` (default 5) failed starts in a row of one
  worker the parent gives up: it logs why, stops the other workers gracefully and raises
  ``SystemExit(1)``, so ``tether.run(..., workers=N)`` ends the process with exit status 1
  and a process manager (systemd, Kubernetes) sees the failure.

Needs ``fork`` (Linux, macOS) and ``SO_REUSEPORT``.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from ..app import App
from ..rooms.hub import is_shared
from .server import run_one

__all__ = ["serve_workers", "check_workers"]

logger = logging.getLogger("tether")

_BACKOFF_BASE = 0.5  # seconds before restarting a worker after its first failed start
_BACKOFF_CAP = 10.0


class _Stop(Exception):
    """SIGTERM reached the supervising parent."""


class _GiveUp(Exception):
    """A worker failed to start ``max_failed_starts`` times in a row."""

    def __init__(self, index: int, failed: int) -> None:
        super().__init__(index, failed)
        self.index, self.failed = index, failed


def check_workers(workers: int, broker: Any, routes: Any) -> None:
    """Raise ``ValueError`` unless ``workers`` processes would share their rooms."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or is_shared(broker):
        return
    handlers = routes.values() if hasattr(routes, "values") else [routes]
    apps = [h for h in handlers if isinstance(h, App)]
    if apps and all(h.own_hub is not None and h.own_hub.broker.shared for h in apps):
        return
    raise ValueError(
        f"workers={workers} needs a shared broker, e.g. broker='redis://127.0.0.1:6379/0' "
        "(pip install 'tether[redis]'): with the in-memory broker each worker has its own "
        "rooms and broadcasts would silently reach only part of each room"
    )


def serve_workers(
    routes: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    workers: int,
    max_failed_starts: int = 5,
    stable_after: float = 10.0,
    **kwargs: Any,
) -> None:
    """Run ``workers`` server processes on ``host:port`` until SIGINT/SIGTERM.

    ``kwargs`` are :func:`tether.run` settings (``broker=`` must be shared when
    ``workers > 1``). ``port=0`` picks one free port for all workers. A worker that exits
    within ``stable_after`` seconds of its start failed to start; after
    ``max_failed_starts`` in a row the other workers are stopped gracefully and
    ``SystemExit(1)`` is raised (see the module's docstring). Raises ``ValueError`` for a
    missing shared broker or ``max_failed_starts < 1``, ``OSError`` if the port cannot be
    bound.
    """
    check_workers(workers, kwargs.get("broker"), routes)
    if max_failed_starts < 1:
        raise ValueError(f"max_failed_starts must be >= 1, got {max_failed_starts}")
    reserve = _reserve(host, port)  # held open so port=0 names one port for every worker
    port = reserve.getsockname()[1]
    supervisor = _Supervisor((routes, host, port, kwargs), workers, max_failed_starts, stable_after)
    gave_up = False
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        supervisor.start()
        logger.info("tether serving on http://%s:%d with %d workers (pids %s)", host, port, workers, supervisor.pids())
        supervisor.run()
    except (KeyboardInterrupt, _Stop):
        logger.info("stopping %d workers", workers)
    except _GiveUp as exc:
        gave_up = True
        logger.error("worker %d failed to start %d times in a row; stopping the other workers, exiting with status 1", exc.index, exc.failed)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_all(supervisor.running(), kwargs.get("shutdown_timeout", 10.0) + 5.0)
        reserve.close()
    if gave_up:
        raise SystemExit(1)


def _reserve(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))  # bound, never listening: takes no connections
    return sock


def _worker(routes: Any, host: str, port: int, kwargs: dict[str, Any]) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run_one(routes, host, port, reuse_port=True, **kwargs)


@dataclass
class _Slot:
    """One worker's place: its process (None while a restart is due) and its failed starts."""

    index: int
    proc: BaseProcess | None = None
    started: float = 0.0
    failed: int = 0  # failed starts in a row
    restart_at: float | None = None


class _Supervisor:
    """Starts the workers, waits for any to exit, restarts it (at once or after a delay)."""

    def __init__(self, target: tuple[Any, str, int, dict[str, Any]], workers: int, max_failed_starts: int, stable_after: float) -> None:
        self.target = target
        self.max_failed_starts, self.stable_after = max_failed_starts, stable_after
        self.context = multiprocessing.get_context("fork")
        self.slots = [_Slot(index) for index in range(workers)]

    def start(self) -> None:
        for slot in self.slots:
            self.spawn(slot)

    def spawn(self, slot: _Slot) -> None:
        proc = self.context.Process(target=_worker, args=self.target, name=f"tether-worker-{slot.index}", daemon=False)
        proc.start()
        slot.proc, slot.started, slot.restart_at = proc, time.monotonic(), None

    def pids(self) -> list[int | None]:
        return [slot.proc.pid if slot.proc is not None else None for slot in self.slots]

    def running(self) -> list[tuple[int, BaseProcess]]:
        return [(slot.index, slot.proc) for slot in self.slots if slot.proc is not None]

    def run(self) -> None:
        """Supervise until a signal (``KeyboardInterrupt``, ``_Stop``) or ``_GiveUp``."""
        while True:
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= time.monotonic():
                    self.spawn(slot)
                    logger.info("worker %d restarted (pid %s)", slot.index, slot.proc.pid if slot.proc else None)
            alive = {slot.proc.sentinel: slot for slot in self.slots if slot.proc is not None}
            due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
            wait = max(0.0, min(due) - time.monotonic()) if due else None
            for sentinel in multiprocessing.connection.wait(list(alive), wait):
                self.exited(alive[sentinel])  # type: ignore[index]

    def exited(self, slot: _Slot) -> None:
        assert slot.proc is not None
        proc, slot.proc = slot.proc, None
        proc.join()
        ran = time.monotonic() - slot.started
        how = _exit_status(proc.exitcode)
        if ran >= self.stable_after:
            slot.failed, slot.restart_at = 0, time.monotonic()
            logger.error("worker %d (pid %s) exited with %s after running %.1fs; restarting it", slot.index, proc.pid, how, ran)
            return
        slot.failed += 1
        args = (slot.index, proc.pid, how, ran, slot.failed, self.max_failed_starts)
        if slot.failed >= self.max_failed_starts:
            logger.error("worker %d (pid %s) exited with %s %.1fs after its start (failed start %d of %d); giving up", *args)
            raise _GiveUp(slot.index, slot.failed)
        # Doubling, capped: a worker that cannot start must neither spin the CPU nor flood the log.
        delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (slot.failed - 1))
        slot.restart_at = time.monotonic() + delay
        logger.error("worker %d (pid %s) exited with %s %.1fs after its start (failed start %d of %d); restarting it in %.1fs", *args, delay)


def _exit_status(code: int | None) -> str:
    """``exit status 1`` or ``signal SIGKILL``, from a ``Process.exitcode``."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def _stop_all(procs: list[tuple[int, BaseProcess]], timeout: float) -> None:
    """SIGTERM every worker (each shuts down gracefully), SIGKILL those left at ``timeout``."""
    for _, proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for index, proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            logger.warning("worker %d (pid %s) did not stop in time; killing it", index, proc.pid)
            proc.kill()
            proc.join()
        logger.info("worker %d (pid %s) stopped: %s", index, proc.pid, _exit_status(proc.exitcode))
