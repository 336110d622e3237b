"""The plain HTTP side of tether's server: the answers to requests that are not WebSockets.

``/health`` (liveness: the process serves), ``/ready`` (readiness, answered by the server:
:func:`readiness`), ``/metrics`` (when metrics are on: :func:`metrics_response`), the browser
client (``/tether.js``, ``/tether.d.ts``), files under ``static_dir``, 404 for anything else;
and the checks of an upgrade request that the ASGI server would otherwise do (426 without
``Upgrade: websocket`` or with a version other than 13, 431 for oversized headers).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

from ..conn import Request
from ..transport.base import HttpResponse

__all__ = [
    "MAX_HEADERS",
    "MAX_HEADER_LINE",
    "StaticFiles",
    "check_upgrade",
    "headers_too_large",
    "metrics_response",
    "readiness",
]

_CLIENT_FILES = {"/tether.js": "tether.js", "/tether.d.ts": "tether.d.ts"}
# Request header limits (answered with 431). picows itself answers 400 beyond 128 headers and
# drops a request head of 16 KiB or more; a single 9 KB line would pass it.
MAX_HEADERS = 100
MAX_HEADER_LINE = 8192

TOO_LARGE = HttpResponse(431, b"431 Request Header Fields Too Large\n")
NOT_FOUND = HttpResponse(404, b"404 Not Found\n")
NOT_WEBSOCKET = HttpResponse(426, b"426 Upgrade Required: this path is a WebSocket endpoint\n", (("Upgrade", "websocket"),))
# RFC 6455 section 4.2.2: tell the client which version we speak.
BAD_VERSION = HttpResponse(426, b"426 Upgrade Required: WebSocket version 13 only\n", (("Sec-WebSocket-Version", "13"),))


_NO_STORE = ("Cache-Control", "no-store")
READY = HttpResponse(200, b"ready\n", (_NO_STORE,))


def readiness(draining: bool, brokers_up: bool) -> HttpResponse:
    """``/ready``: 200 while the server takes new connections and reaches its broker; 503
    from the start of a graceful shutdown (a load balancer stops sending) or while the broker
    is unreachable, with the reason in the body."""
    if draining:
        return HttpResponse(503, b"not ready: draining\n", (_NO_STORE,))
    if not brokers_up:
        return HttpResponse(503, b"not ready: broker unreachable\n", (_NO_STORE,))
    return READY


def metrics_response(body: bytes, content_type: str) -> HttpResponse:
    """``/metrics``: a Prometheus scrape."""
    return HttpResponse(200, body, (("Content-Type", content_type), _NO_STORE))


def headers_too_large(headers: Mapping[str, str]) -> bool:
    """More than MAX_HEADERS headers, or a header value longer than a MAX_HEADER_LINE line.

    Only values are measured: iterating a multidict's keys materializes ~0.5 KiB per
    connection that it then keeps. Names are bounded by picows' 16 KiB limit on the head.
    """
    return len(headers) > MAX_HEADERS or any(len(v) + 2 > MAX_HEADER_LINE for v in headers.values())


def check_upgrade(request: Request) -> HttpResponse | None:
    """A refusal if ``request`` is not a WebSocket upgrade tether speaks, else None."""
    headers = request.headers
    if "websocket" not in headers.get("Upgrade", "").lower():
        return NOT_WEBSOCKET
    if headers.get("Sec-WebSocket-Version") != "13":
        return BAD_VERSION
    return None


class StaticFiles:
    """GET answers: ``/health``, the browser client, and files under ``directory``.

    ``pages`` maps a path prefix to one file of ``directory`` served for every path under it
    that is no file of its own (``{"/call/": "call/index.html"}``: ``/call/<room>`` is a
    page that reads its room from the address, as single-page apps do).
    """

    def __init__(self, directory: str | Path | None, pages: Mapping[str, str] | None = None) -> None:
        self.directory = Path(directory).resolve() if directory is not None else None
        # Longest prefix first, so "/a/b/" wins over "/a/".
        self.pages = sorted((pages or {}).items(), key=lambda item: -len(item[0]))

    def get(self, path: str) -> HttpResponse:
        if path == "/health":
            return HttpResponse(200, b"ok\n")
        if path in _CLIENT_FILES:
            body = resources.files("tether").joinpath("static", _CLIENT_FILES[path]).read_bytes()
            return _file_response(_CLIENT_FILES[path], body)
        name = unquote(path)  # browsers percent-encode names ("a%20b.txt")
        if self.directory is not None and "\0" not in name:
            target = (self.directory / name.lstrip("/")).resolve()
            if target.is_dir():
                target = target / "index.html"
            if target.is_relative_to(self.directory) and target.is_file():
                return _file_response(target.name, target.read_bytes())
            for prefix, page in self.pages:
                if name.startswith(prefix):
                    target = (self.directory / page).resolve()
                    if target.is_relative_to(self.directory) and target.is_file():
                        return _file_response(target.name, target.read_bytes())
        return NOT_FOUND


def _file_response(name: str, body: bytes) -> HttpResponse:
    ctype = {".js": "text/javascript", ".ts": "text/plain"}.get(Path(name).suffix) or mimetypes.guess_type(name)[0]
    ctype = ctype or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    return HttpResponse(200, body, (("Content-Type", ctype), ("Cache-Control", "no-cache")))
