"""The ``tether`` command.

    tether schema module:app                  # AsyncAPI 3.0 (JSON) of an App's messages
    tether schema module:app --typescript     # TypeScript declarations for tether.js
    tether run module:app [options]           # serve an App, a handler or a dict of routes

``tether run`` is modelled on uvicorn's command line: ``--host``, ``--port``, ``--workers``
(default ``$WEB_CONCURRENCY``), ``--factory``, ``--reload``, ``--ssl-certfile``/``--ssl-keyfile``,
``--proxy-headers`` with ``--forwarded-allow-ips``, ``--ws-ping-interval``..., and every option
can come from a ``TETHER_*`` environment variable instead (``tether run --help`` lists them;
a command-line option wins over its variable). A bad ``module:app`` or a bad combination of
options is one line on stderr and exit code 2; SIGTERM or SIGINT shut the server down
gracefully and the command exits 0. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from .app import App
from .server.config import ConfigError, RunConfig

__all__ = ["main", "build_parser", "load", "BadTarget"]

logger = logging.getLogger("tether")


class BadTarget(Exception):
    """A ``module:attribute`` that cannot be loaded; its message is the one line to print."""


def load(target: str) -> Any:
    """Import ``module:attribute`` (the current directory is importable).

    Raises :class:`BadTarget` with a one-line explanation when it cannot.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise BadTarget(f"expected module:attribute, got {target!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise BadTarget(f"cannot import {module_name!r}: no such module") from None
        raise  # the module exists but imports something missing: its traceback is the news
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadTarget(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


# -- tether run's options ----------------------------------------------------------------------
def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _none_or(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind``, or None for ``none``/``off`` (the setting disabled)."""

    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "off"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _Options:
    """Adds each option with its ``TETHER_*`` variable: the variable is the default."""

    def __init__(self, parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
        self.parser, self.environ = parser, environ
        self.group: Any = parser
        self.env_of: dict[str, str] = {}

    def section(self, title: str) -> None:
        self.group = self.parser.add_argument_group(title)

    def value(self, flag: str, env: str, default: Any, help: str, *, type: Callable[[str], Any] = str, **kw: Any) -> None:
        shown = "none" if default is None else default
        env_default = self.environ.get(env)
        self.env_of[flag] = env
        self.group.add_argument(
            flag,
            type=type,
            default=env_default if env_default is not None else default,  # argparse converts strings with type
            help=f"{help} [env {env}; default: {shown}]",
            **kw,
        )

    def flag(self, flag: str, env: str, default: bool | None, help: str) -> None:
        env_default = self.environ.get(env)
        self.env_of[flag] = env
        try:
            value = _bool(env_default) if env_default is not None else default
        except argparse.ArgumentTypeError as exc:
            self.parser.error(f"{env}: {exc}")
        shown = "on" if default else "off"
        self.group.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=value, help=f"{help} [env {env}; default: {shown}]"
        )

    def many(self, flag: str, env: str, help: str) -> None:
        env_default = self.environ.get(env)
        self.env_of[flag] = env
        self.group.add_argument(
            flag, action="append", default=_csv(env_default) if env_default else None, help=f"{help} [env {env}, comma-separated]"
        )


def _add_run_options(run: argparse.ArgumentParser, environ: Mapping[str, str]) -> _Options:
    opts = _Options(run, environ)
    run.add_argument("app", nargs="?", default=environ.get("TETHER_APP"), help="module:attribute of an App, a handler or a dict of routes [env TETHER_APP]")
    opts.flag("--factory", "TETHER_FACTORY", False, "the target is a function returning the app: call it")
    opts.value("--app-dir", "TETHER_APP_DIR", ".", "directory to import the module from")

    opts.section("socket")
    opts.value("--host", "TETHER_HOST", "127.0.0.1", "address to listen on")
    opts.value("--port", "TETHER_PORT", 8000, "port to listen on (0: any free port)", type=int)
    workers = environ.get("WEB_CONCURRENCY") or 1
    opts.value("--workers", "TETHER_WORKERS", workers, "worker processes on the port (needs --broker); $WEB_CONCURRENCY too", type=int)
    opts.flag("--reuse-port", "TETHER_REUSE_PORT", False, "bind with SO_REUSEPORT (other processes may share the port)")
    opts.value("--ssl-certfile", "TETHER_SSL_CERTFILE", None, "TLS certificate file (PEM): serve wss:// and https://")
    opts.value("--ssl-keyfile", "TETHER_SSL_KEYFILE", None, "TLS private key file (PEM)")
    opts.value("--ssl-keyfile-password", "TETHER_SSL_KEYFILE_PASSWORD", None, "password of the key file")

    opts.section("application")
    opts.value("--broker", "TETHER_BROKER", None, "rooms broker URL, e.g. redis://127.0.0.1:6379/0")
    opts.value("--static", "TETHER_STATIC", None, "directory of static files to serve")
    opts.value("--allowed-origins", "TETHER_ALLOWED_ORIGINS", None, "comma-separated origins allowed ('*': any; default same-origin)", type=_csv)

    opts.section("logging")
    opts.value("--log-level", "TETHER_LOG_LEVEL", "info", "critical, error, warning, info or debug", type=str.lower)
    opts.value("--log-format", "TETHER_LOG_FORMAT", "text", "text or json (one object per line)", type=str.lower)
    opts.flag("--access-log", "TETHER_ACCESS_LOG", True, "one line per connection opened and closed")

    opts.section("development")
    opts.flag("--reload", "TETHER_RELOAD", False, "restart when a .py file changes (one process only)")
    opts.many("--reload-dir", "TETHER_RELOAD_DIRS", "directory to watch with --reload (default: --app-dir)")

    opts.section("behind a proxy")
    opts.flag("--proxy-headers", "TETHER_PROXY_HEADERS", False, "believe X-Forwarded-For/-Proto/-Host and Forwarded from --forwarded-allow-ips")
    allow = environ.get("FORWARDED_ALLOW_IPS") or "127.0.0.1"
    opts.value("--forwarded-allow-ips", "TETHER_FORWARDED_ALLOW_IPS", allow, "comma-separated proxy addresses or networks to trust ('*': any); $FORWARDED_ALLOW_IPS too")

    opts.section("keepalive and limits ('none' turns a setting off)")
    opts.value("--ws-ping-interval", "TETHER_WS_PING_INTERVAL", 20.0, "seconds between pings (keep below the proxy's read timeout)", type=_none_or(float))
    opts.value("--ws-ping-timeout", "TETHER_WS_PING_TIMEOUT", 20.0, "seconds without a pong before the peer is dropped", type=_none_or(float))
    opts.value("--ws-max-size", "TETHER_WS_MAX_SIZE", 1 << 20, "largest message in bytes", type=_none_or(int))
    opts.value("--ws-max-queue", "TETHER_WS_MAX_QUEUE", 32, "messages buffered per connection before reading pauses", type=int)
    opts.value("--max-connections", "TETHER_MAX_CONNECTIONS", None, "open connections before new ones get 503", type=_none_or(int))
    opts.value("--max-send-queue", "TETHER_MAX_SEND_QUEUE", 256, "broadcast frames queued per slow connection", type=_none_or(int))
    opts.value("--send-overflow", "TETHER_SEND_OVERFLOW", "drop_oldest", "a full send queue: drop_oldest or close (1013)")
    opts.value("--handshake-timeout", "TETHER_HANDSHAKE_TIMEOUT", 5.0, "seconds to complete the opening handshake", type=_none_or(float))
    opts.value("--close-timeout", "TETHER_CLOSE_TIMEOUT", 5.0, "seconds to complete the closing handshake", type=float)

    opts.section("shutdown (SIGTERM, SIGINT)")
    opts.value("--drain-delay", "TETHER_DRAIN_DELAY", 0.0, "seconds /ready answers 503 before connections close", type=float)
    opts.value("--timeout-graceful-shutdown", "TETHER_TIMEOUT_GRACEFUL_SHUTDOWN", 10.0, "seconds for connections to close", type=float)
    opts.value("--shutdown-spread", "TETHER_SHUTDOWN_SPREAD", 5.0, "seconds clients are told to spread their reconnects over", type=float)

    opts.section("metrics")
    opts.flag("--metrics", "TETHER_METRICS", None, "Prometheus metrics at /metrics (needs tether[metrics]; on when installed)")
    return opts


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command's parser; option defaults come from ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="tether", description="tether: realtime messaging over WebSockets", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    schema = sub.add_parser("schema", help="print the schema of an App", allow_abbrev=False)
    schema.add_argument("app", help="module:attribute of a tether.App")
    schema.add_argument("--typescript", action="store_true", help="TypeScript declarations instead of AsyncAPI")
    schema.add_argument("--title", default=None)
    schema.add_argument("--address", default="/", help="the path the App is mounted at")
    run = sub.add_parser("run", help="serve an App, a handler or a dict of routes", allow_abbrev=False)
    run.set_defaults(env_of=_add_run_options(run, environ).env_of)
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    if not args.app:
        raise ConfigError("no app: give module:attribute (or set TETHER_APP)")
    return RunConfig(
        app=args.app,
        factory=args.factory,
        app_dir=args.app_dir,
        host=args.host,
        port=args.port,
        workers=args.workers,
        reuse_port=args.reuse_port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_keyfile_password=args.ssl_keyfile_password,
        broker=args.broker,
        static=args.static,
        allowed_origins=tuple(args.allowed_origins) if args.allowed_origins is not None else None,
        log_level=args.log_level,
        log_format=args.log_format,
        access_log=args.access_log,
        reload=args.reload,
        reload_dirs=tuple(args.reload_dir or ()),
        proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips,
        ws_ping_interval=args.ws_ping_interval,
        ws_ping_timeout=args.ws_ping_timeout,
        ws_max_size=args.ws_max_size,
        ws_max_queue=args.ws_max_queue,
        max_connections=args.max_connections,
        max_send_queue=args.max_send_queue,
        send_overflow=args.send_overflow,
        handshake_timeout=args.handshake_timeout,
        close_timeout=args.close_timeout,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        shutdown_spread=args.shutdown_spread,
        drain_delay=args.drain_delay,
        metrics=args.metrics,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schema":
            return _schema(args)
        return _run(_config(args), argv)
    except (BadTarget, ConfigError) as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2


def _schema(args: argparse.Namespace) -> int:
    target = load(args.app)
    if not isinstance(target, App):
        raise BadTarget(f"{args.app} is not a tether.App")
    from .schema import asyncapi, typescript

    if args.typescript:
        sys.stdout.write(typescript(target))
    else:
        doc = asyncapi(target, title=args.title or args.app, address=args.address)
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc)).decode() + "\n")
    return 0


def _run(config: RunConfig, argv: Sequence[str]) -> int:
    from .server import logs

    logs.configure(config.log_level, config.log_format, access_log=config.access_log)
    if config.reload:
        return _reload(config, argv)
    metrics = config.metrics_enabled()
    if config.metrics is None and not metrics:
        logger.warning("metrics off: pip install 'tether[metrics]' for /metrics")
    from .server import multiprocess_dir

    # The shared metrics directory exists before the app is imported: its own prometheus
    # metrics, if any, then add up over the workers too.
    with multiprocess_dir(metrics and config.workers > 1):
        target = _target(config)
        settings = config.settings(metrics=metrics)
        from .server import run
        from .server.workers import check_workers

        try:
            check_workers(config.workers, config.broker, target)
        except ValueError:
            raise ConfigError(
                f"--workers {config.workers} needs a shared --broker, e.g. redis://127.0.0.1:6379/0 "
                "(with the in-memory one each worker would have rooms of its own)"
            ) from None
        run(target, **settings)
    return 0


def _target(config: RunConfig) -> Any:
    """The served object: ``module:attribute`` (called with ``--factory``), checked."""
    app_dir = os.path.abspath(config.app_dir)
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    target = load(config.app)
    if config.factory:
        if not callable(target):
            raise BadTarget(f"{config.app} is not callable (--factory)")
        target = target()
    if isinstance(target, (App, Mapping)):
        return target
    if callable(target) and not isinstance(target, type):
        if not config.factory and _takes_nothing(target):
            raise BadTarget(f"{config.app} takes no arguments: a factory? add --factory")
        return target
    raise BadTarget(f"{config.app} is not an App, a handler or a dict of routes")


def _takes_nothing(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in parameters)


def _reload(config: RunConfig, argv: Sequence[str]) -> int:
    from .server.reload import Reloader, child_command

    _target(config)  # a bad target is one line now, not a restart loop
    directories = list(config.reload_dirs) or [config.app_dir]
    reloader = Reloader(child_command(argv), config.host, config.port, directories, stop_timeout=config.timeout_graceful_shutdown + config.drain_delay + 5.0)
    return reloader.run()


if __name__ == "__main__":
    raise SystemExit(main())
