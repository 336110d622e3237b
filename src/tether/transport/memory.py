"""The in-memory transport: two :class:`tether.Conn` joined by pipes, no socket (``tether.testing``).

Frames are delivered to the receiving ``Conn`` on a later loop iteration (never inside the
writer's call, as with a socket), in order, and only while it reads. More than
``write_limit`` bytes undelivered pause the writing ``Conn`` until a quarter is left.
:func:`open_memory` admits the server side through the same :class:`~tether.transport.base.Policy`
as tether's server and the ASGI adapter, so tests exercise origin checks and auth hooks too.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ..conn import Conn, ConnSettings, Message, Request, make_request
from ..errors import InvalidHandshake
from ..proto.flow import WriteBuffer
from ..proto.frames import OP_TEXT
from ..rooms.hub import Hub
from .base import Handler, HttpResponse, Policy, run_handler

__all__ = ["MemoryWire", "memory_pair", "open_memory", "NO_PINGS"]

#: In-memory connections do not ping unless asked: tests should not see heartbeats.
NO_PINGS = ConnSettings(ping_interval=None, ping_timeout=None)


class _Pipe:
    """One direction of a memory connection (see the module docstring)."""

    def __init__(self, write_limit: int) -> None:
        self.source: Conn | None = None
        self.target: Conn | None = None
        self._buffer = WriteBuffer(write_limit)
        self._events: deque[tuple[Callable[[], None], int]] = deque()
        self._reading = True
        self._scheduled = False
        self.closed = False

    def put(self, event: Callable[[], None], size: int) -> None:
        if self.closed:
            return
        self._events.append((event, size))
        self._schedule()
        if self._buffer.add(size) and self.source is not None:
            self.source.on_pause_writing()

    def set_reading(self, reading: bool) -> None:
        self._reading = reading
        if reading:
            self._schedule()

    def close(self) -> None:
        self.closed = True
        self._events.clear()

    def _schedule(self) -> None:
        if not self._scheduled and self._events:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        resume = False
        while self._events and self._reading and not self.closed:
            event, size = self._events.popleft()
            resume = self._buffer.sent(size) or resume
            event()
        if resume and self.source is not None:
            self.source.on_resume_writing()


class MemoryWire:
    """The :class:`tether.conn.Transport` of one end of an in-memory connection."""

    def __init__(self, outbound: _Pipe, inbound: _Pipe) -> None:
        self._out = outbound
        self._in = inbound
        self.conn: Conn | None = None

    def write(self, opcode: int, payload: bytes) -> None:
        target = self._out.target
        assert target is not None
        message: Message = payload.decode() if opcode == OP_TEXT else payload
        self._out.put(lambda: target.on_message(message), len(payload))

    def write_frame(self, frame: bytes, opcode: int, payload: bytes) -> None:
        self.write(opcode, payload)

    def write_close(self, code: int, reason: str) -> None:
        target = self._out.target
        assert target is not None
        self._out.put(lambda: target.on_close_frame(code, reason), 0)

    def ping(self, payload: bytes) -> None:
        # The peer's transport answers pings by itself (picows does): pong right away.
        if self.conn is not None:
            asyncio.get_running_loop().call_soon(self.conn.on_pong, payload)

    def pong(self, payload: bytes) -> None:
        """No pings cross a memory wire."""

    def pause_reading(self) -> None:
        self._in.set_reading(False)

    def resume_reading(self) -> None:
        self._in.set_reading(True)

    def disconnect(self) -> None:
        """Drop the "TCP connection": both ends learn it is lost; undelivered frames vanish."""
        loop = asyncio.get_running_loop()
        for pipe in (self._out, self._in):
            if not pipe.closed:
                pipe.close()
                if pipe.target is not None:
                    loop.call_soon(pipe.target.on_lost)

    abort = disconnect  # nothing is buffered below the pipes: dropping is immediate anyway


def memory_pair(
    request: Request,
    settings: ConnSettings = NO_PINGS,
    *,
    write_limit: int = 1 << 16,
    max_queue: int | None = None,
) -> tuple[Conn, Conn]:
    """Two connected ``Conn`` objects, ``(server, client)``, with no socket between them.

    Call it inside a running event loop. ``request`` is what the server side sees.
    """
    if max_queue is not None:
        settings = replace(settings, max_queue=max_queue)
    to_client, to_server = _Pipe(write_limit), _Pipe(write_limit)
    server_wire, client_wire = MemoryWire(to_client, to_server), MemoryWire(to_server, to_client)
    server = Conn(server_wire, request, settings)
    client = Conn(client_wire, make_request(request.path), replace(settings, ping_interval=None), is_client=True)
    server_wire.conn, client_wire.conn = server, client
    to_client.source, to_client.target = server, client
    to_server.source, to_server.target = client, server
    return server, client


def open_memory(
    handler: Handler,
    request: Request,
    *,
    policy: Policy | None = None,
    settings: ConnSettings = NO_PINGS,
    write_limit: int = 1 << 16,
    hub: Hub | None = None,
) -> tuple[Conn, Conn, asyncio.Task[None]]:
    """Admit ``request`` under ``policy`` and run ``handler`` on the server end of a memory pair.

    Returns ``(server, client, task)``, ``task`` being the handler's run. Raises
    :class:`tether.InvalidHandshake` with the HTTP status when the policy refuses.
    """
    policy = policy if policy is not None else Policy()
    decision = policy.admit(request)
    if isinstance(decision, HttpResponse):
        raise InvalidHandshake(f"server refused the WebSocket upgrade: {decision.body.decode().strip()}", decision.status)
    server, client = memory_pair(request, settings, write_limit=write_limit)
    server.hub = hub
    task = asyncio.get_running_loop().create_task(run_handler(policy.open(server, decision, handler), server))
    return server, client, task
