"""Codecs: turn values into messages and back, like Go's ``websocket.Codec``.

.. code-block:: python

    class Hello(msgspec.Struct):
        message: str                      # Go: Message string `json:"message"`

    await tether.JSON.send(conn, Hello("hello server!"))
    hello = await tether.JSON.receive(conn, Hello)   # decoded and validated

``JSON`` uses msgspec: ``receive(conn, T)`` validates into ``T`` (a msgspec Struct, a
dataclass, a TypedDict, or a builtin type) and raises :class:`tether.DecodeError` naming the
failing field. ``Message`` passes ``str`` (text frames) and ``bytes`` (binary frames) through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

import msgspec

from .conn import Conn
from .errors import DecodeError

__all__ = ["Codec", "JSON", "Message", "decode_error"]

T = TypeVar("T")
Marshal = Callable[[Any], "str | bytes"]
Unmarshal = Callable[["str | bytes", Any], Any]


class Codec(Generic[T]):
    """A pair of functions: ``marshal(value) -> str | bytes`` and ``unmarshal(message, type)``.

    ``text=True`` sends the bytes that ``marshal`` returns as text frames (they must be
    UTF-8), which is what a JSON codec wants.
    """

    def __init__(self, marshal: Marshal, unmarshal: Unmarshal, *, text: bool | None = None) -> None:
        self.marshal = marshal
        self.unmarshal = unmarshal
        self.text = text

    async def send(self, conn: Conn, value: Any) -> None:
        """Marshal ``value`` and send it as one message."""
        await conn.send(self.marshal(value), text=self.text)

    @overload
    async def receive(self, conn: Conn) -> Any: ...
    @overload
    async def receive(self, conn: Conn, type: type[T]) -> T: ...
    async def receive(self, conn: Conn, type: Any = Any) -> Any:
        """Receive one message and unmarshal it into ``type``.

        Raises :class:`tether.DecodeError` if it does not fit; the connection stays usable.
        """
        return self.unmarshal(await conn.receive(), type)


_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _json_unmarshal(message: str | bytes, type: Any) -> Any:
    decoder = _decoders.get(type)
    if decoder is None:
        decoder = _decoders[type] = msgspec.json.Decoder(type)
    try:
        return decoder.decode(message)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None


def decode_error(exc: msgspec.DecodeError, prefix: str = "$") -> DecodeError:
    """A :class:`DecodeError` from msgspec's, with the JSON path split out.

    msgspec says ``Expected `int`, got `str` - at `$.n```; we keep the first half as the
    message and ``$.n`` (re-rooted at ``prefix``) as the path.
    """
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return DecodeError(text)
    return DecodeError(message, prefix + where.rstrip("`")[1:])


def _message_unmarshal(message: str | bytes, type: Any) -> Any:
    if type is Any or isinstance(message, type):
        return message
    raise DecodeError(f"expected a {type.__name__} message, got {message.__class__.__name__}")


JSON: Codec[Any] = Codec(msgspec.json.encode, _json_unmarshal, text=True)
Message: Codec[Any] = Codec(lambda value: value, _message_unmarshal)
