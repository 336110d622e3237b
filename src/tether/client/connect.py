"""The Python client: ``tether.connect(url)``.

.. code-block:: python

    async with tether.connect("ws://127.0.0.1:8000/socket") as conn:
        await conn.send('{"message": "hello server!"}')
        print(await conn.receive())

It yields the same :class:`tether.Conn` the server's handlers get.
"""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Generator, Mapping
from typing import Any

from ..conn import Conn, ConnSettings
from ..transport import picows
from ..transport.picows import TransportSettings

__all__ = ["connect"]


class connect:
    """Open a WebSocket connection: ``await connect(url)`` or ``async with connect(url)``.

    Settings: ``headers`` (extra handshake headers, e.g. ``Authorization``),
    ``max_message_size`` (default 1 MiB, ``None`` for no limit), ``open_timeout`` (seconds
    for TCP + handshake), ``close_timeout``, ``max_queue`` (messages buffered before the
    client stops reading), ``ssl`` (an ``ssl.SSLContext`` for ``wss://``), ``ping_interval``
    and ``ping_timeout`` (keepalive: a server that stops answering pings is dropped and
    ``receive`` raises :class:`tether.KeepaliveTimeout`; ``None`` disables).
    Raises :class:`tether.InvalidHandshake` if the server refuses the upgrade.
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_message_size: int | None = 1 << 20,
        max_queue: int = 32,
        open_timeout: float | None = 10.0,
        close_timeout: float = 5.0,
        ssl: ssl_module.SSLContext | None = None,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
    ) -> None:
        self.url = url
        self._headers = list(headers.items()) if headers else None
        conn = ConnSettings(max_queue=max_queue, close_timeout=close_timeout, ping_interval=ping_interval, ping_timeout=ping_timeout)
        self._settings = TransportSettings(conn, max_message_size=max_message_size)
        self._open_timeout = open_timeout
        self._ssl = ssl
        self._conn: Conn | None = None

    async def _open(self) -> Conn:
        return await picows.open_connection(
            self.url, self._settings, headers=self._headers, ssl=self._ssl, open_timeout=self._open_timeout
        )

    def __await__(self) -> Generator[Any, None, Conn]:
        return self._open().__await__()

    async def __aenter__(self) -> Conn:
        self._conn = await self._open()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        assert self._conn is not None
        await self._conn.close()
