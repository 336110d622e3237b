"""A byte-stream view of a connection, like ``ws.Read(buf)`` / ``ws.Write(b)`` in Go.

Reads continue across message boundaries; each write is one frame. As the Go tutorial
warns, a stream loses message boundaries: a JSON document may arrive split over two reads or
two documents in one. Use a codec (:mod:`tether.codecs`) or a typed :class:`tether.App`
unless you really want bytes.
"""

from __future__ import annotations

from typing import Protocol

from .errors import ConnectionClosedOK

__all__ = ["ByteStream"]


class _Messages(Protocol):
    """What a stream needs of a connection (a :class:`tether.Conn`)."""

    async def receive(self) -> str | bytes: ...
    async def send(self, message: str | bytes, *, text: bool | None = None) -> None: ...


class ByteStream:
    """``read(n)`` returns up to ``n`` bytes (``b""`` once the peer closed normally)."""

    def __init__(self, conn: _Messages, *, text: bool = False) -> None:
        self._conn = conn
        self._text = text
        self._buffer = b""

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all buffered bytes of the next message if ``n < 0``)."""
        if not self._buffer:
            try:
                message = await self._conn.receive()
            except ConnectionClosedOK:
                return b""
            self._buffer = message.encode() if isinstance(message, str) else message
        if n < 0 or n >= len(self._buffer):
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    async def write(self, data: bytes) -> int:
        """Send ``data`` as one frame (text frames if the stream was opened with ``text=True``)."""
        await self._conn.send(bytes(data), text=self._text)
        return len(data)
