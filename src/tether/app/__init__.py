"""Typed apps: :class:`App` (registration, hooks, rooms), its registry and decoder
(``registry``), the per-connection scheduler (``dispatch``), and the client's room requests
(``rooms``)."""

from .app import App
from .registry import RESERVED_TYPES

__all__ = ["App", "RESERVED_TYPES"]
