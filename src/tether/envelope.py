"""The ``{"type", "data", "id"}`` envelope of typed apps: pure encode and decode.

See docs/protocol.md for the wire format. Decoders are built once per app (at start-up),
never per message.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Outgoing", "encode_message", "encode"]


class Outgoing(msgspec.Struct, omit_defaults=True):
    """An envelope as the server writes it; ``id`` is left out when unset."""

    type: str
    data: Any = None
    id: int | str | None = None


_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def encode_message(type: str, data: Any = None, id: int | str | None = None) -> bytes:
    """The JSON bytes of one envelope."""
    return _encoder.encode(Outgoing(type, data, id))
