"""Protocol logic with no I/O and no asyncio: bytes or events in, decisions out.

- ``frames``: RFC 6455 receive rules picows leaves to tether, and server frames for broadcast.
- ``envelope``: the one ``{"type", "data", "id", "room"}`` envelope and the error codes.
- ``keepalive``, ``backoff``: heartbeat decisions and the reconnect schedule (shared with
  ``static/tether.js`` through ``tests/vectors``).
- ``limits``: the per-connection rate limit (a token bucket).
- ``flow``: write-buffer high/low water marks (the transports that buffer writes themselves).
- ``session``: a reconnecting client's bookkeeping (outbox, pending requests, reconnect
  decisions), the same rules as tether.js.

The current time and random numbers are arguments, never read here.
"""
