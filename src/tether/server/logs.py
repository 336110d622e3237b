"""The server's log lines: one per connection opened and closed, text or JSON.

.. code-block:: text

    INFO tether.access open /chat 203.0.113.7:51234
    INFO tether.access close /chat 203.0.113.7:51234 code=1000 12.031s in=14 out=15

    {"time": "2026-12-01T10:00:00.123Z", "level": "info", "logger": "tether.access",
     "message": "close /chat 203.0.113.7:51234 code=1000 12.031s in=14 out=15", "event": "close",
     "path": "/chat", "remote": "203.0.113.7:51234", "code": 1000, "duration_seconds": 12.031,
     "messages_in": 14, "messages_out": 15}

Access lines go to the ``tether.access`` logger at INFO; they cost nothing unless that level
is enabled (checked once per connection, when it opens). :func:`configure` is what
``tether run --log-level L --log-format text|json [--no-access-log]`` does. Any record's
``extra=`` fields become JSON fields (handler errors carry the message ``type``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from ..conn import Conn

__all__ = ["ACCESS", "JSONFormatter", "access_enabled", "configure", "log_close", "log_open"]

ACCESS = logging.getLogger("tether.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LEVELS = ("critical", "error", "warning", "info", "debug")
# The attributes every LogRecord has: anything else came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the record's ``extra=`` fields, and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str = "info", format: str = "text", *, access_log: bool = True) -> None:
    """Log to stderr at ``level`` in ``format`` (``text`` or ``json``), replacing the root
    logger's handlers; ``access_log=False`` silences the per-connection lines."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    ACCESS.setLevel(logging.NOTSET if access_log else logging.WARNING)


def access_enabled() -> bool:
    return ACCESS.isEnabledFor(logging.INFO)


def _remote(conn: Conn) -> str:
    address = conn.remote_address
    if address is None:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def log_open(conn: Conn) -> None:
    remote = _remote(conn)
    ACCESS.info("open %s %s", conn.path, remote, extra={"event": "open", "path": conn.path, "remote": remote})


def log_close(conn: Conn, seconds: float) -> None:
    """The close line: ``code``, how long the connection lasted, and its messages in and out
    (``Conn.messages_in``/``messages_out`` where the connection counts them)."""
    remote = _remote(conn)
    code = conn.close_code if conn.close_code is not None else 1006
    received: int | None = getattr(conn, "messages_in", None)
    sent: int | None = getattr(conn, "messages_out", None)
    fields = {
        "event": "close",
        "path": conn.path,
        "remote": remote,
        "code": code,
        "duration_seconds": round(seconds, 6),
        "messages_in": received,
        "messages_out": sent,
    }
    ACCESS.info("close %s %s code=%d %.3fs in=%s out=%s", conn.path, remote, code, seconds, received, sent, extra=fields)
