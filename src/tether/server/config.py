"""What ``tether run`` serves with: one configuration object, validated once.

``tether.cli`` fills a :class:`RunConfig` from the command line and ``TETHER_*`` environment
variables; :meth:`RunConfig.settings` turns it into :func:`tether.run`'s keyword arguments.
Invalid combinations raise :class:`ConfigError` with a one-line message (the command prints
it and exits 2).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from ..conn import Overflow
from ..metrics import require

__all__ = ["ConfigError", "RunConfig"]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting or a combination of settings that cannot work; the message is one line."""


@dataclass(frozen=True)
class RunConfig:
    """Every ``tether run`` setting (``tether run --help`` documents each one)."""

    app: str
    factory: bool = False
    app_dir: str = "."
    # Socket
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    reuse_port: bool = False
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = None
    # The application
    broker: str | None = None
    static: str | None = None
    allowed_origins: tuple[str, ...] | None = None
    # Logging
    log_level: str = "info"
    log_format: str = "text"
    access_log: bool = True
    # Development
    reload: bool = False
    reload_dirs: tuple[str, ...] = ()
    # Behind a proxy
    proxy_headers: bool = False
    forwarded_allow_ips: str = "127.0.0.1"
    # Keepalive and limits
    ws_ping_interval: float | None = 20.0
    ws_ping_timeout: float | None = 20.0
    ws_max_size: int | None = 1 << 20
    ws_max_queue: int = 32
    max_connections: int | None = None
    max_send_queue: int | None = 256
    send_overflow: str = Overflow.DROP_OLDEST.value
    handshake_timeout: float | None = 5.0
    close_timeout: float = 5.0
    # Shutdown
    timeout_graceful_shutdown: float = 10.0
    shutdown_spread: float = 5.0
    drain_delay: float = 0.0
    # Metrics: None = on if prometheus_client is installed (the default), True = required
    metrics: bool | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.reload and self.workers > 1:
            raise ConfigError("--reload runs one process: it cannot be combined with --workers > 1")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError("--ssl-keyfile needs --ssl-certfile")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format must be text or json, got {self.log_format!r}")
        if self.send_overflow not in {o.value for o in Overflow}:
            raise ConfigError(f"--send-overflow must be drop_oldest or close, got {self.send_overflow!r}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        for name in ("timeout_graceful_shutdown", "shutdown_spread", "drain_delay", "close_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"

    def metrics_enabled(self) -> bool:
        """Whether ``/metrics`` is served. Raises :class:`ConfigError` when metrics were asked
        for explicitly and prometheus_client is missing."""
        if self.metrics is False:
            return False
        try:
            require()
        except ImportError as exc:
            if self.metrics:
                raise ConfigError(str(exc)) from None
            return False
        return True

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context from the certificate (and key) files, or None."""
        if not self.ssl_certfile:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, self.ssl_keyfile_password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {self.ssl_certfile!r}: {exc}") from None
        return context

    def settings(self, *, metrics: bool) -> dict[str, Any]:
        """:func:`tether.run` keyword arguments (``host``, ``port`` and ``workers`` included)."""
        settings: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "workers": self.workers,
            "ssl": self.ssl_context(),
            "static_dir": self.static,
            "allowed_origins": self.allowed_origins,
            "broker": self.broker,
            "max_message_size": self.ws_max_size,
            "max_queue": self.ws_max_queue,
            "max_connections": self.max_connections,
            "handshake_timeout": self.handshake_timeout,
            "close_timeout": self.close_timeout,
            "shutdown_timeout": self.timeout_graceful_shutdown,
            "shutdown_spread": self.shutdown_spread,
            "ping_interval": self.ws_ping_interval,
            "ping_timeout": self.ws_ping_timeout,
            "max_send_queue": self.max_send_queue,
            "send_overflow": self.send_overflow,
            "metrics": metrics,
            "forwarded_allow_ips": self.forwarded_allow_ips if self.proxy_headers else None,
            "drain_delay": self.drain_delay,
        }
        if self.reuse_port:  # workers bind with it anyway
            settings["reuse_port"] = True
        return settings
