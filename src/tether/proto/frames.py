"""RFC 6455 receive rules that picows leaves to tether, as a pure object: frames in, events out.

Who checks what:

- picows (the transport) parses frame headers, unmasks payloads, answers pings, and rejects
  unknown opcodes, fragmented control frames, control frames over 125 bytes, unmasked client
  frames, single frames over its ``max_frame_size``, and some close codes (those below 3000
  missing from its own enum).
- This module checks what picows does not: RSV bits (no extension is ever negotiated),
  continuation sequencing, reassembly of fragmented messages, the size of a whole message
  across fragments, incremental fail-fast UTF-8 validation of text, and every close-frame rule
  (payload length, the full close-code table, UTF-8 of the reason). It repeats picows' opcode
  and control-frame checks, which cost a comparison each, so it is correct on its own.

Use: the transport copies each data or close frame it receives and passes it to
:meth:`Receiver.receive_frame`, then acts on the result::

    receiver = Receiver(max_message_size=1 << 20)
    event = receiver.receive_frame(frame.msg_type, frame.fin, rsv, frame.get_payload_as_bytes())
    # str / bytes -> deliver a message;  None -> nothing yet;
    # CloseReceived -> answer the close;  Fail -> send close(event.code, event.reason), drop.

Helpers for sending: :func:`close_payload` and :func:`is_valid_close_code`.
Nothing here does I/O, imports asyncio or imports picows.
"""

from __future__ import annotations

import codecs
import enum
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "CloseCode",
    "CloseReceived",
    "Event",
    "Fail",
    "Receiver",
    "close_payload",
    "encode_frame",
    "frame_header",
    "is_valid_close_code",
]

# Opcodes [5.2].
OP_CONT: Final = 0
OP_TEXT: Final = 1
OP_BINARY: Final = 2
OP_CLOSE: Final = 8
OP_PING: Final = 9
OP_PONG: Final = 10

# [5.5] All control frames MUST have a payload length of 125 bytes or less.
MAX_CONTROL_PAYLOAD: Final = 125


class CloseCode(enum.IntEnum):
    """Close status codes defined by RFC 6455 [7.4.1] and the IANA registry [11.7]."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never on the wire: stands for an empty close payload
    ABNORMAL = 1006  # never on the wire: the connection dropped without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014


@dataclass(frozen=True, slots=True)
class Fail:
    """The peer broke the protocol: send a close frame with ``code`` and ``reason``, then drop.

    ``reason`` is a fixed short ASCII text, safe to send to the peer.
    """

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer sent a valid close frame.

    ``code`` is 1005 (:attr:`CloseCode.NO_STATUS`) when the close frame had an empty payload.
    """

    code: int
    reason: str


Event = str | bytes | Fail | CloseReceived | None


def is_valid_close_code(code: int) -> bool:
    """Return True if ``code`` may appear in a close frame, sent or received [7.4].

    Valid: 1000-1003 and 1007-1014 (defined or registered [7.4.1, 11.7]) and 3000-4999
    (libraries and applications [7.4.2]). 1004 is reserved; 1005, 1006 and 1015 must never
    be sent; 0-999, 1016-2999 and 5000 and up are not to be used.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_payload(code: int, reason: str = "") -> bytes:
    """Build a close frame payload: the code as 2 big-endian bytes, then the UTF-8 reason [5.5.1].

    Raises ValueError if ``code`` is not one we may send (see :func:`is_valid_close_code`) or
    the payload would exceed the 125 bytes allowed in a control frame [5.5].
    """
    if not is_valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    payload = code.to_bytes(2, "big") + reason.encode()
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(f"close reason too long: {len(payload) - 2} bytes, at most 123")
    return payload


def _parse_close(payload: bytes) -> CloseReceived | Fail:
    """Check a received close frame payload [5.5.1, 7.4]."""
    if not payload:
        # [5.5.1] The Close frame MAY contain a body; without one there is no status code.
        return CloseReceived(CloseCode.NO_STATUS, "")
    if len(payload) == 1:
        # [5.5.1] If there is a body, the first two bytes MUST be a status code.
        return Fail(CloseCode.PROTOCOL_ERROR, "invalid close frame")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        # [7.4.1, 7.4.2] Reserved, unassigned or never-sent codes.
        return Fail(CloseCode.PROTOCOL_ERROR, "invalid close code")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        # [5.5.1] The reason is UTF-8; [8.1] invalid UTF-8 fails the connection with 1007.
        return Fail(CloseCode.INVALID_DATA, "invalid UTF-8 in close reason")
    return CloseReceived(code, reason)


def _is_surrogate_prefix(pending: bytes) -> bool:
    # CPython's incremental decoder only rejects a UTF-16 surrogate (ED A0..BF ..) at its third
    # byte; an ED followed by A0..BF can never become valid UTF-8, so fail on it now [8.1].
    return len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0


class _State(enum.Enum):
    IDLE = enum.auto()  # between messages
    TEXT = enum.auto()  # a fragmented text message is in progress
    BINARY = enum.auto()  # a fragmented binary message is in progress
    CLOSED = enum.auto()  # a valid close frame arrived; later frames are ignored
    FAILED = enum.auto()  # the peer broke the protocol; every call returns the same Fail


class Receiver:
    """Reassemble and check the data and close frames received on one connection.

    ``max_message_size`` bounds a whole message (the sum of its fragments) in bytes;
    None means no limit. Raises ValueError if it is negative.
    """

    __slots__ = ("_max_size", "_state", "idle", "_failure", "_size", "_chunks", "_text", "_decoder")

    def __init__(self, max_message_size: int | None = 1 << 20) -> None:
        if max_message_size is not None and max_message_size < 0:
            raise ValueError("max_message_size must be >= 0 or None")
        self._max_size = max_message_size
        self._state = _State.IDLE
        #: True between messages: a complete unfragmented text frame may skip this object.
        #: (An attribute kept equal to ``_state is IDLE``, not a property: read per message.)
        self.idle = True
        self._failure: Fail | None = None
        self._size = 0
        # Fragments so far, created with a fragmented message (most connections never see one).
        self._chunks: list[bytes] | None = None  # binary fragments
        self._text: list[str] | None = None  # text decoded so far
        self._decoder: codecs.IncrementalDecoder | None = None

    def _to(self, state: _State) -> None:
        self._state = state
        self.idle = state is _State.IDLE

    def receive_frame(self, opcode: int, fin: int, rsv: int, payload: bytes) -> Event:
        """Feed one received frame; ``fin`` is nonzero for the last frame of a message and
        ``rsv`` nonzero if any of RSV1..3 is set (ints: picows gives its flags as ints).

        Returns the complete message (str for text, bytes for binary) when this frame ends
        one; None when more fragments are needed, for PING and PONG, and for any frame after
        a close frame; :class:`CloseReceived` for a valid close frame; :class:`Fail` when the
        peer broke the protocol. After a Fail, every later call returns the same Fail.
        """
        if self._state is _State.FAILED:
            assert self._failure is not None
            return self._failure
        if self._state is _State.CLOSED:
            # [5.5.1] The peer MUST NOT send data frames after a Close frame: nothing to deliver.
            return None
        if rsv:
            # [5.2] RSV1-3 MUST be 0 unless an extension defining them was negotiated (none is).
            return self._fail(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if opcode == OP_TEXT or opcode == OP_BINARY:
            return self._start(opcode, fin, payload)
        if opcode == OP_CONT:
            return self._continue(fin, payload)
        if opcode == OP_CLOSE or opcode == OP_PING or opcode == OP_PONG:
            return self._control(opcode, fin, payload)
        # [5.2] Opcodes 3-7 and 0xB-0xF are reserved.
        return self._fail(CloseCode.PROTOCOL_ERROR, "reserved opcode")

    # Data frames

    def _start(self, opcode: int, fin: int, payload: bytes) -> Event:
        if self._state is not _State.IDLE:
            # [5.4] Fragments of one message MUST NOT be interleaved with another message.
            return self._fail(CloseCode.PROTOCOL_ERROR, "new message before previous one ended")
        if self._too_big(len(payload)):
            return self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
        if fin:
            return self._single(opcode, payload)
        self._size = len(payload)
        if opcode == OP_BINARY:
            self._to(_State.BINARY)
            self._chunks = [payload]
            return None
        self._to(_State.TEXT)
        self._text = []
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        return self._feed_text(payload, final=False)

    def _single(self, opcode: int, payload: bytes) -> Event:
        """An unfragmented message: no buffering, no incremental decoder (the common case)."""
        if opcode == OP_BINARY:
            return payload
        try:
            return payload.decode()
        except UnicodeDecodeError:
            # [8.1] Invalid UTF-8 in a text message fails the connection; [7.4.1] code 1007.
            return self._fail(CloseCode.INVALID_DATA, "invalid UTF-8")

    def _continue(self, fin: int, payload: bytes) -> Event:
        if self._state is _State.IDLE:
            # [5.4] A continuation frame must follow a non-final TEXT or BINARY frame.
            return self._fail(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
        size = self._size + len(payload)
        if self._too_big(size):
            return self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
        self._size = size
        if self._state is _State.TEXT:
            return self._feed_text(payload, final=bool(fin))
        assert self._chunks is not None  # a binary message is in progress
        self._chunks.append(payload)
        if not fin:
            return None
        message = b"".join(self._chunks)
        self._reset()
        return message

    def _feed_text(self, payload: bytes, final: bool) -> str | Fail | None:
        # [8.1] Validate as bytes arrive and fail fast: Autobahn 6.4.x expects 1007 on the first
        # fragment that can no longer be valid UTF-8, before the message's last fragment.
        assert self._decoder is not None and self._text is not None
        try:
            self._text.append(self._decoder.decode(payload, final))
        except UnicodeDecodeError:
            return self._fail(CloseCode.INVALID_DATA, "invalid UTF-8")
        if not final:
            if _is_surrogate_prefix(self._decoder.getstate()[0]):
                return self._fail(CloseCode.INVALID_DATA, "invalid UTF-8")
            return None
        message = "".join(self._text)
        self._reset()
        return message

    def _too_big(self, size: int) -> bool:
        # [10.4] Limit message size; checked before buffering the frame that crosses the limit.
        return self._max_size is not None and size > self._max_size

    # Control frames

    def _control(self, opcode: int, fin: int, payload: bytes) -> CloseReceived | Fail | None:
        if not fin or len(payload) > MAX_CONTROL_PAYLOAD:
            # [5.5] Control frames MUST NOT be fragmented and carry at most 125 bytes.
            return self._fail(CloseCode.PROTOCOL_ERROR, "invalid control frame")
        if opcode != OP_CLOSE:
            # [5.4, 5.5.2] Pings and pongs may come between fragments; picows answers pings.
            return None
        event = _parse_close(payload)
        if isinstance(event, Fail):
            return self._fail(event.code, event.reason)
        # [5.4] A close may come between fragments; the unfinished message is never delivered.
        self._reset()
        self._to(_State.CLOSED)
        return event

    # State transitions

    def _reset(self) -> None:
        self._to(_State.IDLE)
        self._size = 0
        self._chunks = None
        self._text = None
        self._decoder = None

    def _fail(self, code: int, reason: str) -> Fail:
        self._reset()
        self._failure = Fail(code, reason)
        self._to(_State.FAILED)
        return self._failure


# -- sending (servers) ----------------------------------------------------------------------
def frame_header(opcode: int, length: int) -> bytes:
    """The header of a final, unmasked server frame (RFC 6455 section 5.2).

    FIN=1, RSV=0, the opcode; MASK=0 (servers never mask, section 5.1); then the payload
    length in 7 bits, or 126 + 16 bits, or 127 + 64 bits, in network byte order.
    """
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A whole unmasked server frame: the bytes every receiver of a broadcast gets."""
    return frame_header(opcode, len(payload)) + payload
