"""One handler, three transports: tether's picows server, ASGI under uvicorn, the memory transport.

``served = await start(handler, **policy)`` mounts ``handler`` at ``/app`` on the transport the
``start`` fixture is parametrized with; ``served.connect("/app?x=1", headers=...)`` opens a
client connection the same way on each (``async with`` or ``await``), raising
``tether.InvalidHandshake`` with the HTTP status when the connection policy refuses it.
Policy settings (``allowed_origins``, ``auth``, ``rate_limit``, ``max_connections``) are passed
to ``tether.serve``, ``tether.asgi.asgi`` and the memory transport's ``Policy`` alike.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

import tether
import tether.asgi
from tether.conn import make_request
from tether.transport.base import Handler, Policy
from tether.transport.memory import open_memory

TRANSPORTS = ["picows", "asgi", "memory"]
MEMORY_HOST = "testserver"  # the Host header of memory connections, like Starlette's TestClient


async def start_uvicorn(stack: AsyncExitStack, asgi_app: Any, ws: str = "auto") -> int:
    """Serve ``asgi_app`` with uvicorn on a socket we bound to 127.0.0.1:0; return its port.

    ``ws`` picks uvicorn's WebSocket implementation."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    stack.callback(sock.close)
    config = uvicorn.Config(asgi_app, lifespan="off", log_level="warning", ws=ws)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])  # returns once listening: no polling
    assert server.started
    stack.push_async_callback(server.shutdown, [sock])
    return int(sock.getsockname()[1])


class _MemoryConnect:
    """``tether.connect`` for the memory transport: ``async with`` or ``await``."""

    def __init__(self, served: Served, target: str, headers: dict[str, str] | None) -> None:
        self._served, self._target = served, target
        self._headers = {"Host": MEMORY_HOST, **(headers or {})}
        self._conn: tether.Conn | None = None

    async def _open(self) -> tether.Conn:
        request = make_request(self._target, list(self._headers.items()), ("127.0.0.1", 50000))
        assert self._served.handler is not None
        _, client, task = open_memory(self._served.handler, request, policy=self._served.policy)
        self._served.tasks.append(task)
        return client

    def __await__(self) -> Generator[Any, None, tether.Conn]:
        return self._open().__await__()

    async def __aenter__(self) -> tether.Conn:
        self._conn = await self._open()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        assert self._conn is not None
        await self._conn.close()


class Served:
    """A handler served on one transport."""

    def __init__(self, transport: str, *, port: int | None = None, handler: Handler | None = None, policy: Policy | None = None) -> None:
        self.transport = transport
        self.port = port
        self.handler = handler
        self.policy = policy
        self.tasks: list[asyncio.Task[None]] = []  # memory: the handlers' runs

    @property
    def host(self) -> str:
        """The Host header a client sends (what a same-origin Origin must match)."""
        return MEMORY_HOST if self.port is None else f"127.0.0.1:{self.port}"

    def connect(self, target: str = "/app", *, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        if self.port is None:
            return _MemoryConnect(self, target, headers)
        return tether.connect(f"ws://127.0.0.1:{self.port}{target}", headers=headers, **kwargs)


Start = Callable[..., Awaitable[Served]]


@pytest.fixture(params=TRANSPORTS)
async def start(request: pytest.FixtureRequest) -> AsyncIterator[Start]:
    """``served = await start(handler, **policy)``: ``handler`` at ``/app`` on the parametrized transport."""
    served_all: list[Served] = []
    async with AsyncExitStack() as stack:

        async def start(handler: Handler, path: str = "/app", **policy: Any) -> Served:
            if request.param == "picows":
                server = await tether.serve({path: handler}, "127.0.0.1", 0, **policy)
                stack.push_async_callback(server.close)
                served = Served("picows", port=server.port)
            elif request.param == "asgi":
                port = await start_uvicorn(stack, Starlette(routes=[WebSocketRoute(path, tether.asgi.asgi(handler, **policy))]))
                served = Served("asgi", port=port)
            else:
                served = Served("memory", handler=handler, policy=Policy(**policy))
            served_all.append(served)
            return served

        yield start
        for served in served_all:
            if served.tasks:
                await asyncio.wait_for(asyncio.gather(*served.tasks, return_exceptions=True), 10)
