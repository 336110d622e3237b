"""tether's own server: ``serve``/``run``, routes and plain HTTP (``http``), N worker processes
(``workers``), access logs (``logs``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from ..transport.base import Handler
from .server import Routes, Server, run_one, serve
from .workers import serve_workers

__all__ = ["Handler", "Server", "run", "serve", "serve_workers", "multiprocess_dir"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def run(routes: Handler | Routes, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1, **kwargs: Any) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully. Uses uvloop when installed.

    ``workers=N`` runs N processes on the same port (:func:`tether.serve_workers`); they need
    a shared ``broker=`` (e.g. ``"redis://127.0.0.1:6379/0"``), else ``ValueError``. With
    ``metrics=True`` they share a metrics directory, so any worker's ``/metrics`` covers them
    all: ``PROMETHEUS_MULTIPROC_DIR`` if set, else a temporary one removed at the end.
    """
    if workers != 1:
        with multiprocess_dir(bool(kwargs.get("metrics"))):
            serve_workers(routes, host, port, workers=workers, **kwargs)
        return
    run_one(routes, host, port, **kwargs)


@contextlib.contextmanager
def multiprocess_dir(wanted: bool = True) -> Iterator[str | None]:
    """``PROMETHEUS_MULTIPROC_DIR`` for the worker processes started inside: the one set
    already (kept), or a fresh temporary directory, removed (and the variable unset) on exit.

    Set it before anything imports prometheus_client's metrics of its own (the application's)
    when they should add up over the workers: prometheus_client picks its storage then.
    """
    if not wanted or os.environ.get(MULTIPROC_ENV):
        yield os.environ.get(MULTIPROC_ENV) or None
        return
    directory = tempfile.mkdtemp(prefix="tether-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        if os.environ.get(MULTIPROC_ENV) == directory:
            del os.environ[MULTIPROC_ENV]
        shutil.rmtree(directory, ignore_errors=True)
