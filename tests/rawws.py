"""A tiny RFC 6455 client written by hand over asyncio streams, for hostile-input tests.

No WebSocket library: the handshake, framing and masking are spelled out here so tests can
send exactly the bytes they mean (bad opcodes, reserved bits, unmasked frames, lies about
lengths).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class RawWS:
    """A raw connection: ``await RawWS.open(port, path, headers)`` then frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> RawWS:
        """Open TCP only (``rcvbuf`` shrinks SO_RCVBUF before connecting)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        # A small StreamReader limit too, so the client really stops pulling bytes.
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        return cls(reader, writer)

    @classmethod
    async def open(cls, port: int, path: str = "/socket", headers: dict[str, str] | None = None, **kw: int) -> RawWS:
        """Connect and send a handshake; ``headers`` override or (value None) drop defaults."""
        ws = await cls.connect(port, **kw)
        await ws.handshake(path, headers)
        return ws

    async def handshake(self, path: str = "/socket", headers: dict[str, str | None] | None = None) -> int:
        """Send an upgrade request and read the response status and headers (and body if any)."""
        base: dict[str, str | None] = {
            "Host": "127.0.0.1",
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        }
        base.update(headers or {})
        lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in base.items() if v is not None]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await self.writer.drain()
        return await self.read_response()

    async def read_response(self) -> int:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        length = int(self.headers.get("content-length", "0"))
        if self.status != 101 and length:
            self.body = await self.reader.readexactly(length)
        return self.status

    def frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True, length: int | None = None) -> bytes:
        """Encode one frame; ``length`` lies about the payload length in the header."""
        n = len(payload) if length is None else length
        head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode])
        bit = 0x80 if mask else 0
        if n < 126:
            head += bytes([bit | n])
        elif n < 1 << 16:
            head += bytes([bit | 126]) + struct.pack("!H", n)
        else:
            head += bytes([bit | 127]) + struct.pack("!Q", n)
        if not mask:
            return head + payload
        key = os.urandom(4)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    async def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True, length: int | None = None) -> None:
        self.writer.write(self.frame(opcode, payload, fin=fin, rsv=rsv, mask=mask, length=length))
        await self.writer.drain()

    async def recv_frame(self) -> tuple[int, bool, bytes]:
        """Read one frame from the server: (opcode, fin, payload). Server frames are unmasked."""
        b0, b1 = await self.reader.readexactly(2)
        assert b1 & 0x80 == 0, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, bool(b0 & 0x80), await self.reader.readexactly(n)

    async def close_frame(self) -> tuple[int | None, bytes]:
        """Skip data/pong frames until a close frame; return its (code, reason bytes)."""
        while True:
            opcode, _, payload = await self.recv_frame()
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:]

    async def close_code(self) -> int | None:
        """The code of the server's close frame, after checking the server then drops TCP."""
        code, _ = await self.close_frame()
        assert await self.reader.read() == b"", "server sent more after its close frame"
        return code

    async def eof(self) -> bool:
        """True once the server closed TCP (anything still unread is discarded)."""
        while await self.reader.read(65536):
            pass
        return True

    def abort(self) -> None:
        self.writer.transport.abort()

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP/1.1 GET with no upgrade: (status, lower-cased headers, body)."""
    ws = await RawWS.connect(port)
    try:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        ws.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await ws.read_response()
        return ws.status, ws.headers, ws.body
    finally:
        await ws.aclose()
