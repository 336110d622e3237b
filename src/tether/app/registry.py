"""An App's registry: one route per message type, and the one decoder built from them.

All handlers' envelopes are decoded by one msgspec decoder: a tagged union (on ``type``) of
one Struct per route, ``{"type", "data": <the handler's annotation>, "id"}``, built once when
the app first serves a connection. A message that fails to decode is looked at a second
time (:func:`classify`) to choose the error code it gets.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union, get_type_hints

import msgspec

from ..codecs import decode_error
from ..proto.envelope import BAD_ENVELOPE, BAD_JSON, INVALID_DATA, UNKNOWN_TYPE, Id, peek

__all__ = ["RESERVED_TYPES", "Route", "make_route", "build_decoder", "classify", "Heartbeat", "Ack"]

#: Message types the framework itself uses (docs/protocol.md); apps cannot register them.
RESERVED_TYPES = frozenset(
    {"welcome", "reply", "error", "heartbeat", "join", "leave", "presence", "resume", "ack", "joined", "left", "gap"}
)


@dataclass(frozen=True, slots=True)
class Route:
    """One registered message type."""

    type: str
    fn: Callable[..., Any]
    data_type: Any  # the annotation of the handler's data parameter (Any if none)
    returns: Any  # the handler's return annotation (for the schema)
    takes_data: bool
    is_async: bool
    concurrent: bool


def make_route(type: str, fn: Callable[..., Any], concurrent: bool) -> Route:
    """The route for handler ``fn(conn)`` or ``fn(conn, data)``; raises ``TypeError`` otherwise."""
    params = list(inspect.signature(fn).parameters.values())
    if not 1 <= len(params) <= 2:
        raise TypeError(f"handler for {type!r} must take (conn) or (conn, data)")
    hints = get_type_hints(fn)
    data_type = hints.get(params[1].name, Any) if len(params) == 2 else Any
    return Route(
        type=type,
        fn=fn,
        data_type=data_type,
        returns=hints.get("return", Any),
        takes_data=len(params) == 2,
        is_async=inspect.iscoroutinefunction(fn),
        concurrent=concurrent,
    )


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="type"):
    """A client's heartbeat (our own echoed back, or one to echo)."""

    data: Any = None
    id: Id = None
    seq: int | None = None
    ack: int | None = None


class Ack(msgspec.Struct, tag="ack", tag_field="type"):
    """A client's cumulative ack of the session's direct stream, on its own."""

    data: Any = None
    id: Id = None
    seq: int | None = None
    ack: int | None = None


def build_decoder(routes: list[Route]) -> tuple[msgspec.json.Decoder[Any], dict[type, Route]]:
    """The envelope decoder of ``routes`` and the route of each class it decodes into."""
    classes: list[type] = []
    by_class: dict[type, Route] = {}
    for route in routes:
        data_field = ("data", route.data_type, None) if _accepts_none(route.data_type) else ("data", route.data_type)
        fields = [data_field, ("id", Id, None), ("seq", int | None, None), ("ack", int | None, None)]
        cls = msgspec.defstruct(f"Envelope_{route.type}", fields, tag=route.type, tag_field="type")
        classes.append(cls)
        by_class[cls] = route
    classes += [Heartbeat, Ack]
    # A union built at runtime from a tuple: `X | Y` has no spelling for that.
    return msgspec.json.Decoder(Union[tuple(classes)]), by_class  # noqa: UP007


def classify(message: str, exc: msgspec.DecodeError, known: Callable[[str], bool]) -> tuple[Id, str, str, str | None]:
    """Why ``message`` failed to decode: ``(id, code, text, path)`` of its error reply."""
    found = peek(message)
    if found is None:
        if isinstance(exc, msgspec.ValidationError):  # JSON, but not an object
            return None, BAD_ENVELOPE, _ENVELOPE_TEXT, None
        return None, BAD_JSON, "invalid JSON", None
    type, id = found
    if not isinstance(type, str) or not isinstance(exc, msgspec.ValidationError):
        return id, BAD_ENVELOPE, _ENVELOPE_TEXT, None
    if not known(type):
        return id, UNKNOWN_TYPE, f"no handler for message type {type!r}", None
    error = decode_error(exc)
    if error.path is not None and error.path.startswith("$.id"):
        return id, BAD_ENVELOPE, "\"id\" must be an integer or a string", "$.id"
    return id, INVALID_DATA, error.message, error.path


_ENVELOPE_TEXT = "the message must be a JSON object with a string \"type\""


def _accepts_none(tp: Any) -> bool:
    """Whether ``data`` may be absent (= null) for this type."""
    try:
        msgspec.convert(None, tp)
    except (msgspec.ValidationError, TypeError):
        return False
    return True
