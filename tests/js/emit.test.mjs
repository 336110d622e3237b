// TetherClient.emit (waits for room, never drops: tether.Client.emit's twin) and requests that
// wait for outbox room while disconnected, with a fake WebSocket and mocked timers.
import { test } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../../src/tether/static/tether.js";
import { fakeWebSocketClass, named, setup } from "./fake_socket.mjs";

/** Whether `promise` settled by now (after pending microtasks, and setImmediate, which is not mocked). */
async function settled(promise) {
  let done = false;
  promise.then(() => { done = true; }, () => { done = true; });
  await new Promise((resolve) => setImmediate(resolve));
  return done;
}

const overflows = (events) => events.filter(([name]) => name === "outboxoverflow");
const notes = (socket) => socket.sent.filter((m) => m.type === "note").map((m) => m.data);

/** A welcome with a session (`over`: its fields). */
function session(over = {}) {
  const info = { id: "s1", token: "tok", resumed: false, ack: 0, window: 120, ...over };
  return { type: "welcome", data: { heartbeat: { interval: null, timeout: null }, session: info } };
}

test("emit while open writes at once and resolves", async (t) => {
  const { client, sockets } = setup(t);
  sockets[0].open();
  const sent = client.emit("note", 1);
  assert.deepEqual(sockets[0].sent, [{ type: "note", data: 1 }]); // written before emit returns
  assert.equal(await settled(sent), true);
  assert.equal(await sent, undefined);
});

test("emit waits while the socket's bufferedAmount is above maxBufferedAmount, then resolves", async (t) => {
  const { client, sockets, tick } = setup(t, { maxBufferedAmount: 100 });
  sockets[0].open();
  sockets[0].bufferedAmount = 100; // at the limit: no wait
  assert.equal(await settled(client.emit("note", 1)), true);
  sockets[0].bufferedAmount = 101;
  const sent = client.emit("note", 2);
  assert.deepEqual(notes(sockets[0]), [1, 2]); // written at once all the same: it waits after
  tick(50);
  assert.equal(await settled(sent), false);
  sockets[0].bufferedAmount = 40; // the network took it
  tick(5);
  assert.equal(await settled(sent), true);
});

test("emit waiting for a socket to drain stops waiting when that socket drops", async (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open();
  sockets[0].bufferedAmount = 1 << 20; // over the default 64 KiB
  const sent = client.emit("note", 1);
  tick(5);
  assert.equal(await settled(sent), false);
  sockets[0].drop(1006);
  tick(5);
  assert.equal(await settled(sent), true);
});

test("emit while disconnected with room queues and resolves at once", async (t) => {
  const { client, sockets, events } = setup(t, { outboxSize: 2 });
  assert.equal(await settled(client.emit("note", 1)), true);
  assert.equal(await settled(client.emit("note", 2)), true);
  assert.deepEqual(overflows(events), []);
  sockets[0].open();
  assert.deepEqual(notes(sockets[0]), [1, 2]);
});

test("emit with a full outbox waits for the reconnect instead of dropping, and keeps the order", async (t) => {
  const { client, sockets, events, tick } = setup(t, { outboxSize: 2 });
  client.send("note", 1);
  client.send("note", 2); // full
  const waiting = [3, 4, 5].map((n) => client.emit("note", n));
  for (const sent of waiting) assert.equal(await settled(sent), false);
  sockets[0].drop(1006); // a failed attempt: still full, still waiting
  tick(250);
  for (const sent of waiting) assert.equal(await settled(sent), false);
  sockets[1].open(); // the outbox is flushed, the waiting ones go out after it, in order
  await Promise.all(waiting);
  assert.deepEqual(notes(sockets[1]), [1, 2, 3, 4, 5]);
  assert.deepEqual(overflows(events), []);
});

test("emit on a socket that is closing waits for room like a disconnected one", async (t) => {
  const { client, sockets, events, tick } = setup(t, { outboxSize: 1 });
  sockets[0].open();
  sockets[0].readyState = 2; // the server's close frame came: "open" no more, not closed yet
  client.send("note", 1); // queued for the next socket: the outbox is full
  const sent = client.emit("note", 2);
  assert.equal(await settled(sent), false);
  sockets[0].drop(1000);
  tick(250);
  sockets[1].open();
  await sent;
  assert.deepEqual(notes(sockets[1]), [1, 2]);
  assert.deepEqual(overflows(events), []);
});

test("emit with outboxSize 0 while disconnected drops the message, as send does", async (t) => {
  const { client, sockets, events } = setup(t, { outboxSize: 0 });
  assert.equal(await settled(client.emit("note", 1)), true);
  assert.deepEqual(overflows(events), [["outboxoverflow", { message: { type: "note", data: 1 } }]]);
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, []);
});

test("emit rejects with ClientClosed after close(), and when close() comes while it waits", async (t) => {
  const { client } = setup(t, { outboxSize: 1 });
  client.send("note", 1);
  const waiting = client.emit("note", 2);
  assert.equal(await settled(waiting), false);
  client.close();
  await assert.rejects(waiting, named("ClientClosed"));
  await assert.rejects(client.emit("note", 3), named("ClientClosed"));
});

test("emit waiting for room rejects with ClientClosed after a final close from the server", async (t) => {
  const { client, sockets } = setup(t, { outboxSize: 1 });
  sockets[0].open();
  sockets[0].readyState = 2;
  client.send("note", 1);
  const waiting = client.emit("note", 2);
  sockets[0].drop(4001, "auth");
  await assert.rejects(waiting, named("ClientClosed"));
  assert.equal(client.state, "closed");
});

test("emit of data JSON cannot encode rejects and sends nothing", async (t) => {
  const { client, sockets } = setup(t);
  sockets[0].open();
  await assert.rejects(client.emit("note", 1n), TypeError);
  assert.deepEqual(sockets[0].sent, []);
});

test("maxBufferedAmount must be a number >= 0", () => {
  const WebSocket = fakeWebSocketClass();
  for (const bad of [-1, NaN, "64k"]) {
    assert.throws(() => connect("ws://example.test/ws", { WebSocket, maxBufferedAmount: bad }), RangeError);
  }
  assert.equal(WebSocket.instances.length, 0);
});

test("emit in a session: a message written to a socket that dropped is resent after the resume", async (t) => {
  const { client, sockets, tick } = setup(t);
  sockets[0].open(session());
  sockets[0].bufferedAmount = 1 << 20;
  const sent = client.emit("note", 1);
  sockets[0].drop(1006);
  tick(5); // its next look at the socket: gone
  await sent;
  tick(245);
  sockets[1].open(session({ resumed: true, ack: 0 }));
  assert.deepEqual(sockets[1].sent, [
    { type: "resume", data: { rooms: {} } },
    { type: "note", data: 1, seq: 1 },
  ]);
});

// -- requests wait for outbox room while disconnected (tether.Client does the same)

test("a request with a full outbox waits for room instead of pushing the oldest message out", async (t) => {
  const { client, sockets, events, tick } = setup(t, { outboxSize: 2 });
  client.send("note", 1);
  client.send("note", 2);
  const waitingNote = client.emit("note", 3);
  const reply = client.request("add", { a: 1 });
  assert.equal(await settled(reply), false);
  assert.deepEqual(overflows(events), []);
  sockets[0].drop(1006);
  tick(250);
  sockets[1].open(); // flushed; then the waiting emit and request, in the order they came
  await waitingNote;
  assert.deepEqual(sockets[1].sent, [
    { type: "note", data: 1 }, { type: "note", data: 2 }, { type: "note", data: 3 }, { type: "add", data: { a: 1 }, id: 1 },
  ]);
  sockets[1].receive({ type: "reply", id: 1, data: 1 });
  assert.equal(await reply, 1);
  assert.deepEqual(overflows(events), []);
});

test("a request waiting for room times out and is never sent", async (t) => {
  const { client, sockets, tick } = setup(t, { outboxSize: 1 });
  client.send("note", 1);
  const reply = client.request("add", { a: 1 }, { timeout: 100 });
  tick(100);
  await assert.rejects(reply, named("TimeoutError"));
  tick(150);
  sockets[0].open();
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(sockets[0].sent, [{ type: "note", data: 1 }]);
});

test("a request whose outbox entry timed out frees its place for one waiting", async (t) => {
  const { client, sockets, tick } = setup(t, { outboxSize: 1 });
  const first = client.request("slow", null, { timeout: 100 }); // in the outbox
  const second = client.request("add", { a: 1 }, { timeout: 1000 }); // waits for room
  assert.equal(await settled(second), false);
  tick(100);
  await assert.rejects(first, named("TimeoutError"));
  await new Promise((resolve) => setImmediate(resolve)); // the waiting request takes the free place
  tick(150);
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{ type: "add", data: { a: 1 }, id: 2 }]);
  sockets[0].receive({ type: "reply", id: 2, data: 1 });
  assert.equal(await second, 1);
});

test("a request waiting for room rejects with ClientClosed on close()", async (t) => {
  const { client, sockets } = setup(t, { outboxSize: 1 });
  client.send("note", 1);
  const reply = client.request("add", { a: 1 });
  assert.equal(await settled(reply), false);
  client.close();
  await assert.rejects(reply, named("ClientClosed"));
  assert.equal(sockets.length, 1);
});

test("a request with outboxSize 0 while disconnected still fails at once with OutboxOverflow", async (t) => {
  const { client } = setup(t, { outboxSize: 0 });
  await assert.rejects(client.request("add", { a: 1 }), named("OutboxOverflow"));
});

test("a request with room in the outbox is queued at once, before the next message", async (t) => {
  const { client, sockets } = setup(t, { outboxSize: 3 });
  const reply = client.request("add", { a: 1 });
  client.send("note", 1);
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{ type: "add", data: { a: 1 }, id: 1 }, { type: "note", data: 1 }]);
  sockets[0].receive({ type: "reply", id: 1, data: 1 });
  assert.equal(await reply, 1);
});
