"""tether.backoff and tether.keepalive against the vectors shared with static/tether.js."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tether.proto.backoff import Backoff, backoff_delay, retry_after, should_reconnect
from tether.proto.keepalive import heartbeat_due, liveness

VECTORS = Path(__file__).parent / "vectors"


def load(name: str, table: str) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((VECTORS / name).read_text())[table]
    return cases


def case_id(case: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items() if k not in ("expected", "note", "steps"))


def cases(name: str, table: str) -> Any:
    return pytest.mark.parametrize("case", load(name, table), ids=case_id)


def schedule(case: dict[str, Any]) -> dict[str, float]:
    return {k: case[k] for k in ("base", "factor", "cap") if k in case}


@cases("backoff.json", "backoff_delay")
def test_backoff_delay_matches_vector(case: dict[str, Any]) -> None:
    if case.get("raises"):
        with pytest.raises(ValueError):
            backoff_delay(case["attempt"], case["rand"], **schedule(case))
    else:
        delay = backoff_delay(case["attempt"], case["rand"], **schedule(case))
        assert delay == pytest.approx(case["expected"], abs=1e-12)


@cases("backoff.json", "should_reconnect")
def test_should_reconnect_matches_vector(case: dict[str, Any]) -> None:
    assert should_reconnect(case["code"], case["deliberate"]) is case["expected"]


@cases("backoff.json", "retry_after")
def test_retry_after_matches_vector(case: dict[str, Any]) -> None:
    assert retry_after(case["code"], case["reason"]) == case["expected"]


@cases("backoff.json", "sequences")
def test_backoff_state_follows_sequence(case: dict[str, Any]) -> None:
    backoff = Backoff(**case["options"])
    for step in case["steps"]:
        op = step["op"]
        if op == "next_delay":
            assert backoff.next_delay(step["rand"]) == pytest.approx(step["expected"], abs=1e-12)
        elif op == "connected":
            backoff.connected(step["now"])
        elif op == "maybe_reset":
            assert backoff.maybe_reset(step["now"]) is step["expected"], step
        elif op == "attempt":
            assert backoff.attempt == step["expected"]
        else:
            raise AssertionError(f"unknown op {op!r}")


@cases("keepalive.json", "liveness")
def test_liveness_matches_vector(case: dict[str, Any]) -> None:
    slack = {"late_slack": case["late_slack"]} if "late_slack" in case else {}
    args = (case["now"], case["last_received"], case["last_check"], case["interval"], case["timeout"])
    assert liveness(*args, **slack) == case["expected"]


@cases("keepalive.json", "heartbeat_due")
def test_heartbeat_due_matches_vector(case: dict[str, Any]) -> None:
    assert heartbeat_due(case["now"], case["last_sent"], case["interval"]) is case["expected"]
