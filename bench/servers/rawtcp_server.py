"""The limit: a raw uvloop TCP server doing the same JSON work, newline framing,
no WebSocket. All replies produced by one read go out in one write.

    python rawtcp_server.py PORT [json|msgspec]
"""

from __future__ import annotations

import asyncio
import json
import sys

import msgspec
import uvloop

from _common import THANKS, port, valid_echo

CODEC = sys.argv[2] if len(sys.argv) > 2 else "msgspec"


class Echo(msgspec.Struct):
    message: str
    n: int


class Msg(msgspec.Struct):
    type: str
    data: Echo


decode = msgspec.json.Decoder(Msg).decode
encode = msgspec.json.Encoder().encode


def reply_msgspec(line: bytes) -> bytes | None:
    msg = decode(line)
    return encode(Msg("echo", Echo(THANKS, msg.data.n))) if msg.type == "echo" else None


def reply_json(line: bytes) -> bytes | None:
    msg = json.loads(line)
    if msg.get("type") == "echo" and valid_echo(msg.get("data")):
        return json.dumps({"type": "echo", "data": {"message": THANKS, "n": msg["data"]["n"]}}).encode()
    return None


REPLY = reply_msgspec if CODEC == "msgspec" else reply_json


class LineEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        *lines, self.buf = buf.split(b"\n")
        out = []
        for line in lines:
            try:
                r = REPLY(line)
            except (ValueError, msgspec.DecodeError):
                continue
            if r is not None:
                out.append(r)
        if out:
            out.append(b"")
            self.transport.write(b"\n".join(out))


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LineEcho, "127.0.0.1", port())
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
