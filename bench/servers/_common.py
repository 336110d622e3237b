"""Shared bits of the Python peers: the port argument and stdlib validation.

Every peer does the same job: decode the text frame, validate it is
{"type": "echo", "data": {"message": str, "n": int}}, and reply
{"type": "echo", "data": {"message": "Thanks for the message!", "n": n}}.
Peers with a broadcast mode also accept {"type": "broadcast", "data": {...}}
and send that message to every connection.
"""

from __future__ import annotations

import sys
from typing import Any

THANKS = "Thanks for the message!"


def port() -> int:
    return int(sys.argv[1]) if len(sys.argv) > 1 else 9100


def valid_echo(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("message"), str)
        and type(data.get("n")) is int
    )
