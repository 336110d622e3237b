"""``make demo``: the video-call app at http://127.0.0.1:8000, the tutorial's page at ``/hello``.

    python -m examples.call.server [--host 127.0.0.1] [--port 8000] [--ice-servers JSON]

- ``/``: start a call (a random name) or join one; ``/call/<name>``: the call itself.
- ``/ws``: the call app (``examples/call/app.py``).
- ``/hello``, ``/socket``, ``/typed``, ``/chat``: the tutorial's conversation (``examples/hello``).

``--ice-servers`` (or ``$ICE_SERVERS``) is a JSON list of ``RTCIceServer``s, e.g.
``'[{"urls": "stun:stun.l.google.com:19302"}]'``; none are needed on one machine or a LAN.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

import tether
from examples.hello.server import ROUTES as HELLO_ROUTES
from examples.hello.server import STATIC as HELLO_STATIC

from .app import IceServer, make_app

__all__ = ["STATIC", "build_site", "make_routes", "serve", "main"]

STATIC = Path(__file__).parent / "static"
#: Keepalive for the demo: a browser that vanished without a close frame is noticed within
#: about ping_interval + ping_timeout; its session then waits ``app.RESUME.window`` (30 s) for
#: it to come back before it leaves the call's presence.
SETTINGS: dict[str, Any] = {"ping_interval": 5.0, "ping_timeout": 5.0}
#: A call is a link: /call/<room> is the call page, which reads the room from the address.
PAGES = {"/call/": "call/index.html"}


def make_routes(*, ice_servers: list[IceServer] | None = None) -> dict[str, tether.Handler]:
    """The call app at ``/ws`` next to the tutorial's endpoints."""
    return {"/ws": make_app(ice_servers=ice_servers), **HELLO_ROUTES}


def build_site(directory: Path) -> Path:
    """Put the demo's pages into ``directory``: the call app's, and the tutorial's as ``/hello``.

    A tether server serves one ``static_dir``, so the two examples' pages are copied side by
    side; ``directory`` must not exist yet. Returns ``directory``.
    """
    shutil.copytree(STATIC, directory)
    shutil.copytree(HELLO_STATIC, directory / "hello")
    return directory


async def serve(
    host: str, port: int, *, ice_servers: list[IceServer] | None = None, ready: Callable[[int], None] | None = None
) -> None:
    """Serve the demo until SIGINT or SIGTERM; ``ready(port)`` once it accepts connections."""
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as tmp:
        site = build_site(Path(tmp) / "site")
        routes = make_routes(ice_servers=ice_servers)
        async with tether.serve(routes, host, port, static_dir=site, pages=PAGES, **SETTINGS) as server:
            if ready is not None:
                ready(server.port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()


def _ice_servers(text: str | None) -> list[IceServer]:
    if not text:
        return []
    try:
        return msgspec.json.decode(text, type=list[IceServer])
    except msgspec.DecodeError as exc:
        raise argparse.ArgumentTypeError(f"--ice-servers: {exc}") from None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.call.server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="0 picks a free port")
    parser.add_argument("--ice-servers", type=_ice_servers, default=os.environ.get("ICE_SERVERS"), metavar="JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("call", "hello"):  # who joins which call; the tutorial's "Received message" lines
        logging.getLogger(name).setLevel(logging.INFO)

    def ready(port: int) -> None:
        print(f"tether demo: open http://{args.host}:{port}/ (the tutorial's page: /hello; Ctrl-C to stop)", flush=True)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(args.host, args.port, ice_servers=args.ice_servers or [], ready=ready))


if __name__ == "__main__":
    main()
