"""A client process the fault soak kills with SIGKILL in the middle of its work.

    python tests/soak_victim.py ws://127.0.0.1:PORT/ws?room=r3&name=victim7

A ``tether.Client`` (with a session, so the server keeps one for it until the window passes)
that prints ``ready`` once its first request got its reply, then keeps sending: requests
and 256 KiB messages, back to back, so a SIGKILL most likely lands mid-message. It never
ends by itself before its bound (60 s, 10,000 rounds).
"""

from __future__ import annotations

import asyncio
import sys
import time

import tether


async def main(url: str) -> None:
    big = "v" * (256 * 1024)
    async with tether.Client(url, request_timeout=30) as client:
        await client.request("echo", "hello")
        print("ready", flush=True)
        ends = time.monotonic() + 60
        for n in range(10_000):
            if time.monotonic() > ends:
                break
            await client.send("echo", big)  # awaited: waits while the socket's buffer is full
            await client.request("echo", n)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
