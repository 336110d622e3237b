"""python-socketio AsyncServer (ASGI) under uvicorn: an event with an ack.

    python socketio_server.py PORT

Client: sio.emit("echo", {"message": "hello server!", "n": n}, callback=...);
the handler's return value is the ack, {"message": "Thanks...", "n": n}.
"""

from __future__ import annotations

import socketio
import uvicorn

from _common import THANKS, port, valid_echo

sio = socketio.AsyncServer(async_mode="asgi")
app = socketio.ASGIApp(sio)


@sio.event
async def echo(sid: str, data: object) -> dict[str, object] | None:
    if not valid_echo(data):
        return None
    return {"message": THANKS, "n": data["n"]}  # type: ignore[index]


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port(), loop="uvloop", log_level="warning", ws_per_message_deflate=False)
