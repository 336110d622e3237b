"""tether: the typed echo, exactly as its docs show.

    python tether_server.py PORT [--metrics] [--workers N] [--broker URL]

``--metrics``: the server keeps its Prometheus metrics (``metrics=True``, docs/deploy.md), to
measure what they cost on the message path. ``--workers N --broker redis://...``: N worker
processes on the port sharing rooms through Redis (bench/workers.py). Resume (sessions) is on by default for clients that
offer it: the load generator's ``-session`` measures it.
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


@app.on_connect
async def member(conn: tether.Conn) -> None:
    await conn.join("all", presence=False)  # broadcast-only member: no presence events


@app.on("broadcast")
async def broadcast(conn: tether.Conn, data: Echo) -> None:
    # Encoded once, the same bytes written to every member (picows adds the header); never awaits a receiver.
    await app.broadcast("all", "broadcast", data)


def option(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


workers = int(option("--workers") or 1)
broker = option("--broker")
settings = {"broker": broker} if broker else {}
# blocking; uvloop when installed
tether.run({"/": app}, host="127.0.0.1", port=PORT, metrics="--metrics" in sys.argv, workers=workers, **settings)
