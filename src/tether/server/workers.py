"""N worker processes on one port: ``tether.run(app, workers=4, broker="redis://...")``.

Each worker is a forked process running its own event loop and server, listening on the
same ``host:port`` with ``SO_REUSEPORT``: the kernel spreads new connections over the
workers. Rooms span workers only through a shared broker, so ``workers > 1`` without one
is refused (each worker would silently have its own rooms). Across machines, run one
``tether.run`` (with workers or not) per machine with the same ``broker=`` URL.

The parent only supervises: SIGINT/SIGTERM is passed on to every worker (each shuts down
gracefully, see :meth:`tether.Server.close`), and a worker that dies is restarted after a
short delay. Needs ``fork`` (Linux, macOS) and ``SO_REUSEPORT``.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from typing import Any

from ..app import App
from ..rooms.hub import is_shared
from .server import run_one

__all__ = ["serve_workers", "check_workers"]

logger = logging.getLogger("tether")

_RESTART_DELAY = 1.0


class _Stop(Exception):
    """SIGTERM reached the supervising parent."""


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


def serve_workers(routes: Any, host: str = "127.0.0.1", port: int = 8000, *, workers: int, **kwargs: Any) -> None:
    """Run ``workers`` server processes on ``host:port`` until SIGINT/SIGTERM.

    ``kwargs`` are :func:`tether.run` settings (``broker=`` must be shared when
    ``workers > 1``). ``port=0`` picks one free port for all workers. Raises ``ValueError``
    for a missing shared broker, ``OSError`` if the port cannot be bound.
    """
    check_workers(workers, kwargs.get("broker"), routes)
    reserve = _reserve(host, port)  # held open so port=0 names one port for every worker
    port = reserve.getsockname()[1]
    context = multiprocessing.get_context("fork")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}

    def spawn(index: int) -> None:
        proc = context.Process(target=_worker, args=(routes, host, port, kwargs), name=f"tether-worker-{index}", daemon=False)
        proc.start()
        procs[index] = proc

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        for index in range(workers):
            spawn(index)
        logger.info("tether serving on http://%s:%d with %d workers (pids %s)", host, port, workers, [p.pid for p in procs.values()])
        _supervise(procs, spawn)
    except (KeyboardInterrupt, _Stop):
        logger.info("stopping %d workers", len(procs))
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_all(list(procs.values()), kwargs.get("shutdown_timeout", 10.0) + 5.0)
        reserve.close()


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


def _supervise(procs: dict[int, multiprocessing.process.BaseProcess], spawn: Any) -> None:
    while True:
        sentinels = {p.sentinel: i for i, p in procs.items()}
        for sentinel in multiprocessing.connection.wait(list(sentinels)):
            index = sentinels[sentinel]  # type: ignore[index]
            code = procs[index].exitcode
            logger.error("worker %d (pid %s) exited with %s; restarting it", index, procs[index].pid, code)
            time.sleep(_RESTART_DELAY)  # a worker crashing at start must not spin the CPU
            spawn(index)


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def _stop_all(procs: list[multiprocessing.process.BaseProcess], timeout: float) -> None:
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            logger.warning("worker pid %s did not stop in time; killing it", proc.pid)
            proc.kill()
            proc.join()
