// The chat as this page shows it: live lines and history replies merged. Pure: no DOM.
//
// Every line has a unique `id` from the server (examples/call/app.py Line). Live lines (the
// call's `chat` broadcasts, replayed in order after a resumed reconnect) are appended in the
// order they come, once each. A history reply (the call's last lines from tether's room
// history, `hub.recent`, oldest first) is merged at the point the page asked for it (`mark()`):
// lines shown before that point and not in the reply are older than it (or from a server that
// restarted) and stay first, then the reply's lines in its order, then the lines that arrived
// after the mark and are not in the reply (said after the server read its history).

export class ChatLog {
  #lines = []; // {line, n}: n orders arrivals (mark() compares with it)
  #seen = new Set(); // ids ever shown: a line dropped by the limit is not added back
  #arrivals = 0;

  constructor(limit = 200) {
    this.limit = limit;
  }

  /** Append live `lines` not seen before; returns true if anything was new. */
  add(lines) {
    let added = false;
    for (const line of lines) {
      if (this.#seen.has(line.id)) continue;
      this.#seen.add(line.id);
      this.#lines.push({ line, n: this.#arrivals++ });
      added = true;
    }
    if (added) this.#trim();
    return added;
  }

  /** Where the page is now: pass it to `merge` with the reply of a history request sent now. */
  mark() {
    return this.#arrivals;
  }

  /** Merge a history reply (oldest first) asked for at `mark`; returns true if anything changed. */
  merge(history, mark) {
    const shown = new Map(this.#lines.map((entry) => [entry.line.id, entry]));
    const kept = history.filter((line) => shown.has(line.id) || !this.#seen.has(line.id));
    if (kept.every((line) => shown.has(line.id))) return false; // nothing missed
    const inReply = new Set(kept.map((line) => line.id));
    const before = this.#lines.filter((entry) => entry.n < mark && !inReply.has(entry.line.id));
    const after = this.#lines.filter((entry) => entry.n >= mark && !inReply.has(entry.line.id));
    const merged = kept.map((line) => shown.get(line.id) ?? { line, n: mark - 0.5 });
    for (const line of kept) this.#seen.add(line.id);
    this.#lines = [...before, ...merged, ...after];
    this.#trim();
    return true;
  }

  /** The lines, oldest first. */
  get lines() { return this.#lines.map((entry) => entry.line); }

  #trim() {
    if (this.#lines.length > this.limit) this.#lines.splice(0, this.#lines.length - this.limit);
  }
}
