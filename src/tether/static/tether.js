/**
 * tether browser client: one ES module, no dependencies, no build step.
 *
 *     import { connect } from "/tether.js";
 *     const client = connect("wss://example.com/ws", { params: () => ({ token }) });
 *     client.on("chat", (data) => render(data));
 *     client.send("chat", { text: "hi" });
 *     const sum = await client.request("add", { a: 1, b: 2 });
 *
 * Wire protocol: docs/protocol.md. The reconnect schedule, the heartbeat decisions and
 * the session core (outbox, pending requests, reconnect decisions, and the session's
 * streams: seq, acks, room offsets) are line-by-line ports of tether/proto/backoff.py,
 * tether/proto/keepalive.py and tether/proto/session.py, checked against the same vectors
 * (tests/vectors/*.json). Like there, times in those functions are seconds, and so are the
 * options passed on to them (backoff, maxRetryAfter); the client's own times
 * (requestTimeout, ackDelay, event delays, latency) are ms.
 *
 * Sessions (option `resume`, on by default; docs/clients.md): what is sent and received
 * survives a reconnect in both directions, and with `persist` a page reload too.
 *
 * @module tether
 */

// ---- Reconnect schedule: port of tether/proto/backoff.py ----------------------

/** Close codes after which reconnecting cannot help: rate limited, auth rejected, forbidden. */
const NO_RECONNECT_CODES = new Set([1008, 4001, 4003]);
const SECONDS = /^[0-9]+(?:\.[0-9]+)?$/;
/**
 * The subprotocol a tether server selects; offered with `token.<token>` when a token is set
 * and with `session` / `session.<token>.<direct>.<stamp>` (the session offer) with `resume`.
 */
const SUBPROTOCOL = "tether";

/**
 * Delay in seconds before retry number `attempt` (0 = first retry), "full jitter":
 * `rand * min(cap, base * factor ** attempt)`, `rand` uniform in [0, 1).
 * @throws {RangeError} on attempt < 0, rand outside [0, 1), base <= 0, factor < 1 or cap <= 0.
 */
export function backoffDelay(attempt, rand, { base = 0.5, factor = 2, cap = 30 } = {}) {
  if (!(attempt >= 0)) throw new RangeError(`attempt must be >= 0, got ${attempt}`);
  if (!(rand >= 0 && rand < 1)) throw new RangeError(`rand must be in [0, 1), got ${rand}`);
  if (!(base > 0 && factor >= 1 && cap > 0)) throw new RangeError("need base > 0, factor >= 1 and cap > 0");
  return rand * ceiling(attempt, base, factor, cap);
}

function ceiling(attempt, base, factor, cap) {
  // Past the exponent where base * factor**x == cap the result is cap anyway
  // (and Python's float pow would overflow).
  if (factor > 1 && attempt > Math.log(cap / base) / Math.log(factor)) return cap;
  return Math.min(cap, base * factor ** attempt);
}

/**
 * Whether to reconnect after a close with `code` (null: lost without a close frame).
 * Never after a `deliberate` client close, nor after 1008, 4001 or 4003.
 */
export function shouldReconnect(code, deliberate) {
  if (deliberate) return false;
  return !NO_RECONNECT_CODES.has(code);
}

/** Seconds from a 1001 reason such as `"going away; retry_after=5"`, else null. */
export function retryAfter(code, reason) {
  if (code !== 1001) return null;
  for (const item of String(reason).split(";")) {
    const text = item.trim();
    const eq = text.indexOf("=");
    if (eq >= 0 && text.slice(0, eq) === "retry_after" && SECONDS.test(text.slice(eq + 1))) {
      return Number(text.slice(eq + 1));
    }
  }
  return null;
}

/** Attempt counter for {@link backoffDelay}; resets only after a connection stayed up `stableAfter` s. */
export class Backoff {
  #connectedAt = null;

  constructor({ base = 0.5, factor = 2, cap = 30, stableAfter = 10 } = {}) {
    Object.assign(this, { base, factor, cap, stableAfter, attempt: 0 });
  }

  /** Delay in seconds before the next retry; counts the attempt. */
  nextDelay(rand) {
    const delay = backoffDelay(this.attempt, rand, this);
    this.attempt += 1;
    this.#connectedAt = null; // retrying: whatever connection we had is gone
    return delay;
  }

  /** Record that a connection opened at `now` (seconds). */
  connected(now) {
    this.#connectedAt = now;
  }

  /** Reset the counter if connected for `stableAfter` seconds; returns whether it did. */
  maybeReset(now) {
    if (this.#connectedAt === null || now - this.#connectedAt < this.stableAfter) return false;
    this.attempt = 0;
    return true;
  }
}

// ---- Heartbeat decisions: port of tether/proto/keepalive.py -------------------

/**
 * Decide from a check timer running every `interval` seconds whether the server is alive:
 * "ok" if something arrived within interval + timeout (or heartbeats are off);
 * "probe" if not, but this check ran late (suspended/throttled tab): send a heartbeat and
 * give the server a fresh timeout window; "dead" otherwise.
 * @returns {"ok" | "probe" | "dead"}
 */
export function liveness(now, lastReceived, lastCheck, interval, timeout, { lateSlack = 1 } = {}) {
  if (interval == null || timeout == null) return "ok";
  if (now - lastReceived <= interval + timeout) return "ok";
  if (now - lastCheck > interval + lateSlack) return "probe";
  return "dead";
}

/** Whether nothing was sent for `interval` seconds (null: heartbeats off). */
export function heartbeatDue(now, lastSent, interval) {
  if (interval == null) return false;
  return now - lastSent >= interval;
}

// ---- Session core: port of tether/proto/session.py ---------------------------

/** Handshake refusals that retrying cannot fix: 401 (unauthorized), 403 (forbidden, origin). */
const REFUSED_STATUSES = new Set([401, 403]);
/**
 * The server closed this connection because the session was resumed on another one (a copy
 * of the client holding the same token, e.g. a duplicated tab): reconnect with a new session.
 */
export const SESSION_TAKEN = 4009;

/**
 * Client side of one room's stream (port of tether/proto/resume.py RoomCursor): the epoch and
 * the offset received so far. Offsets a client never sees are normal (a broadcast that
 * excluded it); the server reports real losses itself (a "gap"), so the cursor only moves
 * forward and drops what it has seen.
 */
export class RoomCursor {
  constructor(epoch, offset) {
    this.epoch = epoch;
    this.offset = offset;
  }

  /** A room message with `off`: true to deliver it, false if it was seen already. */
  receive(offset) {
    if (offset == null) return true;
    if (offset <= this.offset) return false;
    this.offset = offset;
    return true;
  }
}

/**
 * A reconnecting client's bookkeeping, with no I/O: the outbox, pending requests, reconnects.
 * {@link TetherClient} drives it (the Python `tether.Client` drives the same rules). It decides:
 * - sending: while open a message is written at once; otherwise it waits in a bounded outbox,
 *   oldest dropped first when full (the driver fails a dropped request with "OutboxOverflow");
 * - requests: ids, which wait for a reply, which of them were written to the current socket
 *   (those are lost when it drops: their replies can never come);
 * - reconnecting: whether to retry and after how long: never after close(), a refused
 *   handshake (status 401/403, which only a non-browser driver can see) or close code 1008,
 *   4001, 4003; full-jitter backoff plus a 1001 retry_after capped at `maxRetryAfter` seconds.
 *
 * With `resume: true` (sessions, docs/protocol.md "Sessions and resume") it also keeps the
 * client's side of both streams:
 * - to the server: each message written gets the next `seq` (spliced into its JSON with the
 *   direct `ack` owed) and is kept until the server acks it; after a resume only the unacked
 *   tail is written again, in order; after a failed resume (`resumed: false`, or a welcome
 *   with no session) the requests written in the old session, acked or not, are lost and
 *   the count of unacked one-way ones is reported; a resumed welcome's `ack` beyond our `seq`
 *   (a restored copy of the client) moves `seq` past it;
 * - from the server: the last direct `seq` received (duplicates after a resume are dropped)
 *   and the ack owed for it; per room the `(epoch, offset)` received.
 * Times are seconds, `rand` uniform in [0, 1): both passed in. Payloads are opaque strings,
 * except that with `resume: true` a payload is a JSON object (its last character is "}").
 */
export class Session {
  #nextId = 1;

  /** @throws {RangeError} if `outboxSize` is not an integer >= 0. */
  constructor({ outboxSize = 100, backoff = null, maxRetryAfter = 60, resume = false } = {}) {
    if (!(Number.isInteger(outboxSize) && outboxSize >= 0)) throw new RangeError("outboxSize must be an integer >= 0");
    this.resume = resume; // whether the client keeps a session (numbers its messages, resumes)
    this.token = null; // the session's private token (offer `session.<token>.<direct>.<stamp>`) ...
    this.sessionId = null; // ... and its id
    this.seq = 0; // the last seq given to a message written to the server
    this.unacked = []; // [seq, payload, id] written and not acked by the server yet, oldest first
    this.direct = 0; // the last direct seq received from the server ...
    this.directAcked = 0; // ... and the last one acked to it
    this.rooms = new Map(); // rooms the server put the session in -> RoomCursor
    this.stamp = 0; // the stamp of the last resume offered: grows with every attempt (offer)
    /** @type {"connecting" | "open" | "reconnecting" | "closed"} */
    this.state = "connecting";
    this.outbox = []; // [payload, id] waiting for a connection, oldest first; id null for one-way
    this.outboxSize = outboxSize;
    this.pending = new Set(); // request ids waiting for their reply
    // Of those, the ids written to the current connection (with a session: to any connection
    // of the current session, since a resume may still answer them).
    this.written = new Set();
    this.backoff = backoff ?? new Backoff();
    this.maxRetryAfter = maxRetryAfter;
    this.opened = 0; // connections opened so far (the first is not a reconnect)
  }

  // -- sending

  /** A new request id, now pending. */
  requestId() {
    const id = this.#nextId;
    this.#nextId += 1;
    this.pending.add(id);
    return id;
  }

  /**
   * Route one outgoing message: `[writeNow, dropped]`. `writeNow` true: the driver writes it
   * (the payload wrote() returns); false: it waits in the outbox, and `dropped` is the oldest
   * entry pushed out to make room, or null.
   * @throws {RangeError} once closed (the driver throws "ClientClosed" before asking).
   */
  send(payload, id = null) {
    if (this.state === "closed") throw new RangeError("session is closed");
    if (this.state === "open") return [true, null];
    return [false, this.queue(payload, id)];
  }

  /** Put a message in the outbox (also when writing it failed); returns the entry dropped, or null. */
  queue(payload, id = null) {
    this.outbox.push([payload, id]);
    if (this.outbox.length > this.outboxSize) {
      const dropped = this.outbox.shift();
      if (dropped[1] !== null) this.pending.delete(dropped[1]);
      return dropped;
    }
    return null;
  }

  /**
   * A message goes out on the current connection: returns the payload to write. In a session
   * the payload gets the next `seq` (and the direct `ack` owed, if any) and is kept until acked.
   */
  wrote(id, payload = null) {
    if (id !== null && this.pending.has(id)) this.written.add(id);
    if (this.token === null || payload === null) return payload; // no session (yet, or the server keeps none)
    this.seq += 1;
    const ack = this.ackDue();
    payload = `${payload.slice(0, -1)},"seq":${this.seq}${ack === null ? "" : `,"ack":${ack}`}}`;
    this.unacked.push([this.seq, payload, id]);
    return payload;
  }

  // -- the streams (resume)

  /** The server accepted every message up to `seq`: forget them. */
  acked(seq) {
    if (seq == null) return;
    let n = 0;
    while (n < this.unacked.length && this.unacked[n][0] <= seq) n += 1;
    if (n > 0) this.unacked.splice(0, n);
  }

  /** A direct message from the server: false if it is a duplicate (drop it). */
  received(seq) {
    if (seq == null) return true;
    if (seq <= this.direct) return false;
    this.direct = seq;
    return true;
  }

  /** The direct ack to send now (piggy-backed, or on its own), or null if none is owed. */
  ackDue() {
    if (this.direct === this.directAcked) return null;
    this.directAcked = this.direct;
    return this.direct;
  }

  /** The server put the session in `room` at `(epoch, offset)`. */
  joined(room, epoch, offset) {
    const cursor = this.rooms.get(room);
    if (cursor === undefined || cursor.epoch !== epoch || cursor.offset < offset) this.rooms.set(room, new RoomCursor(epoch, offset));
  }

  left(room) {
    this.rooms.delete(room);
  }

  /** A room message: true to deliver it, false if it was received already (a replay overlapping live traffic). */
  roomMessage(room, offset) {
    const cursor = this.rooms.get(room);
    return cursor === undefined ? true : cursor.receive(offset);
  }

  /**
   * The server says offsets up to `last` (of `epoch`) will never come: move on. In a new
   * epoch the offsets start again: the cursor goes to `last`, even backwards.
   */
  roomGap(room, last, epoch) {
    const cursor = this.rooms.get(room);
    if (cursor !== undefined) {
      cursor.offset = cursor.epoch === epoch ? Math.max(cursor.offset, last) : last;
      cursor.epoch = epoch;
    }
  }

  /** The `data.rooms` of a "resume" message: what of each room was received. */
  positions() {
    const rooms = {};
    for (const [room, cursor] of this.rooms) rooms[room] = { epoch: cursor.epoch, offset: cursor.offset };
    return rooms;
  }

  /**
   * The subprotocol entry to offer: "session" (start one), `session.<token>.<direct>.<stamp>`
   * (resume it), or null without `resume`. `stamp` orders this client's attempts for the
   * server (an older attempt that reaches a process late never takes the session back from a
   * newer one): `clock` (the driver passes Date.now(), so a page restored after a reload comes
   * after the one it replaces) or one more than the last stamp, whichever is greater.
   */
  offer(clock = 0) {
    if (!this.resume) return null;
    if (this.token === null) return "session";
    this.stamp = Math.max(clock, this.stamp + 1);
    return `session.${this.token}.${this.direct}.${this.stamp}`;
  }

  /**
   * The welcome's `session` (null: the server keeps no sessions for us, so a session we had
   * is gone as if it had expired): `{resumed, resend, lost, lostMessages, roomsLost}`.
   * `resumed`: write a "resume" message with positions() first, then `resend` (the unacked
   * payloads, in order). Otherwise `lost` request ids fail, `lostMessages` one-way messages
   * may not have arrived, and the session is out of the rooms `roomsLost`.
   */
  welcomed(info) {
    if (!this.resume) return welcome(false, [], [], 0, []);
    info = info !== null && typeof info === "object" && !Array.isArray(info) ? info : {};
    const had = this.token !== null;
    const resumed = Boolean(info.resumed) && had;
    this.token = info.token ?? null;
    this.sessionId = info.id ?? null;
    if (resumed) {
      const ack = info.ack ?? null;
      this.acked(ack);
      if (Number.isInteger(ack) && ack > this.seq) this.seq = ack; // a restored copy of the client: never reuse a seq
      return welcome(true, this.unacked.map(([, payload]) => payload), [], 0, []);
    }
    // A new session: what the old one had in flight is gone with it, acked or not. (Messages
    // the server sent before its welcome are the new session's: the driver handles them only now.)
    const lost = [...this.written].filter((id) => this.pending.has(id)).sort((a, b) => a - b);
    const messages = this.unacked.filter(([, , id]) => id === null).length;
    for (const id of lost) this.pending.delete(id);
    this.written.clear();
    const rooms = [...this.rooms.keys()].sort();
    this.unacked = [];
    this.rooms.clear();
    this.seq = this.direct = this.directAcked = 0;
    return welcome(false, [], lost, messages, rooms);
  }

  /** A reply or error for `id` arrived: true if it answers a pending request. */
  settle(id) {
    if (!Number.isInteger(id) || !this.pending.has(id)) return false;
    this.pending.delete(id);
    this.written.delete(id);
    return true;
  }

  /** Give up on request `id` (it timed out): never send it late. */
  forget(id) {
    this.pending.delete(id);
    this.written.delete(id);
    if (this.outbox.some((entry) => entry[1] === id)) this.outbox = this.outbox.filter((entry) => entry[1] !== id);
  }

  // -- the connection's life

  /** A connection opened: returns the outbox to write now, in order (it is emptied). */
  connected(now) {
    this.state = "open";
    this.opened += 1;
    this.backoff.connected(now);
    const flush = this.outbox;
    this.outbox = [];
    for (const [, id] of flush) this.wrote(id);
    return flush;
  }

  /**
   * The connection ended (or could not open): `[lost, retry]`. `lost` are the requests written
   * to it, no longer pending (with a session they stay pending: the resume decides, unless this
   * close is final); `retry` is `{delay, notBefore}` in seconds, or null when the session is
   * now closed for good. `code` is null without a close frame; `status` the HTTP status of a
   * refused handshake (browsers cannot see it: tether.js passes none).
   */
  ended(code, reason, now, rand, { status = null } = {}) {
    if (code === SESSION_TAKEN) this.token = null; // another connection holds our session: start a new one
    const final = this.state === "closed" || REFUSED_STATUSES.has(status) || !shouldReconnect(code, false);
    const keep = this.token !== null && !final; // a resume may still answer them
    const lost = keep ? [] : [...this.written].sort((a, b) => a - b);
    for (const id of lost) this.pending.delete(id);
    if (!keep) this.written.clear();
    if (this.state === "closed") return [lost, null];
    if (final) {
      this.state = "closed";
      return [lost, null];
    }
    this.backoff.maybeReset(now);
    const notBefore = Math.min(retryAfter(code, reason) ?? 0, this.maxRetryAfter);
    this.state = "reconnecting";
    return [lost, Object.freeze({ delay: notBefore + this.backoff.nextDelay(rand), notBefore })];
  }

  /** Closed for good by the user: returns the requests still pending (all fail). */
  close() {
    this.state = "closed";
    this.outbox = [];
    const ids = [...this.pending].sort((a, b) => a - b);
    this.pending.clear();
    this.written.clear();
    return ids;
  }

  // -- JS only: keeping a session across page loads (TetherClient's `persist` option)

  /**
   * What a reloaded page needs to resume this session, as plain JSON-able data, or null
   * without one: the token, `seq`, `direct`, the room positions, the next request id and the
   * newest unacked payloads (at most `maxMessages` of them and `maxBytes` characters in all;
   * `dropped` counts the older ones left out).
   */
  snapshot({ maxMessages = Infinity, maxBytes = Infinity } = {}) {
    if (this.token === null) return null;
    const unacked = [];
    let size = 0;
    for (let i = this.unacked.length - 1; i >= 0 && unacked.length < maxMessages; i--) {
      const [seq, payload] = this.unacked[i];
      if (size + payload.length > maxBytes) break;
      size += payload.length;
      unacked.unshift([seq, payload]);
    }
    return {
      token: this.token, sessionId: this.sessionId, seq: this.seq, direct: this.direct, stamp: this.stamp,
      rooms: this.positions(), nextId: this.#nextId, unacked, dropped: this.unacked.length - unacked.length,
    };
  }

  /**
   * Continue a session from a {@link snapshot} (before the first connection). Its unacked
   * messages come back as one-way ones (the page that sent a request is gone: nobody waits for
   * its reply). @throws {TypeError} if `saved` does not look like a snapshot.
   */
  restore(saved) {
    const { token, sessionId = null, seq, direct, stamp = 0, rooms, nextId, unacked } = saved ?? {};
    const count = (n) => Number.isInteger(n) && n >= 0;
    const valid = typeof token === "string" && count(seq) && count(direct) && count(nextId) && Array.isArray(unacked)
      && unacked.every((e) => Array.isArray(e) && count(e[0]) && typeof e[1] === "string")
      && rooms !== null && typeof rooms === "object"
      && Object.values(rooms).every((p) => p !== null && typeof p === "object" && count(p.offset));
    if (!valid) throw new TypeError("not a saved session");
    Object.assign(this, { token, sessionId, seq, direct, directAcked: direct, stamp: count(stamp) ? stamp : 0 });
    this.#nextId = Math.max(this.#nextId, nextId);
    this.unacked = unacked.map(([n, payload]) => [n, payload, null]);
    this.rooms = new Map(Object.entries(rooms).map(([room, p]) => [room, new RoomCursor(p.epoch ?? null, p.offset)]));
  }
}

function welcome(resumed, resend, lost, lostMessages, roomsLost) {
  return Object.freeze({ resumed, resend, lost, lostMessages, roomsLost });
}

// ---- Client --------------------------------------------------------------------

const OPEN = 1; // WebSocket.OPEN
/** emit(): how often a socket's `bufferedAmount` is looked at while waiting for it to drain (no event says so). */
const DRAIN_POLL_MS = 5;
const MAX_PROBES = 16; // outstanding latency probes remembered per connection
/** `persist`: at most this many characters of unacked messages are kept for a reload. */
const PERSIST_MAX_CHARS = 1 << 20;

/** An `error` reply from the server: `code` as in docs/protocol.md, `path` for invalid_data. */
export class ReplyError extends Error {
  constructor(code, message, path) {
    super(message);
    this.name = "ReplyError";
    this.code = code;
    this.path = path ?? null;
  }
}

function namedError(name, message) {
  const error = new Error(message);
  error.name = name;
  return error;
}

function reportError(error) {
  if (globalThis.reportError) globalThis.reportError(error);
  else queueMicrotask(() => { throw error; });
}

/** Whether a parsed message is an envelope (the fields tether.Client's decoder checks). */
function isEnvelope(message) {
  const integer = (value) => value == null || Number.isInteger(value);
  return message !== null && typeof message === "object" && typeof message.type === "string"
    && (message.room == null || typeof message.room === "string")
    && integer(message.off) && integer(message.seq) && integer(message.ack);
}

/** The Storage a `persist` option names, or null (none, or sessionStorage is blocked). */
function storageOf(persist) {
  if (persist == null || persist === false) return null;
  if (persist === "sessionStorage") {
    try {
      return globalThis.sessionStorage ?? null;
    } catch {
      return null; // blocked (sandboxed frame, privacy settings): no persistence, as without the option
    }
  }
  if (["getItem", "setItem", "removeItem"].every((name) => typeof persist[name] === "function")) return persist;
  throw new TypeError('persist must be "sessionStorage" or a Storage object');
}

/**
 * A reconnecting connection to a tether typed app. Create it with {@link connect}. Its
 * decisions (outbox, pending requests, when to reconnect, the session's streams) are a
 * {@link Session}'s; this class owns the socket, the timers, the promises and the storage.
 *
 * Events (all `CustomEvent`s, details in tether.d.ts): "open" when a connection's welcome
 * arrived (sending works), "reconnected" on every one after the first, "resumed" after each
 * reconnect with a session (`{resumed, lostMessages}`), "gap" for messages that will never
 * come (`{room, first, last, reason}`), "close" when a socket closes and once when the client
 * itself becomes closed (`detail.willReconnect` tells which), "reconnecting" when a retry is
 * scheduled, "error" for socket errors and error replies that match no request,
 * "outboxoverflow" when the outbox drops its oldest message.
 */
export class TetherClient extends EventTarget {
  #url; #params; #token; #WebSocket; #requestTimeout; #session; #ackDelay; #storage; #storageKey; #maxBufferedAmount;
  #ws = null;
  #waiters = []; // resolve functions of #changed() promises: the state or the outbox changed
  #early = null; // messages that came before the current socket's welcome (handled after it), or null
  #handlers = new Map(); // type -> Set of handlers
  #requests = new Map(); // request id -> { resolve, reject, timer }; the Session says which are pending
  #reconnectTimer = null;
  #ackTimer = null; // a standalone ack goes out when it fires, if no message carried it meanwhile
  #notBefore = 0; // ms timestamp before which a 1001 retry_after forbids reconnecting
  #heartbeat = { interval: null, timeout: null }; // seconds, from the welcome message
  #lastProbe = 0; // ms: when our last heartbeat went out
  #checkTimer = null;
  #lastReceived = 0;
  #lastCheck = 0;
  #probes = new Set(); // `t` of our own heartbeats not yet echoed
  #latency = null;
  #restored = null; // restored from storage: messages that did not fit there (until the first welcome)
  #listeners = []; // [target, name, listener] on the page, removed once closed

  /** @param {string | URL} url @param {import("./tether.d.ts").ConnectOptions} [options] */
  constructor(url, options = {}) {
    super();
    const {
      params = {}, token = null, outboxSize = 100, requestTimeout = 10000, backoff = {}, maxRetryAfter = 60,
      resume = true, ackDelay = 1000, persist = null, persistKey = null, maxBufferedAmount = 1 << 16,
    } = options;
    if (!(Number.isFinite(maxBufferedAmount) && maxBufferedAmount >= 0)) throw new RangeError("maxBufferedAmount must be a number >= 0");
    // seconds, like Python
    this.#session = new Session({ outboxSize, backoff: new Backoff(backoff), maxRetryAfter, resume: Boolean(resume) });
    this.#url = new URL(url, globalThis.location?.href); // throws now on a bad URL, not on every retry
    this.#params = typeof params === "function" ? params : () => params;
    this.#token = typeof token === "function" ? token : () => token;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#requestTimeout = requestTimeout;
    this.#ackDelay = ackDelay;
    this.#maxBufferedAmount = maxBufferedAmount;
    this.#storage = resume ? storageOf(persist) : null;
    this.#storageKey = persistKey ?? `tether.session ${this.#url.protocol}//${this.#url.host}${this.#url.pathname}`;
    if (this.#storage !== null) {
      this.#restore();
      this.#listenForUnload();
    }
    if (options.reconnectOnWake ?? true) this.#listenForWake();
    this.#open();
  }

  /** "connecting" (first connection) | "open" | "reconnecting" | "closed". */
  get state() { return this.#session.state; }

  /** Last measured heartbeat round trip in ms, or null. */
  get latency() { return this.#latency; }

  /**
   * Call `handler(data, room)` for every server message of `type` (`room`: the room a
   * broadcast went to, null for a message to this client only); returns an unsubscribe function.
   */
  on(type, handler) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    const handlers = this.#handlers.get(type);
    handlers.add(handler);
    return () => { handlers.delete(handler); };
  }

  /**
   * Send a one-way message. While not open it waits in the outbox (bounded by `outboxSize`,
   * flushed in order on reconnect; when full, the oldest is dropped and "outboxoverflow" fires).
   * With a session it is kept until the server acks it and resent after a resume.
   * @throws {Error} named "ClientClosed" after close() or a final close from the server.
   */
  send(type, data) {
    this.#checkNotClosed();
    this.#push({ type, data });
  }

  /**
   * Send a one-way message, waiting for room instead of dropping anything (as
   * `tether.Client.emit`): while not connected, until the outbox has a free place (a
   * reconnect empties it); once written, until the socket's `bufferedAmount` is at most
   * `maxBufferedAmount` again (the server, or the network, keeps up). Use it rather than
   * send() where nothing may be lost, e.g. a producer that could outrun the connection. With
   * `outboxSize` 0 there is never room while disconnected: the message is dropped, as by send().
   * Resolves once written (or queued with room to spare). With a session, a message written
   * to a socket that then drops is kept until acked and resent after the resume.
   * @returns {Promise<void>} rejects with an Error named "ClientClosed" once the client is closed.
   */
  emit(type, data) {
    try {
      // With room it goes now (written before emit returns, in order with send()); else later.
      if (this.#full() && this.state !== "closed") return this.#room().then(() => this.#emitNow(type, data));
      return this.#emitNow(type, data);
    } catch (error) {
      return Promise.reject(error);
    }
  }

  #emitNow(type, data) {
    this.#checkNotClosed();
    return this.#drained(this.#push({ type, data }));
  }

  /** Resolve once `ws` (the socket a message was written to, or null) has drained to `maxBufferedAmount`, or is gone. */
  async #drained(ws) {
    while (ws !== null && this.#ws === ws && ws.readyState === OPEN && (ws.bufferedAmount ?? 0) > this.#maxBufferedAmount) {
      await new Promise((resolve) => setTimeout(resolve, DRAIN_POLL_MS));
    }
  }

  /**
   * Send a request and resolve with the reply's data. Rejects with a {@link ReplyError} on an
   * error reply, an Error named "TimeoutError" after `timeout` ms (null: never), "ConnectionLost"
   * if the socket it was written to dropped (with a session: if the session could not be
   * resumed), "OutboxOverflow" if dropped from a full outbox, "ClientClosed" if the client
   * closed first. While not connected with a full outbox it waits for room (its timeout
   * runs meanwhile) instead of dropping the oldest message; with `outboxSize` 0 it is
   * dropped at once, as before.
   */
  request(type, data, { timeout = this.#requestTimeout } = {}) {
    return new Promise((resolve, reject) => {
      this.#checkNotClosed();
      const id = this.#session.requestId();
      const timer = timeout == null ? null : setTimeout(() => {
        this.#session.forget(id); // out of the outbox too: never sent late
        this.#reject([id], () => namedError("TimeoutError", `request "${type}" timed out after ${timeout} ms`));
        this.#notify(); // it may have left the outbox: room for one more
      }, timeout);
      this.#requests.set(id, { resolve, reject, timer });
      const push = () => {
        try {
          this.#push({ type, data, id });
        } catch (error) { // data that JSON cannot encode: this request never existed
          this.#session.forget(id);
          this.#takeRequest(id);
          reject(error);
        }
      };
      // While not connected a request waits for room in the outbox rather than push another
      // message out (it times out meanwhile, a close rejects it); with room, it goes at once.
      if (!this.#full()) return push();
      this.#room(() => this.#requests.has(id)).then(() => { if (this.#requests.has(id)) push(); });
    });
  }

  /** Reconnect now if a retry is waiting (skips the backoff, not a server's retry_after). */
  wake() {
    if (this.state !== "reconnecting" || this.#reconnectTimer === null) return;
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    const wait = this.#notBefore - Date.now();
    if (wait > 0) this.#reconnectTimer = setTimeout(() => this.#retry(), wait);
    else this.#retry();
  }

  /**
   * Close deliberately: never reconnects; pending requests and the outbox are dropped, the
   * server ends the session (close code 1000) and a persisted session is forgotten.
   */
  close() {
    if (this.state === "closed") return;
    this.#drop(1000, "");
    this.#finish(1000, "");
  }

  // -- connecting

  #open() {
    let params, token;
    try {
      params = this.#params();
      token = this.#token();
    } catch (error) {
      return this.#failOpen(error);
    }
    if (typeof params?.then === "function" || typeof token?.then === "function") {
      Promise.all([params, token]).then(([p, t]) => this.#dial(p, t), (e) => this.#failOpen(e));
    } else this.#dial(params, token);
  }

  #dial(params, token) {
    if (this.state === "closed") return;
    const url = new URL(this.#url);
    if (url.protocol === "http:" || url.protocol === "https:") url.protocol = url.protocol === "http:" ? "ws:" : "wss:";
    for (const [key, value] of Object.entries(params ?? {})) {
      if (value != null) url.searchParams.set(key, String(value));
    }
    // Browsers cannot set headers: the token and the session travel as extra subprotocols
    // (which, unlike query parameters, stay out of access logs). The server selects "tether".
    const offered = [];
    if (token != null) offered.push(`token.${token}`);
    const offer = this.#session.offer(Date.now());
    if (offer !== null) offered.push(offer);
    let ws;
    try {
      ws = offered.length === 0 ? new this.#WebSocket(url.href) : new this.#WebSocket(url.href, [SUBPROTOCOL, ...offered]);
    } catch (error) {
      return this.#failOpen(error);
    }
    this.#ws = ws;
    this.#early = [];
    ws.onopen = () => { this.#lastReceived = this.#lastCheck = Date.now(); };
    ws.onmessage = (event) => this.#onMessage(event.data);
    ws.onerror = () => this.#emit("error", namedError("SocketError", "WebSocket error"));
    ws.onclose = (event) => { this.#ws = null; this.#onClose(event.code, event.reason); };
  }

  #failOpen(error) {
    this.#emit("error", error);
    this.#onClose(null, "");
  }

  /** A socket closed or could not open (`code` null): fail what it lost, then retry or finish. */
  #onClose(code, reason) {
    clearTimeout(this.#checkTimer);
    clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
    this.#early = null;
    this.#probes.clear();
    const wasClosed = this.state === "closed";
    // A browser never sees the HTTP status of a refused handshake: no `status` to pass.
    const [lost, retry] = this.#session.ended(code, reason, Date.now() / 1000, Math.random());
    this.#reject(lost, () => namedError("ConnectionLost", "connection lost before the reply"));
    this.#notify(); // the state changed: what waits for room looks again
    if (wasClosed) return;
    if (retry === null) return this.#finish(code, reason);
    this.#save(); // e.g. a 4009 took the session away: a reload must not take it back
    const delay = retry.delay * 1000;
    this.#notBefore = Date.now() + retry.notBefore * 1000;
    this.#reconnectTimer = setTimeout(() => this.#retry(), delay);
    this.#emit("close", { code, reason, willReconnect: true });
    if (this.state === "reconnecting") this.#emit("reconnecting", { attempt: this.#session.backoff.attempt, delay });
  }

  #retry() {
    this.#reconnectTimer = null;
    this.#open();
  }

  /** Become closed for good: no timers, no listeners, every pending request rejected. */
  #finish(code, reason) {
    const ids = this.#session.close(); // the outbox is dropped
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#checkTimer);
    clearTimeout(this.#ackTimer);
    for (const [target, name, listener] of this.#listeners) target.removeEventListener(name, listener);
    this.#listeners = [];
    this.#forgetStored(); // the session is over: nothing to resume after a reload
    this.#reject(ids, () => namedError("ClientClosed", "client closed"));
    this.#notify(); // emit() waiting for room rejects with ClientClosed
    this.#emit("close", { code, reason, willReconnect: false });
  }

  /** Detach from the current socket and close it without waiting for its close handshake. */
  #drop(code, reason) {
    const ws = this.#ws;
    this.#ws = null;
    if (ws === null) return;
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try { ws.close(code, reason); } catch { /* already closing */ }
  }

  #listen(target, name, listener) {
    target.addEventListener(name, listener);
    this.#listeners.push([target, name, listener]);
  }

  #listenForWake() {
    const doc = globalThis.document;
    if (doc?.addEventListener) this.#listen(doc, "visibilitychange", () => { if (doc.visibilityState === "visible") this.wake(); });
    if (globalThis.addEventListener) this.#listen(globalThis, "online", () => this.wake());
  }

  // -- persist: the session in a Storage, so that a reloaded page resumes it

  #listenForUnload() {
    // A page that goes away may never run again (a reload, or a hidden tab the browser
    // discards): keep what it has now. pagehide comes on every unload; hidden, on mobile.
    const doc = globalThis.document;
    if (globalThis.addEventListener) this.#listen(globalThis, "pagehide", () => this.#save());
    if (doc?.addEventListener) this.#listen(doc, "visibilitychange", () => { if (doc.visibilityState === "hidden") this.#save(); });
  }

  #restore() {
    let saved;
    try {
      saved = JSON.parse(this.#storage.getItem(this.#storageKey) ?? "null");
    } catch {
      saved = null;
    }
    if (saved === null) return;
    try {
      this.#session.restore(saved);
      this.#restored = Number.isInteger(saved.dropped) ? saved.dropped : 0;
    } catch {
      this.#forgetStored(); // not ours, or from another version: start a new session
    }
  }

  #save() {
    if (this.#storage === null || this.state === "closed") return;
    const snapshot = this.#session.snapshot({ maxMessages: this.#session.outboxSize, maxBytes: PERSIST_MAX_CHARS });
    if (snapshot === null) return this.#forgetStored();
    try {
      this.#storage.setItem(this.#storageKey, JSON.stringify(snapshot));
    } catch { // full (QuotaExceededError): keep the session, without its messages
      const { unacked, dropped } = snapshot;
      try {
        this.#storage.setItem(this.#storageKey, JSON.stringify({ ...snapshot, unacked: [], dropped: dropped + unacked.length }));
      } catch { /* nothing can be kept */ }
    }
  }

  #forgetStored() {
    try { this.#storage?.removeItem(this.#storageKey); } catch { /* blocked: nothing was kept */ }
  }

  // -- sending

  #checkNotClosed() {
    if (this.state === "closed") throw namedError("ClientClosed", "client closed");
  }

  #isOpen() {
    return this.state === "open" && this.#ws?.readyState === OPEN;
  }

  /**
   * Whether a message sent now would push another out of the outbox: not connected (or the
   * socket is closing) and the outbox is full. A zero-size outbox is never "full" here: it
   * has no room to wait for, so what is sent while disconnected is dropped, as by send().
   */
  #full() {
    const session = this.#session;
    return !this.#isOpen() && session.outboxSize > 0 && session.outbox.length >= session.outboxSize;
  }

  /** Resolve once there is room (see #full), the client is closed, or `wanted()` turns false. */
  async #room(wanted = () => true) {
    while (this.#full() && this.state !== "closed" && wanted()) await this.#changed();
  }

  /** A promise resolved at the next #notify(). */
  #changed() {
    return new Promise((resolve) => { this.#waiters.push(resolve); });
  }

  /** Wake whatever waits in #changed(): a connection opened (the outbox is flushed) or closed, a request left the outbox. */
  #notify() {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const resolve of waiters) resolve();
  }

  /**
   * Write `message` now or queue it, as the session says (its JSON is the payload). Returns
   * the socket it was written to, or null (queued, or dropped from a zero-size outbox).
   */
  #push(message) {
    const id = message.id ?? null;
    const payload = JSON.stringify(message);
    const session = this.#session;
    let [writeNow, dropped] = session.send(payload, id);
    if (writeNow) {
      const ws = this.#ws;
      if (ws?.readyState === OPEN) {
        this.#write(session.wrote(id, payload));
        return ws;
      }
      dropped = session.queue(payload, id); // the socket is closing: wait for the next one
    }
    if (dropped === null) return null;
    const [droppedPayload, droppedId] = dropped;
    if (droppedId !== null) this.#reject([droppedId], () => namedError("OutboxOverflow", "dropped from a full outbox"));
    this.#emit("outboxoverflow", { message: JSON.parse(droppedPayload) });
    return null;
  }

  /** The one place that writes to the socket. */
  #write(text) {
    this.#ws.send(text);
  }

  /** Reject the promises of `ids` (no longer pending in the session) with `makeError()`. */
  #reject(ids, makeError) {
    for (const id of ids) this.#takeRequest(id)?.reject(makeError());
  }

  #takeRequest(id) {
    const entry = this.#requests.get(id);
    if (entry === undefined) return undefined;
    this.#requests.delete(id);
    clearTimeout(entry.timer);
    return entry;
  }

  /** A direct message arrived: ack it within ackDelay if nothing we send carries the ack. */
  #ackLater() {
    if (this.#ackTimer === null) this.#ackTimer = setTimeout(() => this.#sendAck(), this.#ackDelay);
  }

  #sendAck() {
    this.#ackTimer = null;
    const ack = this.#isOpen() ? this.#session.ackDue() : null;
    if (ack !== null) this.#write(JSON.stringify({ type: "ack", ack }));
  }

  // -- receiving

  #onMessage(raw) {
    this.#lastReceived = Date.now();
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return; // not JSON (or binary): nothing a typed app sends
    }
    if (!isEnvelope(message)) return;
    const early = this.#early;
    if (early === null) return this.#dispatch(message);
    if (message.type !== "welcome") return void early.push(message); // the new session's: handled after the welcome
    this.#early = null;
    const ws = this.#ws;
    this.#dispatch(message);
    for (const previous of early) {
      if (this.#ws !== ws) return; // closed meanwhile (by a handler, say)
      this.#dispatch(previous);
    }
  }

  #dispatch(message) {
    const session = this.#session;
    const seq = message.seq ?? null;
    const room = message.room ?? null;
    if (seq !== null) {
      if (!session.received(seq)) return; // replayed after a resume, and seen already
      this.#ackLater();
    }
    session.acked(message.ack ?? null);
    if (room !== null && seq === null && !session.roomMessage(room, message.off ?? null)) return; // a replay overlapping live traffic
    const data = message.data ?? null;
    const object = data !== null && typeof data === "object";
    // joined/left about no room, or a gap without its data, are the app's own (as in tether.Client).
    switch (message.type) {
      case "welcome": return this.#onWelcome(data);
      case "reply": return this.#onReply(message.id, data);
      case "error": return this.#onError(message.id, data ?? {});
      case "heartbeat": return this.#onHeartbeat(data);
      case "joined":
        if (room === null || !object) break;
        return session.joined(room, data.epoch ?? null, Number.isInteger(data.offset) ? data.offset : 0);
      case "left":
        if (room === null) break;
        return session.left(room);
      case "gap":
        if (!object) break;
        return this.#onGap(room, data);
      case "ack": return;
    }
    for (const handler of [...(this.#handlers.get(message.type) ?? [])]) {
      try { handler(data, room); } catch (error) { reportError(error); }
    }
  }

  #onReply(id, data) {
    if (this.#session.settle(id)) this.#takeRequest(id)?.resolve(data);
  }

  #onError(id, { code, message, path }) {
    const error = new ReplyError(code, message, path);
    if (this.#session.settle(id)) this.#takeRequest(id)?.reject(error);
    else this.#emit("error", error);
  }

  /** The server's welcome: resume the streams (or learn they are gone), flush, then open. */
  #onWelcome(data) {
    const ws = this.#ws;
    if (ws?.readyState !== OPEN) return; // closing already: its close comes next, the next socket starts over
    const session = this.#session;
    const welcome = session.welcomed(data !== null && typeof data === "object" ? data.session ?? null : null);
    if (welcome.resumed) {
      this.#write(JSON.stringify({ type: "resume", data: { rooms: session.positions() } }));
      for (const payload of welcome.resend) this.#write(payload);
    }
    this.#reject(welcome.lost, () => namedError("ConnectionLost", "the session could not be resumed: the request may or may not have run"));
    for (const room of welcome.roomsLost) this.#emit("gap", { room, first: 0, last: 0, reason: "session" });
    const restored = this.#restored;
    this.#restored = null;
    if ((session.opened > 0 || restored !== null) && session.resume) {
      this.#emit("resumed", { resumed: welcome.resumed, lostMessages: welcome.lostMessages + (restored ?? 0) });
    }
    if (this.state === "closed" || this.#ws !== ws) return; // a listener closed the client
    for (const [payload, id] of session.connected(Date.now() / 1000)) this.#write(session.wrote(id, payload));
    this.#notify(); // the outbox is empty: what waits for room goes now, in the order it came
    const { interval = null, timeout = null } = data?.heartbeat ?? {};
    this.#heartbeat = { interval, timeout };
    this.#lastCheck = Date.now();
    this.#scheduleCheck();
    if (interval != null) this.#probe();
    this.#save(); // the token may be new
    this.#emit("open");
    if (session.opened > 1) this.#emit("reconnected");
  }

  #onGap(room, data) {
    if (room !== null) this.#session.roomGap(room, Number.isInteger(data.last) ? data.last : 0, data.epoch ?? null);
    this.#emit("gap", { room, first: data.first ?? null, last: data.last ?? null, reason: data.reason ?? null });
  }

  #onHeartbeat(data) {
    if (this.#probes.delete(data?.t)) {
      this.#latency = Date.now() - data.t; // the echo of one of our probes
    } else if (this.#isOpen()) {
      this.#write(JSON.stringify({ type: "heartbeat", data })); // the server's: answer with the same data
    }
  }

  // -- heartbeat: a check at least every `interval` seconds, and just when the silence window
  // (interval + timeout since the last message) ends, so a dead server is noticed within
  // interval + timeout; our own probes (for latency) go out every `interval`.

  #scheduleCheck() {
    clearTimeout(this.#checkTimer);
    const { interval, timeout } = this.#heartbeat;
    if (interval == null) return;
    let wait = interval * 1000;
    if (timeout != null) wait = Math.min(wait, this.#lastReceived + (interval + timeout) * 1000 - Date.now() + 1);
    this.#checkTimer = setTimeout(() => this.#check(), Math.max(wait, 10));
  }

  #check() {
    const now = Date.now();
    const { interval, timeout } = this.#heartbeat;
    const verdict = liveness(now / 1000, this.#lastReceived / 1000, this.#lastCheck / 1000, interval, timeout);
    this.#lastCheck = now;
    if (verdict === "dead") {
      this.#drop(1000, "keepalive timeout");
      return this.#onClose(1006, "keepalive timeout");
    }
    if (verdict === "probe") this.#lastReceived = now - interval * 1000; // a fresh `timeout` window
    if (verdict === "probe" || now - this.#lastProbe >= interval * 1000) this.#probe();
    this.#scheduleCheck();
  }

  #probe() {
    if (!this.#isOpen()) return;
    const t = Date.now();
    this.#lastProbe = t;
    this.#probes.add(t);
    if (this.#probes.size > MAX_PROBES) this.#probes.delete(this.#probes.values().next().value);
    this.#write(JSON.stringify({ type: "heartbeat", data: { t } }));
  }

  #emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}

/**
 * Open a reconnecting connection to a tether typed app at `url` (ws:, wss:, or http(s):/relative,
 * which map to ws(s):). See tether.d.ts for the options and their defaults.
 * @param {string | URL} url
 * @param {import("./tether.d.ts").ConnectOptions} [options]
 * @returns {TetherClient}
 */
export function connect(url, options) {
  return new TetherClient(url, options);
}
