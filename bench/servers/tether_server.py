"""tether: the typed echo, exactly as its docs show.

    python tether_server.py PORT
"""

import sys

import msgspec

import tether

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 9100


class Echo(msgspec.Struct):
    message: str
    n: int


app = tether.App()


@app.on("echo")
async def echo(conn: tether.Conn, data: Echo) -> None:
    await conn.emit("echo", Echo("Thanks for the message!", data.n))


tether.run({"/": app}, host="127.0.0.1", port=PORT)  # blocking; uses uvloop when installed
