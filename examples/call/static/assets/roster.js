// Who is in the call: tether presence as a state plus diffs, applied in order (like phoenix's
// Presence.syncState / syncDiff). Pure: no DOM, no network.
//
// The state is a presence list (a `join` reply's, or a `presence` request's after a gap). Diffs
// are tether's `presence` events ({event: "join" | "update" | "leave", id, meta}), in the room's
// stream order (a resumed reconnect replays the ones it missed). Diffs that arrive while no
// state is known (between a new session and its join reply) wait and are applied on top of
// the state once it comes: every diff sets or removes one member, so applying a run of diffs
// that started before the state was read still ends where the stream is.

export class Roster {
  #members = new Map(); // member id -> meta {name, mic, cam, seat}
  #pending = null; // diffs waiting for a state; null while in sync

  constructor() {
    this.#pending = [];
  }

  /** True once a state arrived and until `unsync()`. */
  get synced() { return this.#pending === null; }

  /** Stop trusting the state (diffs were missed): diffs now wait for `sync` (those waiting
   * already keep waiting). */
  unsync() {
    this.#pending ??= [];
  }

  /** A new session: the diffs waiting belong to the old one (the new state has them, or
   * newer), so they are dropped; the next ones wait for `sync`. */
  reset() {
    this.#pending = [];
  }

  /** Take a presence list as the state, then apply the waiting diffs. */
  sync(presence) {
    this.#members = new Map(presence.map(({ id, meta }) => [id, meta]));
    const pending = this.#pending ?? [];
    this.#pending = null;
    for (const diff of pending) this.#apply(diff);
  }

  /** Apply one diff now, or keep it for the next state. */
  apply(diff) {
    if (this.#pending !== null) this.#pending.push(diff);
    else this.#apply(diff);
  }

  #apply({ event, id, meta }) {
    if (event === "leave") this.#members.delete(id);
    else if (event === "join" || (event === "update" && this.#members.has(id))) this.#members.set(id, meta);
  }

  get(id) { return this.#members.get(id); }
  has(id) { return this.#members.has(id); }
  get size() { return this.#members.size; }

  /** [id, meta] pairs, in seat order (who came first is listed first). */
  entries() {
    return [...this.#members].sort(([, a], [, b]) => a.seat - b.seat);
  }
}

/**
 * Of two members, the one with the later seat is polite (the server hands out the seats; see
 * examples/call/app.py). Ties cannot happen within one server; member ids break them anyway.
 */
export function isPolite(me, peer) {
  if (me.meta.seat !== peer.meta.seat) return me.meta.seat > peer.meta.seat;
  return me.id > peer.id;
}
