"""tether.protocol: RFC 6455 receive rules as bytes in, events out. No sockets."""

from __future__ import annotations

import ast
import codecs
from pathlib import Path

import pytest

import tether.proto.frames as protocol
from tether.proto.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    CloseCode,
    CloseReceived,
    Fail,
    Receiver,
    close_payload,
    is_valid_close_code,
)

Frame = tuple[int, bool, bytes]  # opcode, fin, payload

GRINNING = "\N{GRINNING FACE}".encode()  # 4 bytes: f0 9f 98 80

VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
                     3000, 3999, 4000, 4999]
INVALID_CLOSE_CODES = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]

INVALID_UTF8 = {
    "invalid_start_byte": b"\xff",
    "lone_continuation": b"\x80",
    "overlong_slash": b"\xc0\xaf",
    "overlong_3_byte": b"\xe0\x80\xaf",
    "surrogate": b"\xed\xa0\x80",
    "above_u10ffff": b"\xf4\x90\x80\x80",
    "f5_start": b"\xf5\x80\x80\x80",
}

# Prefixes that can never start valid UTF-8, whatever follows: must fail before fin.
DEAD_PREFIXES = {
    "invalid_start_byte": b"\xff",
    "c0_start": b"\xc0",
    "above_u10ffff": b"\xf4\x90",
    "overlong_3_byte": b"\xe0\x80",
    "overlong_4_byte": b"\xf0\x8f",
    "surrogate": b"\xed\xa0",
    "surrogate_high_end": b"\xed\xbf",
}


def feed(receiver: Receiver, frames: list[Frame]) -> list[object]:
    return [receiver.receive_frame(op, fin, False, payload) for op, fin, payload in frames]


def fragments(opcode: int, parts: list[bytes]) -> list[Frame]:
    """One message split into ``parts``: first frame carries ``opcode``, the rest CONT."""
    ops = [opcode] + [OP_CONT] * (len(parts) - 1)
    fins = [False] * (len(parts) - 1) + [True]
    return list(zip(ops, fins, parts))


def assert_fail(event: object, code: int) -> None:
    assert isinstance(event, Fail), event
    assert event.code == code
    assert 0 < len(event.reason.encode()) <= 123  # fits in a close frame


# Unfragmented messages


def test_receiver_text_unfragmented_returns_str() -> None:
    assert Receiver().receive_frame(OP_TEXT, True, False, "héllo".encode()) == "héllo"


def test_receiver_binary_unfragmented_returns_bytes() -> None:
    event = Receiver().receive_frame(OP_BINARY, True, False, b"\xff\x00\x80")
    assert type(event) is bytes and event == b"\xff\x00\x80"


def test_receiver_binary_unfragmented_invalid_utf8_is_not_checked() -> None:
    assert Receiver().receive_frame(OP_BINARY, True, False, b"\xff") == b"\xff"


def test_receiver_empty_text_and_binary_messages_accepted() -> None:
    receiver = Receiver()
    assert feed(receiver, [(OP_TEXT, True, b""), (OP_BINARY, True, b"")]) == ["", b""]


@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_receiver_text_unfragmented_invalid_utf8_fails_1007(bad: bytes) -> None:
    assert_fail(Receiver().receive_frame(OP_TEXT, True, False, b"ok" + bad), 1007)


def test_receiver_text_unfragmented_truncated_char_fails_1007() -> None:
    assert_fail(Receiver().receive_frame(OP_TEXT, True, False, GRINNING[:3]), 1007)


def test_receiver_text_unfragmented_takes_fast_path_without_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_decoder(encoding: str) -> None:
        raise AssertionError("fast path created an incremental decoder")

    monkeypatch.setattr(codecs, "getincrementaldecoder", no_decoder)
    assert Receiver().receive_frame(OP_TEXT, True, False, b"fast") == "fast"


# Fragmented messages


def test_receiver_text_fragmented_three_frames_returns_str() -> None:
    events = feed(Receiver(), fragments(OP_TEXT, [b"Hel", b"lo, ", "wörld".encode()]))
    assert events == [None, None, "Hello, wörld"]


def test_receiver_binary_fragmented_three_frames_returns_bytes() -> None:
    events = feed(Receiver(), fragments(OP_BINARY, [b"\x00\x01", b"\xff", b"\x02"]))
    assert events == [None, None, b"\x00\x01\xff\x02"]


def test_receiver_text_fragmented_with_empty_fragments_accepted() -> None:
    events = feed(Receiver(), fragments(OP_TEXT, [b"", b"a", b"", b""]))
    assert events == [None, None, None, "a"]


def test_receiver_messages_after_fragmented_message_start_fresh() -> None:
    receiver = Receiver()
    feed(receiver, fragments(OP_TEXT, [b"ab", b"cd"]))
    events = feed(receiver, fragments(OP_BINARY, [b"x", b"y"]) + [(OP_TEXT, True, b"z")])
    assert events == [None, b"xy", "z"]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_receiver_text_split_4_byte_char_accepted(split: int) -> None:
    parts = [b"a" + GRINNING[:split], GRINNING[split:] + b"b"]
    assert feed(Receiver(), fragments(OP_TEXT, parts)) == [None, "a\N{GRINNING FACE}b"]


def test_receiver_text_4_byte_char_one_byte_per_fragment_accepted() -> None:
    parts = [GRINNING[i : i + 1] for i in range(4)]
    assert feed(Receiver(), fragments(OP_TEXT, parts))[-1] == "\N{GRINNING FACE}"


@pytest.mark.parametrize("prefix", DEAD_PREFIXES.values(), ids=DEAD_PREFIXES.keys())
def test_receiver_text_split_invalid_utf8_fails_fast_1007(prefix: bytes) -> None:
    # The first fragment ends in bytes no continuation can repair: fail now, not at fin.
    event = Receiver().receive_frame(OP_TEXT, False, False, b"valid " + prefix)
    assert_fail(event, 1007)


def test_receiver_text_invalid_utf8_in_middle_fragment_fails_fast_1007() -> None:
    receiver = Receiver()
    first = "κόσμε".encode()
    assert receiver.receive_frame(OP_TEXT, False, False, first) is None
    assert_fail(receiver.receive_frame(OP_CONT, False, False, b"\xf4\x90\x80\x80"), 1007)


def test_receiver_text_invalid_char_split_across_fragments_fails_fast_1007() -> None:
    receiver = Receiver()
    assert receiver.receive_frame(OP_TEXT, False, False, b"ok\xf4") is None
    assert_fail(receiver.receive_frame(OP_CONT, False, False, b"\x90"), 1007)


@pytest.mark.parametrize("last", [b"", b"!"], ids=["empty_fin", "ascii_fin"])
def test_receiver_text_truncated_char_at_fin_fails_1007(last: bytes) -> None:
    # Only detectable at the end: the first fragment ends with a valid but incomplete prefix.
    receiver = Receiver()
    assert receiver.receive_frame(OP_TEXT, False, False, b"ab" + GRINNING[:2]) is None
    assert_fail(receiver.receive_frame(OP_CONT, True, False, last), 1007)


# Sequencing and reserved bits


@pytest.mark.parametrize(
    "frames",
    [
        [(OP_TEXT, True, b"x")],
        [(OP_BINARY, True, b"x")],
        [(OP_TEXT, False, b"x")],
        [(OP_PING, True, b"")],
        [(OP_CLOSE, True, b"\x03\xe8")],
        [(OP_TEXT, False, b"x"), (OP_CONT, True, b"y")],
    ],
    ids=["text", "binary", "text_first_fragment", "ping", "close", "continuation"],
)
def test_receiver_rsv_set_fails_1002(frames: list[Frame]) -> None:
    receiver = Receiver()
    *before, (opcode, fin, payload) = frames
    assert feed(receiver, before) == [None] * len(before)
    assert_fail(receiver.receive_frame(opcode, fin, True, payload), 1002)


@pytest.mark.parametrize("fin", [True, False])
def test_receiver_continuation_without_start_fails_1002(fin: bool) -> None:
    assert_fail(Receiver().receive_frame(OP_CONT, fin, False, b"x"), 1002)


def test_receiver_continuation_after_complete_message_fails_1002() -> None:
    receiver = Receiver()
    assert feed(receiver, fragments(OP_TEXT, [b"a", b"b"])) == [None, "ab"]
    assert_fail(receiver.receive_frame(OP_CONT, True, False, b"c"), 1002)


@pytest.mark.parametrize("first", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("fin", [True, False])
def test_receiver_new_message_during_fragmentation_fails_1002(
    first: int, second: int, fin: bool
) -> None:
    receiver = Receiver()
    assert receiver.receive_frame(first, False, False, b"a") is None
    assert_fail(receiver.receive_frame(second, fin, False, b"b"), 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xF])
def test_receiver_reserved_opcode_fails_1002(opcode: int) -> None:
    assert_fail(Receiver().receive_frame(opcode, True, False, b""), 1002)


@pytest.mark.parametrize(
    "opcode, fin, payload",
    [
        (OP_PING, False, b""),
        (OP_CLOSE, False, b""),
        (OP_PING, True, b"x" * 126),
        (OP_PONG, True, b"x" * 126),
        (OP_CLOSE, True, b"\x03\xe8" + b"x" * 124),
    ],
    ids=["fragmented_ping", "fragmented_close", "ping_126", "pong_126", "close_126"],
)
def test_receiver_invalid_control_frame_fails_1002(opcode: int, fin: bool, payload: bytes) -> None:
    assert_fail(Receiver().receive_frame(opcode, fin, False, payload), 1002)


# Message size limit


@pytest.mark.parametrize(
    "parts",
    [[b"x" * 10], [b"xxx", b"xxx", b"xxxx"], [b"", b"x" * 10, b""]],
    ids=["single", "three_fragments", "empty_edges"],
)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_receiver_message_exactly_at_limit_accepted(parts: list[bytes], opcode: int) -> None:
    events = feed(Receiver(max_message_size=10), fragments(opcode, parts))
    expected = b"x" * 10 if opcode == OP_BINARY else "x" * 10
    assert events == [None] * (len(parts) - 1) + [expected]


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_receiver_unfragmented_message_one_byte_over_limit_fails_1009(opcode: int) -> None:
    assert_fail(Receiver(max_message_size=10).receive_frame(opcode, True, False, b"x" * 11), 1009)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_receiver_fragments_one_byte_over_limit_fail_1009_at_crossing_frame(opcode: int) -> None:
    # The frame that crosses the limit fails at once, though it is not the last one.
    receiver = Receiver(max_message_size=10)
    assert receiver.receive_frame(opcode, False, False, b"x" * 6) is None
    assert receiver.receive_frame(OP_CONT, False, False, b"x" * 4) is None
    assert_fail(receiver.receive_frame(OP_CONT, False, False, b"x"), 1009)


def test_receiver_first_fragment_over_limit_fails_1009() -> None:
    receiver = Receiver(max_message_size=10)
    assert_fail(receiver.receive_frame(OP_BINARY, False, False, b"x" * 11), 1009)


def test_receiver_size_counts_each_message_separately() -> None:
    receiver = Receiver(max_message_size=4)
    messages = fragments(OP_BINARY, [b"ab", b"cd"]) + fragments(OP_BINARY, [b"ef", b"gh"])
    assert feed(receiver, messages) == [None, b"abcd", None, b"efgh"]


def test_receiver_size_counts_bytes_not_characters() -> None:
    # "é" is 2 bytes: 3 of them are 6 bytes, over a 5-byte limit.
    receiver = Receiver(max_message_size=5)
    assert_fail(receiver.receive_frame(OP_TEXT, True, False, "ééé".encode()), 1009)


def test_receiver_default_max_message_size_is_1_mib() -> None:
    receiver = Receiver()
    assert receiver.receive_frame(OP_BINARY, True, False, bytes(1 << 20)) == bytes(1 << 20)
    assert_fail(receiver.receive_frame(OP_BINARY, True, False, bytes((1 << 20) + 1)), 1009)


def test_receiver_max_message_size_none_has_no_limit() -> None:
    size = (1 << 20) + 1
    parts = [bytes(size)] * 3
    assert feed(Receiver(max_message_size=None), fragments(OP_BINARY, parts))[-1] == bytes(3 * size)


def test_receiver_max_message_size_zero_accepts_only_empty() -> None:
    receiver = Receiver(max_message_size=0)
    assert receiver.receive_frame(OP_TEXT, True, False, b"") == ""
    assert_fail(receiver.receive_frame(OP_TEXT, True, False, b"x"), 1009)


def test_receiver_negative_max_message_size_raises_value_error() -> None:
    with pytest.raises(ValueError):
        Receiver(max_message_size=-1)


# Close frames


@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
def test_receiver_close_valid_code_returns_close_received(code: int) -> None:
    event = Receiver().receive_frame(OP_CLOSE, True, False, code.to_bytes(2, "big") + b"bye")
    assert event == CloseReceived(code, "bye")


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_receiver_close_invalid_code_fails_1002(code: int) -> None:
    payload = code.to_bytes(2, "big") + b"bye"
    assert_fail(Receiver().receive_frame(OP_CLOSE, True, False, payload), 1002)


def test_receiver_close_empty_payload_returns_no_status_1005() -> None:
    assert Receiver().receive_frame(OP_CLOSE, True, False, b"") == CloseReceived(1005, "")


def test_receiver_close_code_without_reason_returns_empty_reason() -> None:
    assert Receiver().receive_frame(OP_CLOSE, True, False, b"\x03\xe8") == CloseReceived(1000, "")


def test_receiver_close_one_byte_payload_fails_1002() -> None:
    assert_fail(Receiver().receive_frame(OP_CLOSE, True, False, b"\x03"), 1002)


@pytest.mark.parametrize("bad", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_receiver_close_invalid_utf8_reason_fails_1007(bad: bytes) -> None:
    assert_fail(Receiver().receive_frame(OP_CLOSE, True, False, b"\x03\xe8" + bad), 1007)


def test_receiver_close_utf8_reason_decoded() -> None:
    payload = b"\x0f\xa0" + "ciao, κόσμε".encode()
    event = Receiver().receive_frame(OP_CLOSE, True, False, payload)
    assert event == CloseReceived(4000, "ciao, κόσμε")


def test_receiver_close_during_fragmented_message_then_frames_ignored() -> None:
    receiver = Receiver()
    assert receiver.receive_frame(OP_TEXT, False, False, b"part") is None
    assert receiver.receive_frame(OP_CLOSE, True, False, b"\x03\xe9") == CloseReceived(1001, "")
    assert feed(receiver, [(OP_CONT, True, b"rest"), (OP_TEXT, True, b"more")]) == [None, None]


# Sticky failure


@pytest.mark.parametrize(
    "bad_frame, code",
    [
        ((OP_CONT, True, False, b"x"), 1002),
        ((OP_TEXT, True, True, b"x"), 1002),
        ((OP_TEXT, True, False, b"\xff"), 1007),
        ((OP_BINARY, True, False, b"x" * 11), 1009),
        ((OP_CLOSE, True, False, b"\x03\xed"), 1002),
    ],
    ids=["continuation", "rsv", "utf8", "size", "close_code"],
)
def test_receiver_after_fail_every_call_returns_same_fail(
    bad_frame: tuple[int, bool, bool, bytes], code: int
) -> None:
    receiver = Receiver(max_message_size=10)
    failure = receiver.receive_frame(*bad_frame)
    assert_fail(failure, code)
    later = [
        (OP_TEXT, True, False, b"fine"),
        (OP_BINARY, True, False, b"fine"),
        (OP_PING, True, False, b""),
        (OP_CLOSE, True, False, b"\x03\xe8"),
        (OP_CONT, True, True, b"x"),
    ]
    for frame in later:
        assert receiver.receive_frame(*frame) is failure


def test_receiver_fail_mid_message_discards_partial_message() -> None:
    receiver = Receiver()
    assert receiver.receive_frame(OP_BINARY, False, False, b"a") is None
    failure = receiver.receive_frame(OP_CONT, False, True, b"b")
    assert_fail(failure, 1002)
    assert receiver.receive_frame(OP_CONT, True, False, b"c") is failure


# Control frames between fragments


def test_receiver_ping_pong_between_fragments_still_assembles_message() -> None:
    frames: list[Frame] = [
        (OP_TEXT, False, b"a" + GRINNING[:2]),
        (OP_PING, True, b"ping payload"),
        (OP_CONT, False, GRINNING[2:] + b"b"),
        (OP_PONG, True, b""),
        (OP_PING, True, b"x" * 125),
        (OP_CONT, True, b"c"),
    ]
    assert feed(Receiver(), frames) == [None] * 5 + ["a\N{GRINNING FACE}bc"]


def test_receiver_ping_pong_outside_messages_return_none() -> None:
    assert feed(Receiver(), [(OP_PING, True, b"p"), (OP_PONG, True, b"q")]) == [None, None]


def test_receiver_control_frames_do_not_count_toward_message_size() -> None:
    receiver = Receiver(max_message_size=4)
    frames: list[Frame] = [
        (OP_BINARY, False, b"ab"),
        (OP_PING, True, b"x" * 100),
        (OP_CONT, True, b"cd"),
    ]
    assert feed(receiver, frames) == [None, None, b"abcd"]


# Sending helpers


@pytest.mark.parametrize(
    "code, reason",
    [(1000, ""), (1001, "going away; retry_after=5"), (1014, "x"), (3000, "κόσμε"),
     (4999, "x" * 123), (1002, "é" * 61 + "x")],
)
def test_close_payload_round_trips_through_receiver(code: int, reason: str) -> None:
    payload = close_payload(code, reason)
    assert payload[:2] == code.to_bytes(2, "big")
    assert len(payload) <= 125
    assert Receiver().receive_frame(OP_CLOSE, True, False, payload) == CloseReceived(code, reason)


def test_close_payload_accepts_close_code_enum() -> None:
    assert close_payload(CloseCode.MESSAGE_TOO_BIG, "big") == b"\x03\xf1big"


@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_close_payload_unsendable_code_raises_value_error(code: int) -> None:
    with pytest.raises(ValueError):
        close_payload(code)


@pytest.mark.parametrize("reason", ["x" * 124, "é" * 62], ids=["ascii_124", "two_byte_124"])
def test_close_payload_reason_over_123_bytes_raises_value_error(reason: str) -> None:
    with pytest.raises(ValueError):
        close_payload(1000, reason)


@pytest.mark.parametrize(
    "code, valid",
    [(c, True) for c in VALID_CLOSE_CODES] + [(c, False) for c in INVALID_CLOSE_CODES],
)
def test_is_valid_close_code_table(code: int, valid: bool) -> None:
    assert is_valid_close_code(code) is valid


def test_close_code_values_match_rfc_6455() -> None:
    assert {c.name: int(c) for c in CloseCode} == {
        "NORMAL": 1000, "GOING_AWAY": 1001, "PROTOCOL_ERROR": 1002, "UNSUPPORTED_DATA": 1003,
        "NO_STATUS": 1005, "ABNORMAL": 1006, "INVALID_DATA": 1007, "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009, "MANDATORY_EXTENSION": 1010, "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012, "TRY_AGAIN_LATER": 1013, "BAD_GATEWAY": 1014,
    }


def test_opcode_constants_match_rfc_6455() -> None:
    assert (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG) == (0, 1, 2, 8, 9, 10)


def test_protocol_module_imports_no_io() -> None:
    tree = ast.parse(Path(protocol.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported.isdisjoint({"asyncio", "picows", "socket", "selectors", "threading"})
