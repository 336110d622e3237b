// The JS ports in static/tether.js against the vectors shared with tests/test_backoff_vectors.py.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import {
  Backoff, backoffDelay, heartbeatDue, liveness, retryAfter, shouldReconnect,
} from "../../src/tether/static/tether.js";

const load = (name) => JSON.parse(readFileSync(new URL(`../vectors/${name}`, import.meta.url), "utf8"));
const backoff = load("backoff.json");
const keepalive = load("keepalive.json");

const close = (actual, expected) => assert.ok(Math.abs(actual - expected) <= 1e-12, `${actual} != ${expected}`);
const label = (c) => JSON.stringify(c);
const schedule = ({ base, factor, cap }) => ({ base, factor, cap });

for (const c of backoff.backoff_delay) {
  test(`backoffDelay ${label(c)}`, () => {
    if (c.raises) assert.throws(() => backoffDelay(c.attempt, c.rand, schedule(c)), RangeError);
    else close(backoffDelay(c.attempt, c.rand, schedule(c)), c.expected);
  });
}

for (const c of backoff.should_reconnect) {
  test(`shouldReconnect ${label(c)}`, () => {
    assert.equal(shouldReconnect(c.code, c.deliberate), c.expected);
  });
}

for (const c of backoff.retry_after) {
  test(`retryAfter ${label(c)}`, () => {
    assert.equal(retryAfter(c.code, c.reason), c.expected);
  });
}

for (const c of backoff.sequences) {
  test(`Backoff sequence: ${c.note}`, () => {
    const { stable_after: stableAfter, ...rest } = c.options;
    const b = new Backoff({ ...rest, stableAfter });
    for (const step of c.steps) {
      if (step.op === "next_delay") close(b.nextDelay(step.rand), step.expected);
      else if (step.op === "connected") b.connected(step.now);
      else if (step.op === "maybe_reset") assert.equal(b.maybeReset(step.now), step.expected, label(step));
      else if (step.op === "attempt") assert.equal(b.attempt, step.expected);
      else assert.fail(`unknown op ${step.op}`);
    }
  });
}

for (const c of keepalive.liveness) {
  test(`liveness ${label(c)}`, () => {
    const got = liveness(c.now, c.last_received, c.last_check, c.interval, c.timeout, { lateSlack: c.late_slack });
    assert.equal(got, c.expected);
  });
}

for (const c of keepalive.heartbeat_due) {
  test(`heartbeatDue ${label(c)}`, () => {
    assert.equal(heartbeatDue(c.now, c.last_sent, c.interval), c.expected);
  });
}
