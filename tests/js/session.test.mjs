// The JS Session in static/tether.js against the scenarios shared with tests/test_session_vectors.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import { Backoff, Session } from "../../src/tether/static/tether.js";

const { scenarios } = JSON.parse(readFileSync(new URL("../vectors/session.json", import.meta.url), "utf8"));

const near = (actual, expected) => assert.ok(Math.abs(actual - expected) <= 1e-12, `${actual} != ${expected}`);
const sorted = (ids) => [...ids].sort((a, b) => a - b);

function make({ outbox_size: outboxSize, max_retry_after: maxRetryAfter, resume, backoff } = {}) {
  const options = { outboxSize, maxRetryAfter, resume };
  if (backoff) {
    const { stable_after: stableAfter, ...rest } = backoff;
    options.backoff = new Backoff({ ...rest, stableAfter });
  }
  return new Session(options);
}

function check(session, step) {
  const seen = {
    state: session.state,
    outbox: session.outbox,
    pending: sorted(session.pending),
    written: sorted(session.written),
    opened: session.opened,
    attempt: session.backoff.attempt,
    token: session.token,
    session_id: session.sessionId,
    seq: session.seq,
    unacked: session.unacked,
    direct: session.direct,
    direct_acked: session.directAcked,
    stamp: session.stamp,
  };
  const fields = Object.keys(step).filter((key) => key !== "op" && key !== "note");
  assert.ok(fields.length > 0 && fields.every((key) => key in seen), JSON.stringify(step));
  for (const key of fields) assert.deepEqual(seen[key], step[key], key);
}

function assertRetry(actual, expected) {
  if (expected === null) return assert.equal(actual, null);
  assert.ok(actual !== null, "expected a retry");
  near(actual.delay, expected.delay);
  near(actual.notBefore, expected.not_before);
}

function run(session, step) {
  const { op, expected } = step;
  const id = step.id ?? null;
  switch (op) {
    case "request_id": return assert.equal(session.requestId(), expected);
    case "send": {
      if (step.raises) return assert.throws(() => session.send(step.payload, id), RangeError);
      const [writeNow, dropped] = session.send(step.payload, id);
      return assert.deepEqual({ write_now: writeNow, dropped }, expected);
    }
    case "queue": return assert.deepEqual(session.queue(step.payload, id), expected);
    case "wrote":
      if ("payload" in step) return assert.equal(session.wrote(id, step.payload), expected);
      return assert.equal(session.wrote(id), null);
    case "settle": return assert.equal(session.settle(id), expected);
    case "forget": return session.forget(id);
    case "connected": return assert.deepEqual(session.connected(step.now), expected);
    case "ended": {
      const [lost, retry] = session.ended(step.code, step.reason, step.now, step.rand, { status: step.status ?? null });
      assert.deepEqual(lost, expected.lost);
      return assertRetry(retry, expected.retry);
    }
    case "close": return assert.deepEqual(session.close(), expected);
    case "offer": return assert.equal(session.offer(step.clock ?? 0), expected);
    case "welcomed": {
      const { resumed, resend, lost, lostMessages, roomsLost } = session.welcomed(step.info);
      return assert.deepEqual({ resumed, resend, lost, lost_messages: lostMessages, rooms_lost: roomsLost }, expected);
    }
    case "acked": return session.acked(step.seq);
    case "received": return assert.equal(session.received(step.seq), expected);
    case "ack_due": return assert.equal(session.ackDue(), expected);
    case "joined": return session.joined(step.room, step.epoch, step.offset);
    case "left": return session.left(step.room);
    case "room_message": return assert.equal(session.roomMessage(step.room, step.off), expected);
    case "room_gap": return session.roomGap(step.room, step.last, step.epoch);
    case "positions": return assert.deepEqual(session.positions(), expected);
    case "check": return check(session, step);
    default: assert.fail(`unknown op ${op}`);
  }
}

for (const scenario of scenarios) {
  test(`Session: ${scenario.note}`, () => {
    if (scenario.raises) return assert.throws(() => make(scenario.options), RangeError);
    const session = make(scenario.options);
    scenario.steps.forEach((step, number) => {
      try {
        run(session, step);
      } catch (error) {
        error.message = `step ${number} ${JSON.stringify(step)}: ${error.message}`;
        throw error;
      }
    });
  });
}

test("Session refuses an outboxSize that is not an integer (JS only: Python's type says int)", () => {
  assert.throws(() => new Session({ outboxSize: 1.5 }), RangeError);
});
