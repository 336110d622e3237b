"""The envelope of typed apps: one struct, pure encode/decode.

``type`` routes the message; ``data`` is its payload; ``id`` (a request's) is echoed in its one
``reply`` or ``error``; ``room`` names the room a broadcast went to and ``off`` its offset in
that room's stream; ``seq`` numbers the messages of a session's direct streams and ``ack``
acknowledges the other side's (docs/protocol.md, "Sessions and resume"). Fields left at
their defaults are not written. Decoders are built once, never per message.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

__all__ = [
    "Envelope",
    "Id",
    "decode",
    "encode",
    "encode_error",
    "classify_error",
    "encode_message",
    "with_offset",
    "error_id",
    "BAD_JSON",
    "BAD_ENVELOPE",
    "UNKNOWN_TYPE",
    "INVALID_DATA",
    "INTERNAL",
    "RATE_LIMITED",
    "FORBIDDEN",
    "TOO_MANY_ROOMS",
]

Id = int | str | None

# Error codes of ``{"type": "error", "data": {"code", "message", "path"?}}`` (docs/protocol.md).
BAD_JSON: Final = "bad_json"
BAD_ENVELOPE: Final = "bad_envelope"
UNKNOWN_TYPE: Final = "unknown_type"
INVALID_DATA: Final = "invalid_data"
INTERNAL: Final = "internal"
RATE_LIMITED: Final = "rate_limited"
FORBIDDEN: Final = "forbidden"
TOO_MANY_ROOMS: Final = "too_many_rooms"


class Envelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """One typed message as it travels, in either direction."""

    type: str
    data: Any = None
    id: int | str | None = None
    room: str | None = None
    off: int | None = None
    seq: int | None = None
    ack: int | None = None


_encoder = msgspec.json.Encoder()
encode = _encoder.encode
#: Decode any envelope (clients; the App decodes into per-type structs instead).
decode = msgspec.json.Decoder(Envelope).decode


def encode_message(type: str, data: Any = None, id: Id = None, room: str | None = None, *, seq: int | None = None, ack: int | None = None) -> bytes:
    """The JSON bytes of one envelope."""
    return _encoder.encode(Envelope(type, data, id, room, None, seq, ack))


def with_offset(payload: bytes, offset: int) -> bytes:
    """A room message's JSON with ``"off": offset`` added (the offset is known only once the
    broker has placed the message in the room's stream; the rest is encoded once)."""
    return b"%s,\"off\":%d}" % (payload[:-1], offset)


def classify_error(code: str, message: str, path: str | None = None) -> dict[str, Any]:
    """The ``data`` of an ``error`` envelope."""
    data: dict[str, Any] = {"code": code, "message": message}
    if path is not None:
        data["path"] = path
    return data


def encode_error(id: Id, code: str, message: str, path: str | None = None) -> bytes:
    """An ``error`` envelope (answering request ``id``, if not None)."""
    return _encoder.encode(Envelope("error", classify_error(code, message, path), id))


class _Loose(msgspec.Struct):
    """A second look at a message that failed to decode: what its id and type were."""

    type: Any = None
    id: Any = None


_loose = msgspec.json.Decoder(_Loose)


def peek(message: str | bytes) -> tuple[Any, Id] | None:
    """``(type, id)`` of a message that is a JSON object, whatever their types; an ``id``
    that is not an int or a string is ``None`` (JSON ``true`` is no id). None if not JSON."""
    try:
        loose = _loose.decode(message)
    except msgspec.DecodeError:
        return None
    id = loose.id
    return loose.type, (id if isinstance(id, (int, str)) and not isinstance(id, bool) else None)


def error_id(message: str | bytes) -> Id:
    """The request id of ``message`` to answer an error with (None if it has none)."""
    found = peek(message)
    return None if found is None else found[1]
