"""tether's own server: ``serve``/``run``, routes and plain HTTP (``http``), N worker processes
(``workers``)."""

from __future__ import annotations

from typing import Any

from ..transport.base import Handler
from .server import Routes, Server, run_one, serve
from .workers import serve_workers

__all__ = ["Handler", "Server", "run", "serve", "serve_workers"]


def run(routes: Handler | Routes, host: str = "127.0.0.1", port: int = 8000, *, workers: int = 1, **kwargs: Any) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully. Uses uvloop when installed.

    ``workers=N`` runs N processes on the same port (:func:`tether.serve_workers`); they need
    a shared ``broker=`` (e.g. ``"redis://127.0.0.1:6379/0"``), else ``ValueError``.
    """
    if workers != 1:
        serve_workers(routes, host, port, workers=workers, **kwargs)
        return
    run_one(routes, host, port, **kwargs)
