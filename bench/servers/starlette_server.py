"""Starlette WebSocketEndpoint-style route under uvicorn (uvloop, httptools).

    python starlette_server.py PORT
"""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from _common import THANKS, port, valid_echo


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            msg = await websocket.receive_json()
            if msg.get("type") == "echo" and valid_echo(msg.get("data")):
                await websocket.send_json({"type": "echo", "data": {"message": THANKS, "n": msg["data"]["n"]}})
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[WebSocketRoute("/", echo)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port(), loop="uvloop", log_level="warning", ws_per_message_deflate=False)
