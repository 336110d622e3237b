"""Property-based fuzzing (hypothesis) of the frame layer and the envelope layer.

- ``protocol.Receiver``, fed any sequence of frames, never raises, returns only the documented
  events, keeps failing once it failed, and every message it returns is exactly the frames'
  payloads put together, within ``max_message_size``, text being valid UTF-8.
- A typed ``App`` driven in-process (``tether.testing.connect``) answers any text with a
  reply or an error whose code is in the documented set (docs/security.md, docs/protocol.md)
  and any binary message with close 1003; nothing is logged but the failing handler's own
  error, and the next connection is served.
- Random bytes written on a real socket after a valid handshake never hurt the server: a
  fresh client gets its echo after every example.

Settings are deterministic (``derandomize=True``) and bounded so the file runs in well under a
minute; ``deadline=None`` because asyncio debug mode makes single examples slow at times.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from typing import Any

import msgspec
import pytest
from conftest import TIMEOUT_SCALE, ServerFactory, assert_serves, echo, timeout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawws import RawWS

import tether
import tether.testing
from tether.proto.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, CloseReceived, Fail, Receiver


def fuzz(max_examples: int) -> settings:
    """Deterministic, bounded settings; function-scoped fixtures (a server, caplog) are shared
    by the examples of one test on purpose."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )

# -- strategies ------------------------------------------------------------------------------

DEFINED_OPCODES = [OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG]
opcodes = st.one_of(st.sampled_from(DEFINED_OPCODES), st.integers(0, 15))
utf8 = st.text(max_size=40).map(str.encode)
payloads = st.one_of(
    st.binary(max_size=140),
    utf8,
    # UTF-8 cut anywhere: an incomplete (or split) code point
    utf8.flatmap(lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),
    # close frame bodies: any 16-bit code, then a UTF-8 or random reason
    st.builds(lambda code, reason: struct.pack("!H", code) + reason, st.integers(0, 0xFFFF), st.one_of(utf8, st.binary(max_size=8))),
    st.binary(max_size=2),
)
Frame = tuple[int, bool, bool, bytes]
frames = st.tuples(opcodes, st.booleans(), st.sampled_from([False, False, False, True]), payloads)


@st.composite
def fragmented(draw: st.DrawFn) -> list[Frame]:
    """One well-formed fragmented message (text split inside code points, or binary)."""
    opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
    data = draw(utf8 if opcode == OP_TEXT else st.binary(max_size=200))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=5)))
    parts = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out: list[Frame] = [(opcode if k == 0 else OP_CONT, k == len(parts) - 1, False, p) for k, p in enumerate(parts)]
    if draw(st.booleans()):  # a control frame between fragments is allowed [5.4]
        out.insert(draw(st.integers(0, len(out))), (draw(st.sampled_from([OP_PING, OP_PONG])), True, False, draw(st.binary(max_size=10))))
    return out


frame_sequences = st.lists(st.one_of(frames.map(lambda f: [f]), fragmented()), max_size=12).map(lambda xs: [f for x in xs for f in x])


# -- (a) the pure Receiver ---------------------------------------------------------------------


@fuzz(1500)
@given(max_size=st.sampled_from([0, 1, 16, 125, 300, None]), sequence=frame_sequences)
def test_receiver_receives_any_frames_returns_only_documented_events(max_size: int | None, sequence: list[Frame]) -> None:
    receiver = Receiver(max_message_size=max_size)
    failure: Fail | None = None
    closed = False
    pending: list[bytes] = []  # the payloads of the message in progress, as a reference model
    kind = OP_BINARY
    for opcode, fin, rsv, payload in sequence:
        was_idle = receiver.idle
        event = receiver.receive_frame(opcode, fin, rsv, payload)
        assert event is None or isinstance(event, (str, bytes, Fail, CloseReceived))
        if failure is not None:
            assert event == failure, "after a Fail every call returns the same Fail"
            continue
        if closed:
            assert event is None, "nothing is delivered after a close frame"
            continue
        if rsv or 3 <= opcode <= 7 or opcode >= 0xB:
            assert event == Fail(1002, event.reason if isinstance(event, Fail) else "")
        if opcode in (OP_CLOSE, OP_PING, OP_PONG) and (not fin or len(payload) > 125):
            assert isinstance(event, Fail) and event.code == 1002
        if opcode in (OP_TEXT, OP_BINARY):
            pending, kind = [payload], opcode
        elif opcode == OP_CONT:
            pending.append(payload)
        if isinstance(event, Fail):
            assert event.code in (1002, 1007, 1009)
            assert event.reason.isascii() and len(event.reason.encode()) <= 123
            failure = event
        elif isinstance(event, CloseReceived):
            assert opcode == OP_CLOSE
            if payload:
                assert (event.code, event.reason) == (int.from_bytes(payload[:2], "big"), payload[2:].decode())
                assert 1000 <= event.code <= 4999 and event.code not in (1004, 1005, 1006, 1015)
            else:
                assert (event.code, event.reason) == (1005, "")
            closed = True
        elif isinstance(event, (str, bytes)):
            assert fin and opcode in (OP_TEXT, OP_BINARY, OP_CONT)
            assert opcode != OP_CONT or not was_idle
            whole = b"".join(pending)
            if isinstance(event, str):
                assert kind == OP_TEXT and event == whole.decode()
                assert len(event.encode("utf-8")) <= (max_size if max_size is not None else len(whole))
            else:
                assert kind == OP_BINARY and event == whole
                assert max_size is None or len(event) <= max_size
            assert receiver.idle
            pending = []


def test_receiver_after_fail_returns_same_fail_for_valid_frames() -> None:
    receiver = Receiver(max_message_size=10)
    failure = receiver.receive_frame(OP_TEXT, True, True, b"x")
    assert isinstance(failure, Fail) and failure.code == 1002
    for frame in [(OP_TEXT, True, False, b"ok"), (OP_CLOSE, True, False, b"\x03\xe8"), (OP_BINARY, True, False, b"")]:
        assert receiver.receive_frame(*frame) is failure


# -- (b) a typed App, in-process -----------------------------------------------------------------

CODES = {"bad_json", "bad_envelope", "unknown_type", "invalid_data", "internal", "forbidden"}
SENTINEL = "\x00fuzz-sentinel\x00"


class Add(msgspec.Struct):
    a: int
    b: int


def make_app() -> tether.App:
    app = tether.App()

    @app.on("add")
    async def add(conn: tether.Conn, data: Add) -> int:
        return data.a + data.b

    @app.on("echo")
    def echo_data(conn: tether.Conn, data: Any) -> Any:
        return data

    @app.on("note")
    async def note(conn: tether.Conn, data: str) -> None:
        await asyncio.sleep(0)  # suspends: later messages queue behind it

    @app.on("boom")
    def boom(conn: tether.Conn) -> None:
        raise ValueError("boom")

    return app


APP = make_app()
TYPES = ["add", "echo", "note", "boom", "join", "leave", "heartbeat", "welcome", "reply", "error", "presence", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MISSING = object()


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object that looks more or less like an envelope."""
    obj: dict[str, Any] = {}
    type_ = draw(st.one_of(st.sampled_from(TYPES), st.text(max_size=10), json_values, st.just(MISSING)))
    if type_ is not MISSING:
        obj["type"] = type_
    data = draw(st.one_of(json_values, st.builds(lambda a, b: {"a": a, "b": b}, st.integers(), st.integers()), st.just(MISSING)))
    if data is not MISSING:
        obj["data"] = data
    id_ = draw(st.one_of(st.integers(), st.text(max_size=10), json_values, st.just(MISSING)))
    if id_ is not MISSING:
        obj["id"] = id_
    obj.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    keys = draw(st.permutations(list(obj)))  # any key order: msgspec reports the first error it meets
    return {k: obj[k] for k in keys}


def is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


async def exchange(message: str | bytes) -> list[tether.testing.Envelope]:
    """Send ``message`` on a fresh connection; return what the app answered (binary: [] after 1003)."""
    async with tether.testing.connect(APP, timeout=5) as client:
        await client.send_raw(message)
        if isinstance(message, bytes):
            with pytest.raises(tether.ConnectionClosed):
                async with timeout(5):
                    while True:
                        await client.receive_raw()
            assert client.close_code == 1003
            return []
        await client.send("add", {"a": 1, "b": 2}, id=SENTINEL)
        got = []
        while (envelope := await client.receive()).id != SENTINEL:
            got.append(envelope)
        assert (envelope.type, envelope.data) == ("reply", 3), "the request after the fuzz input is answered"
    return got


def check_answer(got: list[tether.testing.Envelope]) -> None:
    assert len(got) <= 1, got
    for envelope in got:
        assert envelope.type in ("reply", "error", "heartbeat"), envelope
        if envelope.type == "error":
            assert envelope.data["code"] in CODES, envelope
            assert isinstance(envelope.data["message"], str)


async def still_served() -> None:
    async with tether.testing.connect(APP, timeout=5) as client:
        assert await client.request("add", {"a": 2, "b": 40}) == 42


def check_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Only the failing handler's own error may be logged."""
    for record in caplog.records:
        if record.levelno < logging.ERROR:
            continue
        exc = record.exc_info[1] if record.exc_info else None
        assert record.getMessage().startswith("handler for 'boom' failed") and isinstance(exc, ValueError) and str(exc) == "boom", record.getMessage()


@fuzz(300)
@given(obj=envelopes())
async def test_app_receives_any_envelope_answers_reply_or_documented_error(obj: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    got = await exchange(json.dumps(obj))
    check_answer(got)
    has_id = "id" in obj and obj["id"] is not None
    if has_id and is_id(obj["id"]) and obj.get("type") != "heartbeat":
        # A request gets exactly one reply or error, carrying its id.
        assert len(got) == 1 and got[0].type in ("reply", "error") and got[0].id == obj["id"], got
    for envelope in got:
        # An answer carries the request's id when it had a valid one, else none.
        if envelope.type != "heartbeat":
            assert envelope.id == (obj["id"] if has_id and is_id(obj["id"]) else None), (obj, envelope)
    if obj.get("type") in ("add", "echo", "note", "boom") and (not has_id or is_id(obj["id"])):
        route, data = obj["type"], obj.get("data")
        valid = {
            "add": isinstance(data, dict) and all(type(data.get(k)) is int for k in "ab"),
            "echo": True,
            "note": isinstance(data, str),
            "boom": True,
        }[route]
        if not valid:
            assert [e.data["code"] for e in got] == ["invalid_data"], (obj, got)
        elif route == "boom":
            assert [e.data["code"] for e in got] == ["internal"], got
        elif has_id:
            assert got[0].type == "reply" and got[0].data == {"add": lambda: data["a"] + data["b"], "echo": lambda: data, "note": lambda: None}[route](), got
        else:
            assert got == [], got
    check_logs(caplog)
    await still_served()


json_ish_text = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    envelopes().map(json.dumps).flatmap(lambda s: st.integers(0, len(s)).map(lambda i: s[:i])),  # truncated
    st.sampled_from(['{"type":', "NaN", "[]", "null", '"add"', '{"type":"add","data":{"a":1e999,"b":1},"id":1}', '{"type":"add","id":1,"id":"x"}']),
)


@fuzz(300)
@given(text=json_ish_text)
async def test_app_receives_any_text_answers_at_most_one_documented_error(text: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    got = await exchange(text)
    check_answer(got)
    try:
        parsed = json.loads(text, parse_constant=lambda c: float("nan"))
    except ValueError:
        assert [e.data["code"] for e in got] in (["bad_json"], ["bad_envelope"]), (text, got)
    else:
        if not isinstance(parsed, dict):
            assert [e.data["code"] for e in got] in (["bad_json"], ["bad_envelope"]), (text, got)
    check_logs(caplog)
    await still_served()


@fuzz(100)
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=50).map(str.encode)))
async def test_app_receives_any_bytes_closes_1003(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    assert await exchange(data) == []
    check_logs(caplog)
    await still_served()


# -- (c) random bytes over a real socket -------------------------------------------------------


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a run of frames (real or lying) with garbage mixed in."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=1, max_size=600))
    ws = RawWS(None, None)  # type: ignore[arg-type]  # only its frame encoder is used
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        opcode, fin, rsv, payload = draw(frames)
        length = draw(st.one_of(st.none(), st.integers(0, 200), st.sampled_from([126, 65535, 65536, 1 << 40, (1 << 63) - 1])))
        out += ws.frame(opcode, payload, fin=fin, rsv=rsv, mask=draw(st.sampled_from([True, True, False])), length=length)
        if draw(st.sampled_from([False, False, True])):
            out += draw(st.binary(max_size=20))
    return out


@pytest.fixture
async def server(make_server: ServerFactory) -> tether.Server:
    return await make_server({"/socket": echo, "/app": APP}, max_message_size=4096, handshake_timeout=1, close_timeout=1)


async def drained(server: tether.Server, seconds: float = 5) -> None:
    """Poll, under a deadline, until the server has no open connections left."""
    deadline = time.monotonic() + seconds * TIMEOUT_SCALE
    while server.connections:
        assert time.monotonic() < deadline, f"{len(server.connections)} connections still open after {seconds} s"
        await asyncio.sleep(0.01)  # polling a condition under a deadline


@fuzz(25)
@given(path=st.sampled_from(["/socket", "/app"]), data=wire_bytes())
async def test_server_receives_random_bytes_after_handshake_keeps_serving(server: tether.Server, path: str, data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    ws = await RawWS.open(server.port, path)
    assert ws.status == 101
    try:
        ws.writer.write(data)
        async with timeout(5):
            await ws.writer.drain()
        # The server either drops us or waits for more bytes: give it a moment to do the former.
        try:
            async with asyncio.timeout(0.1):
                await ws.eof()
        except TimeoutError:
            pass
    except (ConnectionError, OSError):
        pass  # the server already dropped us
    finally:
        ws.abort()
    await assert_serves(server)
    await drained(server)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
