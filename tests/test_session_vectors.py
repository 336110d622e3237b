"""tether.proto.session.Session against the scenarios shared with static/tether.js (tests/vectors/session.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tether.proto.backoff import Backoff
from tether.proto.session import Retry, Session, Welcome

SCENARIOS: list[dict[str, Any]] = json.loads((Path(__file__).parent / "vectors" / "session.json").read_text())["scenarios"]


def make(options: dict[str, Any]) -> Session:
    kwargs = {k: v for k, v in options.items() if k != "backoff"}
    if "backoff" in options:
        kwargs["backoff"] = Backoff(**options["backoff"])
    return Session(**kwargs)


def entry(item: tuple[Any, int | None] | None) -> list[Any] | None:
    return None if item is None else list(item)


def retry(value: Retry | None) -> dict[str, float] | None:
    return None if value is None else {"delay": value.delay, "not_before": value.not_before}


def assert_retry(actual: Retry | None, expected: dict[str, float] | None) -> None:
    if expected is None:
        assert actual is None
    else:
        assert retry(actual) == pytest.approx(expected, abs=1e-12)


def welcome(value: Welcome) -> dict[str, Any]:
    return {
        "resumed": value.resumed,
        "resend": value.resend,
        "lost": value.lost,
        "lost_messages": value.lost_messages,
        "rooms_lost": value.rooms_lost,
    }


def check(session: Session, step: dict[str, Any]) -> None:
    seen = {
        "state": session.state,
        "outbox": [list(e) for e in session.outbox],
        "pending": sorted(session.pending),
        "written": sorted(session.written),
        "opened": session.opened,
        "attempt": session.backoff.attempt,
        "token": session.token,
        "session_id": session.session_id,
        "seq": session.seq,
        "unacked": [list(e) for e in session.unacked],
        "direct": session.direct,
        "direct_acked": session.direct_acked,
        "stamp": session.stamp,
    }
    fields = set(step) - {"op", "note"}
    assert fields and fields <= set(seen), step
    assert {k: seen[k] for k in fields} == {k: step[k] for k in fields}


def run(session: Session, step: dict[str, Any]) -> None:
    op, id = step["op"], step.get("id")
    expected: Any = step.get("expected")
    if op == "request_id":
        assert session.request_id() == expected
    elif op == "send":
        if step.get("raises"):
            with pytest.raises(ValueError):
                session.send(step["payload"], id)
            return
        write_now, dropped = session.send(step["payload"], id)
        assert {"write_now": write_now, "dropped": entry(dropped)} == expected
    elif op == "queue":
        assert entry(session.queue(step["payload"], id)) == expected
    elif op == "wrote":
        if "payload" in step:
            assert session.wrote(id, step["payload"]) == expected
        else:
            assert session.wrote(id) is None
    elif op == "settle":
        assert session.settle(id) is expected
    elif op == "forget":
        session.forget(step["id"])
    elif op == "connected":
        assert [list(e) for e in session.connected(step["now"])] == expected
    elif op == "ended":
        lost, got = session.ended(step["code"], step["reason"], step["now"], step["rand"], status=step.get("status"))
        assert lost == expected["lost"]
        assert_retry(got, expected["retry"])
    elif op == "close":
        assert session.close() == expected
    elif op == "offer":
        assert session.offer(step.get("clock", 0)) == expected
    elif op == "welcomed":
        assert welcome(session.welcomed(step["info"])) == expected
    elif op == "acked":
        session.acked(step["seq"])
    elif op == "received":
        assert session.received(step["seq"]) is expected
    elif op == "ack_due":
        assert session.ack_due() == expected
    elif op == "joined":
        session.joined(step["room"], step["epoch"], step["offset"])
    elif op == "left":
        session.left(step["room"])
    elif op == "room_message":
        assert session.room_message(step["room"], step["off"]) is expected
    elif op == "room_gap":
        session.room_gap(step["room"], step["last"], step["epoch"])
    elif op == "positions":
        assert session.positions() == expected
    elif op == "check":
        check(session, step)
    else:
        raise AssertionError(f"unknown op {op!r}")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["note"] for s in SCENARIOS])
def test_session_follows_scenario(scenario: dict[str, Any]) -> None:
    if scenario.get("raises"):
        with pytest.raises(ValueError):
            make(scenario.get("options", {}))
        return
    session = make(scenario.get("options", {}))
    for number, step in enumerate(scenario["steps"]):
        try:
            run(session, step)
        except AssertionError as exc:
            raise AssertionError(f"step {number}: {step}") from exc


def test_session_vectors_cover_every_op() -> None:
    """The vector file exercises every operation, both refusals, every close rule, and both
    outcomes of a welcome (resumed, a new session, none)."""
    steps = [step for s in SCENARIOS for step in s["steps"]]
    ops = {step["op"] for step in steps}
    assert ops == {
        "request_id", "send", "queue", "wrote", "settle", "forget", "connected", "ended", "close", "check",
        "offer", "welcomed", "acked", "received", "ack_due", "joined", "left", "room_message", "room_gap", "positions",
    }
    codes = {step["code"] for step in steps if step["op"] == "ended"}
    assert {1008, 4001, 4003, 4009, 1001, 1006, None} <= codes
    welcomes = [step for step in steps if step["op"] == "welcomed"]
    assert {w["expected"]["resumed"] for w in welcomes} == {True, False}
    assert any(w["info"] is None for w in welcomes) and any(w["expected"]["lost"] for w in welcomes)
    assert {401, 403} <= {step.get("status") for step in steps}
    assert any(s.get("raises") for s in SCENARIOS) and any(step.get("raises") for step in steps)
