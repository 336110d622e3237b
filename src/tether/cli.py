"""The ``tether`` command.

    tether schema module:app                  # AsyncAPI 3.0 (JSON) of an App's messages
    tether schema module:app --typescript     # TypeScript declarations for tether.js
    tether run module:app_or_routes [--host H] [--port P] [--static DIR]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from .app import App

__all__ = ["main"]


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether", description="tether: realtime messaging over WebSockets")
    sub = parser.add_subparsers(dest="command", required=True)
    schema = sub.add_parser("schema", help="print the schema of an App")
    schema.add_argument("app", help="module:attribute of a tether.App")
    schema.add_argument("--typescript", action="store_true", help="TypeScript declarations instead of AsyncAPI")
    schema.add_argument("--title", default=None)
    schema.add_argument("--address", default="/", help="the path the App is mounted at")
    run = sub.add_parser("run", help="serve an App, a handler or a dict of routes")
    run.add_argument("app", help="module:attribute")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--static", default=None, help="directory of static files")
    args = parser.parse_args(argv)

    try:
        target = load(args.app)
    except BadTarget as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    if args.command == "schema":
        if not isinstance(target, App):
            print(f"tether: {args.app} is not a tether.App", file=sys.stderr)
            return 2
        from .schema import asyncapi, typescript

        if args.typescript:
            sys.stdout.write(typescript(target))
        else:
            doc = asyncapi(target, title=args.title or args.app, address=args.address)
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc)).decode() + "\n")
        return 0
    from .server import run as serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve_forever(target, args.host, args.port, static_dir=args.static)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
