// Who is in the call: tether presence as a state plus diffs, applied in order (like phoenix's
// Presence.syncState / syncDiff). Pure: no DOM, no network.
//
// The state is the presence list of a `join` reply. Diffs are tether's `presence` events
// ({event: "join" | "leave", id, meta}) and the demo's `state` events ({id, meta}), which it
// feeds in as {event: "update", id, meta}. Diffs that arrive while no state is known (between a
// (re)connect and its join reply) wait and are applied on top of the state once it comes, so a
// member who joined or left meanwhile is neither lost nor resurrected.

export class Roster {
  #members = new Map(); // member id -> meta {name, mic, cam, seat}
  #pending = null; // diffs waiting for a state; null while in sync

  constructor() {
    this.#pending = [];
  }

  /** True once a state arrived and until `unsync()`. */
  get synced() { return this.#pending === null; }

  /** Forget the state (a new connection has new member ids): diffs now wait for `sync`. */
  unsync() {
    this.#pending = [];
  }

  /** Take the presence list of a join reply as the state, then apply the waiting diffs. */
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
