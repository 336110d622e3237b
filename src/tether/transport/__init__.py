"""Transports: what carries a :class:`tether.Conn`'s frames.

Each implements :class:`tether.conn.Transport` (what ``Conn`` asks of it) and drives the
``Conn`` through :class:`tether.conn.TransportEvents`; all admit connections through one
:class:`tether.transport.base.Policy` and run handlers with ``base.run_handler``.

- ``picows``: tether's own server and the Python client (the only module importing picows);
- ``asgi``: an App or handler as an ASGI application (Starlette, FastAPI, under uvicorn);
- ``memory``: two ``Conn`` joined by in-memory pipes (``tether.testing``).
"""
