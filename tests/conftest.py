"""Shared fixtures: a server factory, a scaled timeout, asyncio debug mode.

Timeouts scale by one factor, ``TETHER_TEST_TIMEOUT_SCALE`` (default 1; the conformance suite's
``TETHER_TEST_TIMEOUT_FACTOR`` is honoured too), for slow machines. Tests never sleep to wait
for a condition: they await a future or event under :func:`timeout`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import tether

TIMEOUT_SCALE = float(os.environ.get("TETHER_TEST_TIMEOUT_SCALE") or os.environ.get("TETHER_TEST_TIMEOUT_FACTOR") or "1")


def timeout(seconds: float = 5.0) -> asyncio.Timeout:
    """``async with timeout(2):`` -- an asyncio timeout scaled by TETHER_TEST_TIMEOUT_SCALE."""
    return asyncio.timeout(seconds * TIMEOUT_SCALE)


async def within(aw: Awaitable[Any], seconds: float = 5.0) -> Any:
    """Await ``aw`` under a scaled timeout."""
    async with timeout(seconds):
        return await aw


def pytest_configure(config: pytest.Config) -> None:
    # asyncio debug mode for every loop pytest-asyncio creates (STYLE.md item 15).
    config.option.asyncio_debug = True


async def echo(conn: tether.Conn) -> None:
    async for message in conn:
        await conn.send(message)


ServerFactory = Callable[..., Awaitable[tether.Server]]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    """``server = await make_server({"/socket": handler}, **settings)``: started on 127.0.0.1:0,
    closed at teardown."""
    servers: list[tether.Server] = []

    async def factory(routes: Any = None, **settings: Any) -> tether.Server:
        server = await tether.serve(routes if routes is not None else {"/socket": echo}, "127.0.0.1", 0, **settings)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await within(server.close(), 15)


@pytest.fixture
async def echo_server(make_server: ServerFactory) -> tether.Server:
    return await make_server({"/socket": echo})


def url(server: tether.Server, path: str = "/socket") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def assert_serves(server: tether.Server, path: str = "/socket") -> None:
    """A fresh, well-behaved client still gets an echo from ``server``."""
    async with timeout(5):
        async with tether.connect(url(server, path)) as conn:
            await conn.send("still alive?")
            assert await conn.receive() == "still alive?"
