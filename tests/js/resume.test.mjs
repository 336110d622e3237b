// tether.js with sessions (resume, on by default): a fake server's welcome carries a session.
import { test } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../../src/tether/static/tether.js";
import { fakeWebSocketClass, named, setup } from "./fake_socket.mjs";

const URL_ = "ws://example.test/ws";
const KEY = `tether.session ${URL_}`; // the default persistKey

/** A welcome with a session (`over` changes its fields: `resumed`, `ack`, `token`...). */
function session(over = {}) {
  const info = { id: "s1", token: "tok", resumed: false, ack: 0, window: 120, ...over };
  return { type: "welcome", data: { heartbeat: { interval: null, timeout: null }, session: info } };
}

const joined = (room, epoch, offset, seq) => ({ type: "joined", room, data: { epoch, offset }, seq });
const only = (events, ...names) => events.filter(([name]) => names.includes(name));

/** Whether `promise` settled by now (after the pending microtasks ran). */
async function settled(promise) {
  let done = false;
  promise.then(() => { done = true; }, () => { done = true; });
  for (let i = 0; i < 5; i++) await Promise.resolve();
  return done;
}

/** A Storage in memory; `limit` (characters per item) makes setItem throw like a full one. */
class MemoryStorage {
  items = new Map();
  constructor(limit = Infinity) { this.limit = limit; }
  getItem(key) { return this.items.has(key) ? this.items.get(key) : null; }
  setItem(key, value) {
    if (String(value).length > this.limit) throw Object.assign(new Error("full"), { name: "QuotaExceededError" });
    this.items.set(key, String(value));
  }
  removeItem(key) { this.items.delete(key); }
  saved(key = KEY) { return JSON.parse(this.items.get(key) ?? "null"); }
}

/** A page that can be hidden (`hide()`): where `persist` saves the session before it goes away. */
function fakeDocument(t) {
  const document = Object.assign(new EventTarget(), { visibilityState: "visible" });
  globalThis.document = document;
  t.after(() => { delete globalThis.document; });
  return {
    hide() {
      document.visibilityState = "hidden";
      document.dispatchEvent(new Event("visibilitychange"));
    },
  };
}

/** The same page loaded again: a second client on the same storage (the clock is mocked already). */
function reload(storage, options = {}) {
  const WebSocket = fakeWebSocketClass();
  const client = connect(URL_, { WebSocket, reconnectOnWake: false, persist: storage, ...options });
  const events = [];
  for (const name of ["open", "reconnected", "resumed", "gap", "close"]) {
    client.addEventListener(name, (event) => events.push([name, event.detail]));
  }
  return { client, sockets: WebSocket.instances, events };
}

// -- the offer ---------------------------------------------------------------------------------

test("client offers session, then session.<token>.<direct>.<stamp>, after tether and its token", (t) => {
  const { sockets, tick } = setup(t, { token: "abc" });
  assert.deepEqual(sockets[0].protocols, ["tether", "token.abc", "session"]);
  sockets[0].open(session());
  sockets[0].receive({ type: "note", data: 1, seq: 1 });
  sockets[0].receive({ type: "note", data: 2, seq: 2 });
  sockets[0].drop(1006);
  tick(250);
  assert.deepEqual(sockets[1].protocols, ["tether", "token.abc", `session.tok.2.${Date.now()}`], "stamped with the clock (ms)");
  const first = Date.now();
  sockets[1].drop(1006);
  tick(5000);
  const [, , offer] = sockets[2].protocols;
  const stamp = Number(offer.split(".")[3]);
  assert.ok(offer.startsWith("session.tok.2.") && stamp > first && stamp <= Date.now(), offer);
});

test("client with resume: false offers no session and numbers nothing", (t) => {
  const { client, sockets } = setup(t, { resume: false });
  assert.deepEqual(sockets[0].protocols, []);
  sockets[0].open(session());
  client.send("chat", 1);
  assert.deepEqual(sockets[0].sent, [{ type: "chat", data: 1 }]);
});

// -- the welcome -------------------------------------------------------------------------------

test("client opens at the welcome: sends wait for it, messages before it are handled after it", (t) => {
  const { client, sockets, events } = setup(t);
  const got = [];
  client.on("note", (data, room) => got.push([data, room]));
  sockets[0].open(null);
  assert.equal(client.state, "connecting");
  client.send("chat", 1);
  assert.deepEqual(sockets[0].sent, []);
  // A join in the server's on_connect: its position, then broadcasts, all before the welcome.
  sockets[0].receive(joined("lobby", "e1", 3, 1));
  sockets[0].receive({ type: "note", room: "lobby", data: "seen", off: 3 });
  sockets[0].receive({ type: "note", room: "lobby", data: "new", off: 4 });
  assert.deepEqual(got, []);
  assert.deepEqual(only(events, "open"), []);
  sockets[0].receive(session());
  assert.equal(client.state, "open");
  assert.deepEqual(got, [["new", "lobby"]]);
  assert.deepEqual(sockets[0].sent, [{ type: "chat", data: 1, seq: 1 }]);
  sockets[0].receive({ type: "note", data: "direct", seq: 2 });
  assert.deepEqual(got.at(-1), ["direct", null]);
});

test("client numbers what it writes in a session and acks the server's: piggy-backed, else alone after ackDelay", (t) => {
  const { client, sockets, tick } = setup(t, { ackDelay: 500 });
  sockets[0].open(session());
  sockets[0].receive({ type: "note", data: 1, seq: 1 });
  tick(499);
  client.send("chat", "a");
  assert.deepEqual(sockets[0].sent, [{ type: "chat", data: "a", seq: 1, ack: 1 }]);
  tick(1);
  assert.equal(sockets[0].sent.length, 1); // the ack rode along: none on its own
  sockets[0].receive({ type: "note", data: 2, seq: 2 });
  sockets[0].receive({ type: "note", data: 3, seq: 3 });
  tick(499);
  assert.equal(sockets[0].sent.length, 1);
  tick(1);
  assert.deepEqual(sockets[0].sent.at(-1), { type: "ack", ack: 3 });
  tick(10_000);
  assert.equal(sockets[0].sent.length, 2);
});

test("client drops a direct message it received already (a replay after a resume)", (t) => {
  const { client, sockets, tick } = setup(t);
  const got = [];
  client.on("note", (data) => got.push(data));
  sockets[0].open(session());
  sockets[0].receive({ type: "note", data: 1, seq: 1 });
  sockets[0].receive({ type: "note", data: 2, seq: 2 });
  sockets[0].drop(1006);
  tick(250);
  sockets[1].open(session({ resumed: true }));
  for (const seq of [1, 2, 3]) sockets[1].receive({ type: "note", data: seq, seq });
  assert.deepEqual(got, [1, 2, 3]);
});

test("client resumes: the resume message with its rooms first, then the unacked tail, then the outbox; a request in flight gets one reply", async (t) => {
  const { client, sockets, events, tick } = setup(t);
  sockets[0].open(session());
  sockets[0].receive(joined("lobby", "e1", 0, 1));
  sockets[0].receive({ type: "said", room: "lobby", data: "x", off: 1 });
  const reply = client.request("add", { a: 1 });
  client.send("chat", "m1");
  client.send("chat", "m2");
  assert.deepEqual(sockets[0].sent.map((m) => [m.seq, m.ack]), [[1, 1], [2, undefined], [3, undefined]]);
  sockets[0].receive({ type: "ack", ack: 1 }); // the server accepted the request only
  sockets[0].drop(1006);
  assert.equal(await settled(reply), false, "with a session a drop loses nothing yet");
  client.send("chat", "m3");
  tick(250);
  assert.deepEqual(sockets[1].protocols, ["tether", `session.tok.1.${Date.now()}`]);
  sockets[1].open(session({ resumed: true, ack: 2 }));
  assert.deepEqual(sockets[1].sent, [
    { type: "resume", data: { rooms: { lobby: { epoch: "e1", offset: 1 } } } },
    { type: "chat", data: "m2", seq: 3 },
    { type: "chat", data: "m3", seq: 4 },
  ]);
  sockets[1].receive({ type: "reply", id: 1, data: 2, seq: 2, ack: 4 }); // the server's replay
  sockets[1].receive({ type: "reply", id: 1, data: 99, seq: 2 }); // and again: a duplicate
  assert.equal(await reply, 2);
  assert.deepEqual(only(events, "resumed", "open", "reconnected").slice(-3), [
    ["resumed", { resumed: true, lostMessages: 0 }], ["open", null], ["reconnected", null],
  ]);
  assert.deepEqual(only(events, "error", "gap"), []);
});

test("client after a failed resume: written requests fail with ConnectionLost, rooms get a session gap, queued ones go out in the new session", async (t) => {
  const { client, sockets, events, tick } = setup(t);
  sockets[0].open(session());
  sockets[0].receive(joined("lobby", "e1", 0, 1));
  const slow = client.request("slow");
  sockets[0].receive({ type: "ack", ack: 1 }); // accepted; its handler is still running
  const unacked = client.request("add", 1);
  client.send("chat", "m");
  sockets[0].drop(1006);
  const queued = client.request("add", 2);
  tick(250);
  assert.equal(await settled(slow), false);
  sockets[1].open(session({ id: "s2", token: "tok2" })); // the window passed: a new session
  await assert.rejects(slow, named("ConnectionLost"));
  await assert.rejects(unacked, named("ConnectionLost"));
  assert.deepEqual(only(events, "gap", "resumed", "open", "reconnected").slice(-4), [
    ["gap", { room: "lobby", first: 0, last: 0, reason: "session" }],
    ["resumed", { resumed: false, lostMessages: 1 }],
    ["open", null],
    ["reconnected", null],
  ]);
  assert.deepEqual(sockets[1].sent, [{ type: "add", data: 2, id: 3, seq: 1 }]);
  sockets[1].receive({ type: "reply", id: 3, data: 2, seq: 1 });
  assert.equal(await queued, 2);
});

test("client gap events name the room (null: the direct stream), range and reason; the room's cursor moves past it", (t) => {
  const { client, sockets, events } = setup(t);
  const got = [];
  client.on("said", (data) => got.push(data));
  sockets[0].open(session());
  sockets[0].receive(joined("lobby", "e1", 0, 1));
  sockets[0].receive({ type: "gap", room: "lobby", data: { first: 1, last: 5, reason: "trimmed", epoch: "e1" }, seq: 2 });
  sockets[0].receive({ type: "gap", data: { first: 3, last: 4, reason: "trimmed", epoch: null }, seq: 3 });
  for (const off of [5, 6]) sockets[0].receive({ type: "said", room: "lobby", data: off, off });
  assert.deepEqual(only(events, "gap"), [
    ["gap", { room: "lobby", first: 1, last: 5, reason: "trimmed" }],
    ["gap", { room: null, first: 3, last: 4, reason: "trimmed" }],
  ]);
  assert.deepEqual(got, [6]);
});

test("client dedupes room messages by offset and passes the room to handlers", (t) => {
  const { client, sockets, tick } = setup(t);
  const got = [];
  client.on("said", (data, room) => got.push([room, data]));
  sockets[0].open(session());
  sockets[0].receive(joined("a", "e1", 0, 1));
  sockets[0].receive({ type: "said", room: "a", data: 1, off: 1 });
  sockets[0].drop(1006);
  tick(250);
  sockets[1].open(session({ resumed: true }));
  assert.deepEqual(sockets[1].sent[0], { type: "resume", data: { rooms: { a: { epoch: "e1", offset: 1 } } } });
  for (const off of [1, 2, 2, 3]) sockets[1].receive({ type: "said", room: "a", data: off, off }); // replay + live overlap
  sockets[1].receive({ type: "said", room: "b", data: "raw" }); // a room it has no position in: as it is
  assert.deepEqual(got, [["a", 1], ["a", 2], ["a", 3], ["b", "raw"]]);
  sockets[1].receive({ type: "left", room: "a", seq: 2 });
  sockets[1].drop(1006);
  tick(500);
  sockets[2].open(session({ resumed: true }));
  assert.deepEqual(sockets[2].sent[0], { type: "resume", data: { rooms: {} } });
});

test("client taken over (4009): written requests fail at once and the next connection asks for a new session", async (t) => {
  const { client, sockets, events, tick } = setup(t);
  sockets[0].open(session());
  const written = client.request("add", 1);
  sockets[0].drop(4009, "session resumed elsewhere");
  await assert.rejects(written, named("ConnectionLost"));
  assert.deepEqual(events.at(-1), ["reconnecting", { attempt: 1, delay: 250 }]);
  tick(250);
  assert.deepEqual(sockets[1].protocols, ["tether", "session"]);
});

test("client keeps a welcome on a closing socket from opening it", (t) => {
  const { client, sockets } = setup(t);
  sockets[0].open(null);
  client.send("chat", 1);
  sockets[0].readyState = 2; // the server's close frame came with the welcome
  sockets[0].receive(session());
  assert.equal(client.state, "connecting");
  assert.deepEqual(sockets[0].sent, []);
});

test("client closed by a resumed listener stays closed", (t) => {
  const { client, sockets, tick } = setup(t);
  client.addEventListener("resumed", () => client.close());
  sockets[0].open(session());
  sockets[0].drop(1006);
  tick(250);
  sockets[1].open(session({ resumed: true }));
  assert.equal(client.state, "closed");
  tick(60_000);
  assert.equal(sockets.length, 2);
});

test("client request with data JSON cannot encode throws and leaves nothing behind", async (t) => {
  const { client, sockets } = setup(t);
  sockets[0].open(session());
  await assert.rejects(client.request("add", { n: 1n }), TypeError);
  assert.throws(() => client.send("chat", { n: 1n }), TypeError);
  client.send("chat", 1);
  assert.deepEqual(sockets[0].sent, [{ type: "chat", data: 1, seq: 1 }]); // no seq was used up
});

// -- persist -------------------------------------------------------------------------------------

test("client persist: a reloaded page resumes the session, resends what was unacked, and numbers on", async (t) => {
  const page = fakeDocument(t);
  const storage = new MemoryStorage();
  const { client, sockets } = setup(t, { persist: storage });
  sockets[0].open(session());
  assert.equal(storage.saved().token, "tok", "saved at the welcome");
  sockets[0].receive(joined("lobby", "e1", 0, 1));
  sockets[0].receive({ type: "said", room: "lobby", data: "x", off: 1 });
  client.send("chat", "m1");
  client.request("add", 1).catch(() => {});
  sockets[0].receive({ type: "ack", ack: 1 });
  page.hide(); // the page goes away (a reload)
  assert.deepEqual(storage.saved(), {
    token: "tok", sessionId: "s1", seq: 2, direct: 1, stamp: 0, rooms: { lobby: { epoch: "e1", offset: 1 } }, nextId: 2,
    unacked: [[2, '{"type":"add","data":1,"id":1,"seq":2}']], dropped: 0,
  });

  const next = reload(storage);
  t.after(() => next.client.close());
  assert.deepEqual(next.sockets[0].protocols, ["tether", `session.tok.1.${Date.now()}`]);
  next.sockets[0].open(session({ resumed: true, ack: 1 }));
  assert.deepEqual(next.sockets[0].sent, [
    { type: "resume", data: { rooms: { lobby: { epoch: "e1", offset: 1 } } } },
    { type: "add", data: 1, id: 1, seq: 2 },
  ]);
  assert.deepEqual(next.events, [["resumed", { resumed: true, lostMessages: 0 }], ["open", null]]);
  const reply = next.client.request("add", 2);
  next.client.send("chat", "m2");
  assert.deepEqual(next.sockets[0].sent.slice(2), [{ type: "add", data: 2, id: 2, seq: 3 }, { type: "chat", data: "m2", seq: 4 }]);
  next.sockets[0].receive({ type: "reply", id: 1, data: "for the old page", seq: 2 }); // nobody waits for it
  next.sockets[0].receive({ type: "reply", id: 2, data: 3, seq: 3 });
  assert.equal(await reply, 3);
});

test("client persist: a stored session the server no longer has counts its messages as lost", (t) => {
  const page = fakeDocument(t);
  const storage = new MemoryStorage();
  const { client, sockets } = setup(t, { persist: storage });
  sockets[0].open(session());
  client.send("chat", "m1");
  client.send("chat", "m2");
  page.hide();
  const next = reload(storage);
  t.after(() => next.client.close());
  next.sockets[0].open(session({ id: "s2", token: "tok2" }));
  assert.deepEqual(next.events, [["resumed", { resumed: false, lostMessages: 2 }], ["open", null]]);
  assert.equal(storage.saved().token, "tok2");
});

test("client persist keeps at most outboxSize unacked messages; the older ones count as lost", (t) => {
  const page = fakeDocument(t);
  const storage = new MemoryStorage();
  const { client, sockets } = setup(t, { persist: storage, outboxSize: 2 });
  sockets[0].open(session());
  for (const n of [1, 2, 3]) client.send("chat", n);
  page.hide();
  assert.deepEqual(storage.saved().unacked.map(([seq]) => seq), [2, 3]);
  const next = reload(storage, { outboxSize: 2 });
  t.after(() => next.client.close());
  next.sockets[0].open(session({ resumed: true }));
  assert.deepEqual(next.sockets[0].sent.slice(1).map((m) => m.data), [2, 3]);
  assert.deepEqual(next.events[0], ["resumed", { resumed: true, lostMessages: 1 }]);
});

test("client persist into a full storage keeps the session without its messages", (t) => {
  const page = fakeDocument(t);
  const storage = new MemoryStorage(300);
  const { client, sockets } = setup(t, { persist: storage });
  sockets[0].open(session());
  client.send("chat", "x".repeat(400));
  page.hide();
  assert.deepEqual([storage.saved().token, storage.saved().unacked, storage.saved().dropped], ["tok", [], 1]);
});

test("client persist forgets the session on close() and when another tab took it over (4009)", (t) => {
  const storage = new MemoryStorage();
  const { client, sockets, tick } = setup(t, { persist: storage });
  sockets[0].open(session());
  assert.notEqual(storage.saved(), null);
  sockets[0].drop(4009, "session resumed elsewhere");
  assert.equal(storage.saved(), null, "a reload must not take the session back");
  tick(250);
  sockets[1].open(session({ id: "s2", token: "tok2" }));
  assert.equal(storage.saved().token, "tok2");
  client.close();
  assert.equal(storage.saved(), null);
});

test("client persist ignores (and removes) what it cannot restore; persistKey names the item", (t) => {
  const storage = new MemoryStorage();
  storage.setItem("mine", JSON.stringify({ token: 5 }));
  const { sockets } = setup(t, { persist: storage, persistKey: "mine" });
  assert.deepEqual(sockets[0].protocols, ["tether", "session"]);
  assert.equal(storage.getItem("mine"), null);
  sockets[0].open(session());
  assert.equal(storage.saved("mine").token, "tok");
});

test("client persist option: sessionStorage when there is one, else none; anything else is refused", (t) => {
  const { sockets } = setup(t, { persist: "sessionStorage" }); // node has no sessionStorage: nothing kept
  sockets[0].open(session());
  assert.throws(() => connect(URL_, { persist: {}, WebSocket: fakeWebSocketClass() }), TypeError);
  const storage = new MemoryStorage();
  globalThis.sessionStorage = storage;
  t.after(() => { delete globalThis.sessionStorage; });
  const next = reload("sessionStorage");
  t.after(() => next.client.close());
  next.sockets[0].open(session());
  assert.equal(storage.saved().token, "tok");
});

test("client hands joined/left about no room and a gap without data to the app's handlers, as tether.Client does", (t) => {
  const { client, sockets, events } = setup(t);
  const got = [];
  for (const type of ["joined", "left", "gap"]) client.on(type, (data, room) => got.push([type, data, room]));
  sockets[0].open(session());
  sockets[0].receive({ type: "joined", data: { name: "ann" }, seq: 1 }); // examples/chat's push
  sockets[0].receive({ type: "left", data: "bob", seq: 2 });
  sockets[0].receive({ type: "gap", data: "g", seq: 3 });
  sockets[0].receive(joined("lobby", "e1", 4, 4)); // the framework's
  sockets[0].receive({ type: "left", room: "lobby", seq: 5 });
  assert.deepEqual(got, [["joined", { name: "ann" }, null], ["left", "bob", null], ["gap", "g", null]]);
  assert.deepEqual(only(events, "gap"), []);
});
