"""websockets (new asyncio API) on uvloop, as its docs show; broadcast() peer.

    python websockets_server.py PORT
"""

from __future__ import annotations

import asyncio
import json

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

from _common import THANKS, port, valid_echo

CONNECTIONS: set[ServerConnection] = set()


async def handler(websocket: ServerConnection) -> None:
    CONNECTIONS.add(websocket)
    try:
        async for message in websocket:
            msg = json.loads(message)
            if msg.get("type") == "echo" and valid_echo(msg.get("data")):
                reply = {"type": "echo", "data": {"message": THANKS, "n": msg["data"]["n"]}}
                await websocket.send(json.dumps(reply))
            elif msg.get("type") == "broadcast":
                broadcast(CONNECTIONS, json.dumps(msg))
    finally:
        CONNECTIONS.discard(websocket)


async def main() -> None:
    async with serve(handler, "127.0.0.1", port(), compression=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
