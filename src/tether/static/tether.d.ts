/**
 * Types for tether.js, the browser client of tether. Describe your app's messages once:
 *
 *     interface Chat extends Schema {
 *       receive: { chat: { text: string; from: string } };          // server -> client
 *       send: { chat: { text: string } };                           // client -> server
 *       request: { add: { data: { a: number; b: number }; reply: number } };
 *     }
 *     const client = connect<Chat>("wss://example.com/ws");
 *     client.on("chat", (data, room) => data.from);  // typed; room: where it was broadcast
 *     const sum: number = await client.request("add", { a: 1, b: 2 });
 */

/** The message map a client is generic over. */
export interface Schema {
  /** Messages the server sends, by type: the type of their `data`. */
  receive: Record<string, unknown>;
  /** One-way messages the client sends, by type. */
  send: Record<string, unknown>;
  /** Requests the client makes, by type: their `data` and the reply's `data`. */
  request: Record<string, { data: unknown; reply: unknown }>;
}

/** The default, untyped schema. */
export interface AnySchema extends Schema {
  receive: Record<string, any>;
  send: Record<string, any>;
  request: Record<string, { data: any; reply: any }>;
}

/** Query parameters added to the URL of each connection attempt. */
export type Params = Record<string, string | number | boolean | null | undefined>;

export interface BackoffOptions {
  /** Seconds; the first retry waits up to this long. Default 0.5. */
  base?: number;
  /** Growth per attempt, >= 1. Default 2. */
  factor?: number;
  /** Seconds; upper bound of any delay. Default 30. */
  cap?: number;
  /** Seconds a connection must stay up before the attempt counter resets. Default 10. */
  stableAfter?: number;
}

/** The subset of `Storage` that `persist` uses. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** The subset of the WebSocket class the client uses (injectable for tests). */
export interface WebSocketLike {
  readonly readyState: number;
  /** Bytes given to send() and not yet on the network (what emit() waits on); taken as 0 if absent. */
  readonly bufferedAmount?: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export interface ConnectOptions {
  /**
   * Query parameters, or a function computing them, called again before EVERY (re)connect
   * (e.g. a fresh token after a 4002 close). It may return a Promise. Default `{}`.
   */
  params?: Params | (() => Params | Promise<Params>);
  /**
   * A credential sent as the subprotocol `token.<token>` next to `tether` (the server's
   * `tether.auth.token()` reads it and the 101 selects `tether`); keeps it out of URLs and
   * access logs. A function is called again before EVERY (re)connect, like `params` (e.g. a
   * fresh token after a 4002 "token expired" close); it may return a Promise. The token must
   * consist of HTTP token characters (JWTs and base64url do). null = offer no subprotocol.
   * Default null.
   */
  token?: string | null | (() => string | null | Promise<string | null>);
  /**
   * Messages (and requests) kept while not connected, flushed in order on (re)connect.
   * When full, the OLDEST is dropped, a dropped request rejects with "OutboxOverflow", and an
   * "outboxoverflow" event fires. 0 = never queue. Default 100.
   */
  outboxSize?: number;
  /** Default request timeout in ms; null = none. Default 10000. */
  requestTimeout?: number | null;
  /**
   * Bytes; `emit()` resolves only once the socket's `bufferedAmount` is at most this (looked
   * at every 5 ms: browsers fire no event when it drains). Default 65536 (64 KiB, the
   * write-buffer limit `tether.Client.emit` waits on).
   */
  maxBufferedAmount?: number;
  /** Reconnect schedule (full jitter, same as tether.backoff). */
  backoff?: BackoffOptions;
  /**
   * Seconds; the most a server's 1001 `retry_after` may delay a reconnect (a larger value is
   * cut to this, then the backoff delay is added). Same as `tether.Client(max_retry_after=)`.
   * Default 60.
   */
  maxRetryAfter?: number;
  /** Reconnect at once (skipping backoff) on `visibilitychange` to visible and on `online`. Default true. */
  reconnectOnWake?: boolean;
  /**
   * Keep a session (docs/clients.md, "Sessions and resume"): offered as the subprotocol
   * `session` (then `session.<token>.<direct>`); with a server that keeps sessions, what is
   * sent and received survives a reconnect within its window (120 s by default) in both
   * directions, once and in order: unacked messages are resent, requests in flight get
   * their replies, rooms and presence are kept, missed broadcasts replayed. A server that
   * keeps none welcomes without one: then nothing is numbered. Same as
   * `tether.Client(resume=)`. Default true.
   */
  resume?: boolean;
  /**
   * ms; a direct message from the server (reply, error, `conn.emit`) is acked on the next
   * message sent, or on its own after this long. Same as `tether.Client(ack_delay=)` (s).
   * Default 1000.
   */
  ackDelay?: number;
  /**
   * Keep the session in a Storage so that a reloaded page resumes it (opt-in):
   * `"sessionStorage"` (one tab's, kept across reloads; nothing when the browser blocks it)
   * or any Storage-like object. Stored under `persistKey`: the session's token and id, the
   * last seq sent and direct seq received, the room positions, the next request id, and the
   * newest unacked messages (at most `outboxSize` of them and 1 Mi characters; older ones
   * count in the `resumed` event's `lostMessages`). Saved at each welcome and close, on
   * `pagehide` and when the page becomes hidden; removed by `close()` and after a 4009.
   * A duplicated tab copies sessionStorage: the copy resumes the session and the server
   * closes the original with 4009, which then starts a new session (a "session" gap for its
   * rooms). Requests of the previous page are resent but nobody waits for their replies.
   * Default null (no persistence).
   */
  persist?: "sessionStorage" | StorageLike | null;
  /** The Storage key of `persist`. Default `"tether.session " + the URL without its query`. */
  persistKey?: string | null;
  /** WebSocket class to use. Default `globalThis.WebSocket`. */
  WebSocket?: new (url: string, protocols?: string[]) => WebSocketLike;
}

export type ClientState = "connecting" | "open" | "reconnecting" | "closed";

/** An envelope as queued in the outbox. */
export interface OutboundMessage {
  type: string;
  data: unknown;
  id?: number;
}

export interface CloseDetail {
  /** Close code; 1006 for a lost connection (including a keepalive timeout); null if no socket could be created. */
  code: number | null;
  reason: string;
  /** False when the client is now "closed" for good. */
  willReconnect: boolean;
}

/** Why messages cannot be delivered (docs/protocol.md, "Gaps"); "session": a new session replaced the old one. */
export type GapReason = "trimmed" | "expired" | "epoch" | "too_many" | "lost" | "session";

export interface GapDetail {
  /** The room (join it again after a "session" gap), or null for messages to this client only. */
  room: string | null;
  /** The offsets (room) or seqs (direct) that will never come, inclusive; 0, 0 for "session". */
  first: number | null;
  last: number | null;
  reason: GapReason | string | null;
}

export interface ResumedDetail {
  /** True: the server continued the session, nothing was lost. False: a new session. */
  resumed: boolean;
  /**
   * One-way messages of the old session that may not have arrived (unacked when it ended,
   * or left out of a `persist` storage). Its requests in flight failed with "ConnectionLost".
   */
  lostMessages: number;
}

export interface TetherEventMap {
  /** A connection's welcome arrived: sending works (the outbox is flushed). Every time. */
  open: CustomEvent<null>;
  /** A connection other than the first opened. */
  reconnected: CustomEvent<null>;
  /** A socket closed, or the client became closed. */
  close: CustomEvent<CloseDetail>;
  /** A retry is scheduled: `attempt` counts from 1, `delay` in ms. */
  reconnecting: CustomEvent<{ attempt: number; delay: number }>;
  /** A socket error, a failed `params()`, or an error reply matching no request (a ReplyError). */
  error: CustomEvent<Error>;
  /** The outbox was full: its oldest message was dropped. */
  outboxoverflow: CustomEvent<{ message: OutboundMessage }>;
  /**
   * With `resume`, after each reconnect (before "open"), and on the first connection of a
   * page that restored a session from `persist`.
   */
  resumed: CustomEvent<ResumedDetail>;
  /** Messages that will never come: refetch what they would have told you. */
  gap: CustomEvent<GapDetail>;
}

/** An `error` reply: `code` as listed in docs/protocol.md; `path` names the invalid field. */
export class ReplyError extends Error {
  constructor(code: string, message: string, path?: string | null);
  readonly name: "ReplyError";
  readonly code: string;
  readonly path: string | null;
}

export interface RequestOptions {
  /** ms; null = none. Default: the client's `requestTimeout`. */
  timeout?: number | null;
}

export class TetherClient<S extends Schema = AnySchema> extends EventTarget {
  constructor(url: string | URL, options?: ConnectOptions);
  /** "connecting" (first connection) | "open" | "reconnecting" | "closed". */
  readonly state: ClientState;
  /** Last measured heartbeat round trip in ms, or null. */
  readonly latency: number | null;
  /**
   * Handle every server message of `type`: `room` is the room it was broadcast to, null for a
   * message to this client only. Returns an unsubscribe function.
   */
  on<K extends keyof S["receive"] & string>(type: K, handler: (data: S["receive"][K], room: string | null) => void): () => void;
  /** Send a one-way message (queued in the outbox while not open). Throws "ClientClosed" when closed. */
  send<K extends keyof S["send"] & string>(type: K, data: S["send"][K]): void;
  /**
   * Send a one-way message, waiting for room instead of dropping anything (as
   * `tether.Client.emit`): while not connected, until the outbox has a free place; once
   * written, until the socket's `bufferedAmount` is at most `maxBufferedAmount`. `await` it in
   * a producer that must lose nothing. With `outboxSize` 0 a message emitted while
   * disconnected is dropped, as by send(). Rejects with an Error named "ClientClosed" when closed.
   */
  emit<K extends keyof S["send"] & string>(type: K, data: S["send"][K]): Promise<void>;
  /**
   * Resolve with the reply's data. Rejects with a ReplyError, or an Error named "TimeoutError",
   * "ConnectionLost", "OutboxOverflow" or "ClientClosed". While not connected with a full
   * outbox it waits for room (its timeout runs meanwhile) rather than push the oldest out.
   */
  request<K extends keyof S["request"] & string>(
    type: K,
    data: S["request"][K]["data"],
    options?: RequestOptions,
  ): Promise<S["request"][K]["reply"]>;
  /** Reconnect now if a retry is waiting (a server's retry_after still applies). */
  wake(): void;
  /** Close deliberately (code 1000: the server ends the session); never reconnects. */
  close(): void;

  addEventListener<K extends keyof TetherEventMap>(
    type: K,
    listener: (event: TetherEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions,
  ): void;
  removeEventListener<K extends keyof TetherEventMap>(
    type: K,
    listener: (event: TetherEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(
    type: string,
    listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions,
  ): void;
}

/** Open a reconnecting connection; `url` may be ws(s):, http(s): or relative to the page. */
export function connect<S extends Schema = AnySchema>(url: string | URL, options?: ConnectOptions): TetherClient<S>;

// Pure functions shared with tether.backoff / tether.keepalive (seconds).

export function backoffDelay(
  attempt: number,
  rand: number,
  options?: { base?: number; factor?: number; cap?: number },
): number;
export function shouldReconnect(code: number | null, deliberate: boolean): boolean;
export function retryAfter(code: number | null, reason: string): number | null;
export class Backoff {
  constructor(options?: BackoffOptions);
  attempt: number;
  readonly base: number;
  readonly factor: number;
  readonly cap: number;
  readonly stableAfter: number;
  nextDelay(rand: number): number;
  connected(now: number): void;
  maybeReset(now: number): boolean;
}
export function liveness(
  now: number,
  lastReceived: number,
  lastCheck: number,
  interval: number | null,
  timeout: number | null,
  options?: { lateSlack?: number },
): "ok" | "probe" | "dead";
export function heartbeatDue(now: number, lastSent: number, interval: number | null): boolean;

// The session core shared with tether.proto.session (seconds): what TetherClient drives.

export interface SessionOptions {
  /** Entries kept while not open; 0 = none. Default 100. Throws a RangeError unless an integer >= 0. */
  outboxSize?: number;
  /** Default `new Backoff()`. */
  backoff?: Backoff;
  /** Seconds; cap on a 1001 `retry_after`. Default 60. */
  maxRetryAfter?: number;
  /** Keep a session (number messages, track the server's streams). Default false (TetherClient passes true). */
  resume?: boolean;
}

/** The close code of a connection whose session was resumed on another one. */
export const SESSION_TAKEN: 4009;

/** What a welcome means for the session's streams ({@link Session.welcomed}). */
export interface Welcome<P> {
  /** True: write a "resume" message with `positions()`, then `resend`, in order. */
  readonly resumed: boolean;
  /** The unacked payloads to write again (with their seq), oldest first. */
  readonly resend: P[];
  /** Requests the old session took with it (fail them with "ConnectionLost"). */
  readonly lost: number[];
  /** Unacked one-way messages of the old session. */
  readonly lostMessages: number;
  /** Rooms the old session was in. */
  readonly roomsLost: string[];
}

/** The `session` of a welcome message. */
export interface SessionInfo {
  id?: string;
  token?: string;
  resumed?: boolean;
  /** The last seq the server accepted. */
  ack?: number;
  /** Seconds a detached session waits for its client. */
  window?: number;
}

/** A room's position: the epoch of its stream and the last offset received. */
export interface RoomPosition {
  epoch: string | null;
  offset: number;
}

/** What `persist` stores ({@link Session.snapshot}). */
export interface SessionSnapshot {
  token: string;
  sessionId: string | null;
  seq: number;
  direct: number;
  /** The last resume stamp offered (absent in snapshots of older versions: 0). */
  stamp?: number;
  rooms: Record<string, RoomPosition>;
  nextId: number;
  /** `[seq, payload]`, the newest unacked, oldest first. */
  unacked: [seq: number, payload: string][];
  /** Unacked messages left out. */
  dropped: number;
}

/** Client side of one room's stream (port of tether.proto.resume.RoomCursor). */
export class RoomCursor {
  constructor(epoch: string | null, offset: number);
  epoch: string | null;
  offset: number;
  /** A room message with `off`: true to deliver it, false if seen already (null: not part of the stream). */
  receive(offset: number | null): boolean;
}

/** An outbox entry: `[payload, request id]`, the id null for a one-way message. */
export type OutboxEntry<P> = [payload: P, id: number | null];

/** Reconnect after `delay` seconds, and not before `notBefore` seconds even when woken. */
export interface Retry {
  readonly delay: number;
  readonly notBefore: number;
}

/**
 * A reconnecting client's bookkeeping with no I/O: the bounded outbox (oldest dropped first),
 * request ids, the pending requests and which of them were written to the current socket,
 * the reconnect decision, and with `resume` the session's streams (seq and acks both ways,
 * room positions). A port of tether.proto.session.Session, checked by the same vectors
 * (tests/vectors/session.json). `P` is the payload type (TetherClient: JSON strings; with
 * `resume` a payload must be a JSON object's text).
 */
export class Session<P = unknown> {
  constructor(options?: SessionOptions);
  readonly state: ClientState;
  readonly resume: boolean;
  /** The session's private token and id (null: no session). */
  readonly token: string | null;
  readonly sessionId: string | null;
  /** The last seq given to a message written to the server. */
  readonly seq: number;
  /** `[seq, payload, id]` written and not acked yet, oldest first. */
  readonly unacked: [seq: number, payload: P, id: number | null][];
  /** The last direct seq received, and the last one acked to the server. */
  readonly direct: number;
  readonly directAcked: number;
  /** The stamp of the last resume offered ({@link offer}). */
  readonly stamp: number;
  /** Rooms the server put the session in. */
  readonly rooms: Map<string, RoomCursor>;
  /** Waiting for a connection, oldest first. */
  readonly outbox: OutboxEntry<P>[];
  readonly outboxSize: number;
  /** Request ids waiting for their reply. */
  readonly pending: Set<number>;
  /** Of those, the ids written to the current connection. */
  readonly written: Set<number>;
  readonly backoff: Backoff;
  readonly maxRetryAfter: number;
  /** Connections opened so far. */
  readonly opened: number;
  /** A new request id, now pending. */
  requestId(): number;
  /**
   * `[writeNow, dropped]`: write it now (then call `wrote(id)` for a request), or it waits in
   * the outbox and `dropped` is the entry pushed out to make room. Throws a RangeError once closed.
   */
  send(payload: P, id?: number | null): [writeNow: boolean, dropped: OutboxEntry<P> | null];
  /** Queue a message (also after its write failed); returns the entry dropped, or null. */
  queue(payload: P, id?: number | null): OutboxEntry<P> | null;
  /**
   * A message goes out on the current connection: returns the payload to write. In a session
   * it gets the next `seq` (and the direct `ack` owed) and is kept until acked. Without a
   * payload it only marks a request written (and returns null).
   */
  wrote(id: number | null, payload?: P | null): P | null;
  /** The server accepted everything up to `seq`. */
  acked(seq: number | null): void;
  /** A direct message: false if it is a duplicate (drop it). */
  received(seq: number | null): boolean;
  /** The ack owed now, or null. */
  ackDue(): number | null;
  /** The server put the session in `room` at `(epoch, offset)`. */
  joined(room: string, epoch: string | null, offset: number): void;
  left(room: string): void;
  /** A room message: true to deliver it, false if received already. */
  roomMessage(room: string, offset: number | null): boolean;
  /** Offsets up to `last` of `epoch` will never come. */
  roomGap(room: string, last: number, epoch: string | null): void;
  /** The `data.rooms` of a "resume" message. */
  positions(): Record<string, RoomPosition>;
  /**
   * The subprotocol entry to offer (`session`, or `session.<token>.<direct>.<stamp>`), or null
   * without `resume`. `clock` (ms, the driver passes Date.now()) or the last stamp + 1, whichever is greater.
   */
  offer(clock?: number): string | null;
  /** The welcome's `session` (null: the server keeps none). */
  welcomed(info: SessionInfo | null): Welcome<P>;
  /** A reply/error for `id` arrived: true if it answers a pending request. */
  settle(id: unknown): boolean;
  /** Give up on a request (timed out): out of the pending ones and the outbox. */
  forget(id: number): void;
  /** A connection opened at `now`: the outbox to write, in order (emptied; requests marked written). */
  connected(now: number): OutboxEntry<P>[];
  /**
   * The connection ended (`code` null: no close frame; `status`: the HTTP status of a refused
   * handshake, which browsers cannot see). `lost`: requests written to it (no longer pending;
   * with a session none until the resume decides, unless the close is final or a 4009).
   * `retry` null: closed for good (after close(), 1008, 4001, 4003, status 401/403); then
   * `close()` returns the requests still pending.
   */
  ended(
    code: number | null,
    reason: string,
    now: number,
    rand: number,
    options?: { status?: number | null },
  ): [lost: number[], retry: Retry | null];
  /** Closed for good: empties the outbox; returns the requests still pending (all fail). */
  close(): number[];
  /** JS only (`persist`): what a reloaded page needs to resume, or null without a session. */
  snapshot(options?: { maxMessages?: number; maxBytes?: number }): SessionSnapshot | null;
  /** JS only: continue a snapshot's session (unacked requests come back as one-way). Throws a TypeError if it is not one. */
  restore(saved: SessionSnapshot): void;
}
