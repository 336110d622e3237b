"""aiohttp web.WebSocketResponse, as its docs show, on uvloop.

    python aiohttp_server.py PORT
"""

from __future__ import annotations

import aiohttp
import uvloop
from aiohttp import web

from _common import THANKS, port, valid_echo


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT:
            data = msg.json()
            if data.get("type") == "echo" and valid_echo(data.get("data")):
                await ws.send_json({"type": "echo", "data": {"message": THANKS, "n": data["data"]["n"]}})
    return ws


def main() -> None:
    app = web.Application()
    app.add_routes([web.get("/", websocket_handler)])
    web.run_app(app, host="127.0.0.1", port=port(), print=None, access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
