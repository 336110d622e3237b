"""picows by hand: a WSListener per connection; codec = stdlib json or msgspec.

    python picows_server.py PORT [json|msgspec]

Also the picows broadcast peer: {"type": "broadcast"} is re-sent to every
connection with a loop of transport.send (one encode, one send per receiver).
"""

from __future__ import annotations

import asyncio
import json
import sys

import msgspec
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from _common import THANKS, port, valid_echo

CODEC = sys.argv[2] if len(sys.argv) > 2 else "json"
CLIENTS: set[WSTransport] = set()


class Echo(msgspec.Struct):
    message: str
    n: int


class Msg(msgspec.Struct):
    type: str
    data: Echo


class Reply(msgspec.Struct):
    type: str
    data: Echo


decode = msgspec.json.Decoder(Msg).decode
encode = msgspec.json.Encoder().encode


class JsonListener(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        CLIENTS.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CLIENTS.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        try:
            msg = json.loads(frame.get_payload_as_bytes())
        except ValueError:
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "echo" and valid_echo(msg.get("data")):
            reply = {"type": "echo", "data": {"message": THANKS, "n": msg["data"]["n"]}}
            transport.send(WSMsgType.TEXT, json.dumps(reply).encode())
        elif kind == "broadcast":
            out = json.dumps(msg).encode()
            for t in CLIENTS:
                t.send(WSMsgType.TEXT, out)


class MsgspecListener(JsonListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        try:
            msg = decode(frame.get_payload_as_memoryview())
        except msgspec.ValidationError:
            return super().on_ws_frame(transport, frame)  # e.g. broadcast
        except msgspec.DecodeError:
            return
        if msg.type == "echo":
            transport.send(WSMsgType.TEXT, encode(Reply("echo", Echo(THANKS, msg.data.n))))
        elif msg.type == "broadcast":
            out = encode(msg)
            for t in CLIENTS:
                t.send(WSMsgType.TEXT, out)


async def main() -> None:
    cls = MsgspecListener if CODEC == "msgspec" else JsonListener
    server = await ws_create_server(lambda request: cls(), "127.0.0.1", port())
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
