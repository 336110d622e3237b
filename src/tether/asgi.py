"""``tether.asgi``: the public name of :mod:`tether.transport.asgi` (docs/asgi.md)."""

from .transport.asgi import ASGIApp, ASGIWire, asgi, request_from_scope

__all__ = ["ASGIApp", "ASGIWire", "asgi", "request_from_scope"]
