// static/tether.js client behaviour with a fake WebSocket and node:test mock timers (no sessions:
// the fake server's welcome has none; tests/js/resume.test.mjs has the session behaviour).
import { test } from "node:test";
import assert from "node:assert/strict";

import { ReplyError } from "../../src/tether/static/tether.js";
import { named, setup, START, WELCOME } from "./fake_socket.mjs";

test("client reconnects with full-jitter backoff after an unclean close", (t) => {
  const { client, sockets, events, tick } = setup(t);
  assert.equal(client.state, "connecting");
  sockets[0].open();
  assert.equal(client.state, "open");
  sockets[0].drop(1006);
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(events.slice(-2), [
    ["close", { code: 1006, reason: "", willReconnect: true }],
    ["reconnecting", { attempt: 1, delay: 250 }], // 0.5 * 0.5 s
  ]);
  tick(249);
  assert.equal(sockets.length, 1);
  tick(1);
  assert.equal(sockets.length, 2);
  sockets[1].drop(1006); // failed attempt: the delay doubles
  assert.deepEqual(events.at(-1), ["reconnecting", { attempt: 2, delay: 500 }]);
  tick(500);
  sockets[2].open();
  assert.equal(client.state, "open");
  assert.deepEqual(events.slice(-2), [["open", null], ["reconnected", null]]);
});

test("client resets its backoff only after the connection was stable", (t) => {
  const { sockets, events, tick } = setup(t, { backoff: { stableAfter: 10 } });
  sockets[0].drop(1006);
  tick(250);
  sockets[1].open();
  tick(9_999); // up, but not for stableAfter
  sockets[1].drop(1006);
  assert.deepEqual(events.at(-1), ["reconnecting", { attempt: 2, delay: 500 }]);
  tick(500);
  sockets[2].open();
  tick(10_000);
  sockets[2].drop(1006);
  assert.deepEqual(events.at(-1), ["reconnecting", { attempt: 1, delay: 250 }]);
});

test("client never reconnects after close()", (t) => {
  const { client, sockets, events, tick } = setup(t);
  sockets[0].open();
  client.close();
  assert.equal(client.state, "closed");
  assert.deepEqual(sockets[0].closedWith, { code: 1000, reason: "" });
  assert.deepEqual(events.at(-1), ["close", { code: 1000, reason: "", willReconnect: false }]);
  tick(60_000);
  assert.equal(sockets.length, 1);
  assert.throws(() => client.send("chat", {}), named("ClientClosed"));
});

test("client close() while waiting to retry cancels the retry", (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].drop(1006);
  client.close();
  tick(60_000);
  assert.equal(sockets.length, 1);
  assert.equal(client.state, "closed");
});

for (const code of [4001, 4003, 1008]) {
  test(`client does not reconnect after close code ${code}`, (t) => {
    const { client, sockets, events, tick } = setup(t);
    sockets[0].open();
    sockets[0].drop(code, "no");
    assert.equal(client.state, "closed");
    assert.deepEqual(events.at(-1), ["close", { code, reason: "no", willReconnect: false }]);
    tick(60_000);
    assert.equal(sockets.length, 1);
  });
}

test("client waits for a 1001 retry_after before reconnecting", (t) => {
  const { sockets, events, tick } = setup(t);
  sockets[0].open();
  sockets[0].drop(1001, "going away; retry_after=5");
  assert.deepEqual(events.at(-1), ["reconnecting", { attempt: 1, delay: 5250 }]);
  tick(5249);
  assert.equal(sockets.length, 1);
  tick(1);
  assert.equal(sockets.length, 2);
});

test("client queues messages while disconnected and flushes them in order", (t) => {
  const { client, sockets, tick } = setup(t);
  client.send("chat", { n: 1 });
  sockets[0].open();
  client.send("chat", { n: 2 });
  sockets[0].drop(1006);
  client.send("chat", { n: 3 });
  client.send("chat", { n: 4 });
  tick(250);
  sockets[1].open();
  assert.deepEqual(sockets[0].sent, [{ type: "chat", data: { n: 1 } }, { type: "chat", data: { n: 2 } }]);
  assert.deepEqual(sockets[1].sent, [{ type: "chat", data: { n: 3 } }, { type: "chat", data: { n: 4 } }]);
});

test("client outbox overflow drops the oldest message and fires outboxoverflow", async (t) => {
  const { client, sockets, events } = setup(t, { outboxSize: 2 });
  const request = client.request("add", { a: 1 });
  client.send("chat", { n: 1 });
  client.send("chat", { n: 2 });
  await assert.rejects(request, named("OutboxOverflow"));
  client.send("chat", { n: 3 });
  assert.deepEqual(events.filter(([name]) => name === "outboxoverflow"), [
    ["outboxoverflow", { message: { type: "add", data: { a: 1 }, id: 1 } }],
    ["outboxoverflow", { message: { type: "chat", data: { n: 1 } } }],
  ]);
  sockets[0].open();
  assert.deepEqual(sockets[0].sent.map((m) => m.data.n), [2, 3]);
});

test("client request resolves with the reply data", async (t) => {
  const { client, sockets } = setup(t);
  sockets[0].open();
  const result = client.request("add", { a: 1, b: 2 });
  assert.deepEqual(sockets[0].sent, [{ type: "add", data: { a: 1, b: 2 }, id: 1 }]);
  sockets[0].receive({ type: "reply", id: 1, data: 3 });
  assert.equal(await result, 3);
});

test("client request rejects with code and path on an error reply", async (t) => {
  const { client, sockets } = setup(t);
  sockets[0].open();
  const result = client.request("add", { a: "x" });
  sockets[0].receive({ type: "error", id: 1, data: { code: "invalid_data", message: "bad", path: "$.data.a" } });
  await assert.rejects(result, (error) => {
    assert.ok(error instanceof ReplyError);
    assert.equal(error.code, "invalid_data");
    assert.equal(error.path, "$.data.a");
    assert.equal(error.message, "bad");
    return true;
  });
});

test("client error reply without a request fires an error event", (t) => {
  const { sockets, events } = setup(t);
  sockets[0].open();
  sockets[0].receive({ type: "error", data: { code: "bad_json", message: "not JSON" } });
  const [name, error] = events.at(-1);
  assert.equal(name, "error");
  assert.equal(error.code, "bad_json");
});

test("client request times out with a TimeoutError and is not sent late", async (t) => {
  const { client, sockets, tick } = setup(t, { requestTimeout: 10_000 });
  const queued = client.request("slow", null);
  sockets[0].open();
  const written = client.request("slow", null, { timeout: 5000 });
  tick(5000);
  await assert.rejects(written, named("TimeoutError"));
  tick(5000);
  await assert.rejects(queued, named("TimeoutError"));

  const neverSent = client.request("late", null, { timeout: 100 });
  sockets[0].drop(1006);
  tick(100);
  await assert.rejects(neverSent, named("ConnectionLost"));
  const inOutbox = client.request("late", null, { timeout: 100 });
  tick(100);
  await assert.rejects(inOutbox, named("TimeoutError"));
  tick(250);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent, []);
});

test("client rejects requests written to a dropped socket with ConnectionLost", async (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open();
  const written = client.request("add", { a: 1 });
  sockets[0].drop(1006);
  await assert.rejects(written, named("ConnectionLost"));
  const queued = client.request("add", { a: 2 }); // sits in the outbox
  tick(250);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent, [{ type: "add", data: { a: 2 }, id: 2 }]);
  sockets[1].receive({ type: "reply", id: 2, data: 2 });
  assert.equal(await queued, 2);
});

test("client answers a server heartbeat with the same data and measures latency", (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open(WELCOME);
  const probe = sockets[0].sent.at(-1);
  assert.deepEqual(probe, { type: "heartbeat", data: { t: START } });
  sockets[0].receive({ type: "heartbeat", data: { t: 1234.5 } });
  assert.deepEqual(sockets[0].sent.at(-1), { type: "heartbeat", data: { t: 1234.5 } });
  assert.equal(client.latency, null);
  tick(40);
  sockets[0].receive(probe); // the server echoes our probe
  assert.equal(client.latency, 40);
  assert.equal(sockets[0].sent.length, 2); // an echo is not answered
});

test("client declares a silent server dead and reconnects", (t) => {
  const { client, sockets, events, tick } = setup(t);
  sockets[0].open(WELCOME);
  tick(25_000); // 25 s of silence <= interval + timeout
  assert.equal(client.state, "open");
  tick(25_000); // 50 s > 35 s, and the check ran on time
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(sockets[0].closedWith, { code: 1000, reason: "keepalive timeout" });
  assert.deepEqual(events.at(-2), ["close", { code: 1006, reason: "keepalive timeout", willReconnect: true }]);
  tick(250);
  assert.equal(sockets.length, 2);
});

test("client notices a dead server within interval + timeout of its last message", (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open(WELCOME);
  const advance = (ms) => { for (let i = 0; i < ms; i += 100) tick(Math.min(100, ms - i)); }; // time passing
  advance(20_000);
  sockets[0].receive({ type: "heartbeat", data: { t: 1 } }); // last sign of life at 20 s
  advance(34_900); // 54.9 s: 34.9 s of silence, still within 25 + 10
  assert.equal(client.state, "open");
  advance(200); // just past the window: the check scheduled for it runs, not one an interval later
  assert.equal(client.state, "reconnecting");
});

test("client stays open while the server keeps sending", (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open(WELCOME);
  for (let i = 0; i < 10; i++) {
    tick(20_000);
    sockets[0].receive({ type: "heartbeat", data: { t: i } });
  }
  assert.equal(client.state, "open");
});

test("client probes instead of declaring death when its timer ran late", (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open(WELCOME);
  const sentBefore = sockets[0].sent.length;
  t.mock.timers.setTime(START + 3_600_000); // the tab was suspended for an hour
  tick(1); // the overdue check runs now, very late
  assert.equal(client.state, "open");
  assert.equal(sockets[0].sent.length, sentBefore + 1);
  assert.equal(sockets[0].sent.at(-1).type, "heartbeat");
  tick(9_000); // the server gets a fresh timeout window (10 s) to answer
  sockets[0].receive(sockets[0].sent.at(-1));
  tick(16_000); // next check: on time and the server answered
  assert.equal(client.state, "open");

  t.mock.timers.setTime(Date.now() + 3_600_000); // suspended again
  tick(25_000); // late check: probe
  assert.equal(client.state, "open");
  tick(25_000); // the server stayed silent past its fresh window: dead
  assert.equal(client.state, "reconnecting");
});

test("client without heartbeat settings never times out", (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open({ type: "welcome", data: { heartbeat: { interval: null, timeout: null } } });
  tick(3_600_000);
  assert.equal(client.state, "open");
  assert.deepEqual(sockets[0].sent, []);
});

test("client recomputes params on every connect", (t) => {
  let n = 0;
  const { sockets, tick } = setup(t, { params: () => ({ token: `t${++n}`, skip: null }) });
  assert.equal(sockets[0].url.searchParams.get("token"), "t1");
  assert.equal(sockets[0].url.searchParams.has("skip"), false);
  sockets[0].drop(4002, "token expired");
  tick(250);
  assert.equal(sockets[1].url.searchParams.get("token"), "t2");
  assert.equal(sockets[1].url.pathname, "/ws");
});

test("client awaits async params before connecting", async (t) => {
  const { sockets } = setup(t, { params: async () => ({ token: "async" }) });
  assert.equal(sockets.length, 0);
  await Promise.resolve();
  await Promise.resolve();
  assert.equal(sockets[0].url.searchParams.get("token"), "async");
});

test("client dispatches messages by type and unsubscribes", (t) => {
  const { client, sockets } = setup(t);
  const got = [];
  const off = client.on("chat", (data) => got.push(data));
  sockets[0].open();
  sockets[0].receive({ type: "chat", data: { text: "a" } });
  sockets[0].receive({ type: "future_system_message", data: {} }); // ignored
  sockets[0].receive({ type: "chat" }); // absent data is null
  off();
  sockets[0].receive({ type: "chat", data: { text: "b" } });
  assert.deepEqual(got, [{ text: "a" }, null]);
});

test("client reconnects at once when the page becomes visible", (t) => {
  const document = Object.assign(new EventTarget(), { visibilityState: "hidden" });
  globalThis.document = document;
  t.after(() => { delete globalThis.document; });
  const { sockets } = setup(t, { reconnectOnWake: true });
  sockets[0].drop(1006);
  document.dispatchEvent(new Event("visibilitychange")); // still hidden
  assert.equal(sockets.length, 1);
  document.visibilityState = "visible";
  document.dispatchEvent(new Event("visibilitychange"));
  assert.equal(sockets.length, 2);
});

test("client caps a 1001 retry_after at maxRetryAfter (default 60 s), wake() included", (t) => {
  const { client, sockets, events, tick } = setup(t);
  sockets[0].open();
  sockets[0].drop(1001, "going away; retry_after=3600");
  assert.deepEqual(events.at(-1), ["reconnecting", { attempt: 1, delay: 60_250 }]);
  tick(1000);
  client.wake(); // skips the backoff, not the (capped) retry_after
  tick(58_999);
  assert.equal(sockets.length, 1);
  tick(1);
  assert.equal(sockets.length, 2);
});

test("client maxRetryAfter option lowers the cap", (t) => {
  const { sockets, events, tick } = setup(t, { maxRetryAfter: 10 });
  sockets[0].open();
  sockets[0].drop(1001, "retry_after=30");
  assert.deepEqual(events.at(-1), ["reconnecting", { attempt: 1, delay: 10_250 }]);
  tick(10_249);
  assert.equal(sockets.length, 1);
  tick(1);
  assert.equal(sockets.length, 2);
});

test("client with outboxSize 0 rejects a request sent while not open at once", async (t) => {
  const { client, sockets, events } = setup(t, { outboxSize: 0 });
  await assert.rejects(client.request("add", { a: 1 }), named("OutboxOverflow"));
  client.send("chat", { n: 1 });
  assert.deepEqual(events.filter(([name]) => name === "outboxoverflow").length, 2);
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, []);
  client.send("chat", { n: 2 }); // open: written at once
  assert.deepEqual(sockets[0].sent, [{ type: "chat", data: { n: 2 } }]);
});

test("client final close fails flushed requests as lost and queued ones as closed", async (t) => {
  const { client, sockets, events } = setup(t);
  const flushed = client.request("add", { a: 1 });
  sockets[0].open(); // flushed: written to this socket
  sockets[0].readyState = 2; // the server's close frame arrived: closing
  const queued = client.request("add", { a: 2 }); // cannot be written: waits in the outbox
  assert.deepEqual(sockets[0].sent, [{ type: "add", data: { a: 1 }, id: 1 }]);
  sockets[0].drop(4001, "auth");
  await assert.rejects(flushed, named("ConnectionLost"));
  await assert.rejects(queued, named("ClientClosed"));
  assert.equal(client.state, "closed");
  assert.deepEqual(events.at(-1), ["close", { code: 4001, reason: "auth", willReconnect: false }]);
});

test("client close() rejects written and queued requests with ClientClosed", async (t) => {
  const { client, sockets } = setup(t);
  sockets[0].open();
  const written = client.request("add", { a: 1 });
  sockets[0].readyState = 2;
  const queued = client.request("add", { a: 2 });
  client.close();
  await assert.rejects(written, named("ClientClosed"));
  await assert.rejects(queued, named("ClientClosed"));
});

test("client ignores a second reply and a reply to a timed-out request", async (t) => {
  const { client, sockets, events, tick } = setup(t);
  sockets[0].open();
  const late = client.request("slow", null, { timeout: 100 });
  tick(100);
  await assert.rejects(late, named("TimeoutError"));
  const answered = client.request("add", null);
  sockets[0].receive({ type: "reply", id: 2, data: "first" });
  sockets[0].receive({ type: "reply", id: 2, data: "second" });
  sockets[0].receive({ type: "reply", id: 1, data: "too late" });
  sockets[0].receive({ type: "reply", id: true, data: "not an id" });
  assert.equal(await answered, "first");
  assert.deepEqual(events.filter(([name]) => name === "error"), []);
  sockets[0].receive({ type: "error", id: 1, data: { code: "x", message: "late error" } });
  assert.equal(events.at(-1)[1].message, "late error"); // an error matching no request is an event
});

test("client sends the request ids 1, 2, 3 across reconnects", (t) => {
  const { client, sockets, tick } = setup(t);
  client.request("a", null).catch(() => {});
  sockets[0].open();
  client.request("b", null).catch(() => {});
  sockets[0].drop(1006);
  client.request("c", null).catch(() => {});
  tick(250);
  sockets[1].open();
  assert.deepEqual([...sockets[0].sent, ...sockets[1].sent].map((m) => [m.type, m.id]), [["a", 1], ["b", 2], ["c", 3]]);
});

test("client fires reconnected on every connection but the first", (t) => {
  const { sockets, events, tick } = setup(t);
  sockets[0].drop(1006); // the first attempt failed: the next open is still the first connection
  tick(250);
  sockets[1].open();
  assert.deepEqual(events.filter(([name]) => name === "open" || name === "reconnected"), [["open", null]]);
  sockets[1].drop(1006);
  tick(500);
  sockets[2].open();
  assert.deepEqual(events.slice(-2), [["open", null], ["reconnected", null]]);
});
