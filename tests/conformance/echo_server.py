"""Echo server for Autobahn's fuzzingclient: ``python tests/conformance/echo_server.py PORT``.

Every text or binary message comes back unchanged. The limits are a large-message profile so that
Autobahn's 9.* cases (up to 16 MiB messages, up to 65536 fragments) test conformance, not limits;
production limits have their own tests.
"""

import sys

import tether

MAX_MESSAGE_SIZE = 16 * 2**20


async def echo(conn: tether.Conn) -> None:
    async for message in conn:
        await conn.send(message)


def main(argv: list[str]) -> None:
    port = int(argv[1])
    tether.run(echo, host="127.0.0.1", port=port, max_message_size=MAX_MESSAGE_SIZE)


if __name__ == "__main__":
    main(sys.argv)
