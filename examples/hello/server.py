"""The tutorial's conversation, in tether: ``make demo`` runs this at http://127.0.0.1:8000.

- ``/socket``: the tutorial's untyped handler, as it wrote it: receive ``{"message": ...}``
  with the JSON codec, log it, answer ``{"message": "Thanks for the message!"}``.
- ``/typed``: the same conversation as a typed app: ``{"type": "hello", "data": {...}}``.
- ``/chat``: the small two-type chat app from ``examples/chat``.
- ``/``: the page (``static/index.html``) whose plain ``WebSocket`` code is the tutorial's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

import tether
from examples.chat.app import app as chat_app

logger = logging.getLogger("hello")


class Message(msgspec.Struct):
    # Go: Message string `json:"message"`; msgspec.field(name=...) renames like the tag does.
    text: str = msgspec.field(name="message")


async def socket(conn: tether.Conn) -> None:
    """The tutorial's ``func socket(ws *websocket.Conn)``."""
    while True:
        try:
            msg = await tether.JSON.receive(conn, Message)
        except tether.DecodeError as exc:
            logger.warning("Bad message: %s", exc)
            continue
        except tether.ConnectionClosedOK:
            return
        logger.info("Received message: %s", msg.text)
        await tether.JSON.send(conn, Message("Thanks for the message!"))


typed = tether.App()


@typed.on("hello")
async def hello(conn: tether.Conn, data: Message) -> Message:
    """Answers a request (a message with an ``id``) and also pushes a typed message."""
    logger.info("Received message: %s", data.text)
    reply = Message("Thanks for the message!")
    await conn.emit("hello", reply)
    return reply


ROUTES = {"/socket": socket, "/typed": typed, "/chat": chat_app}
STATIC = Path(__file__).parent / "static"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("picows").setLevel(logging.WARNING)
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    print(f"tether demo: open http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    tether.run(ROUTES, host, port, static_dir=STATIC)


if __name__ == "__main__":
    main()
