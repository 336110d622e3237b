// The chat as this page shows it: live lines and history replies merged. Pure: no DOM.
//
// Every line carries (epoch, seq) from the server (examples/call/history.py): a line seen twice
// (in a history reply and live) is kept once, lines of one epoch are in seq order, and epochs
// (a restarted server starts a new one) follow each other in the order this page met them.

export class ChatLog {
  #lines = [];
  #seen = new Set();
  #epochs = new Map(); // epoch -> the order this page first saw it in

  constructor(limit = 200) {
    this.limit = limit;
  }

  /** Merge `lines` in; returns true if anything was new. */
  add(lines) {
    let added = false;
    for (const line of lines) {
      const key = `${line.epoch}:${line.seq}`;
      if (this.#seen.has(key)) continue;
      this.#seen.add(key);
      if (!this.#epochs.has(line.epoch)) this.#epochs.set(line.epoch, this.#epochs.size);
      this.#lines.push(line);
      added = true;
    }
    if (!added) return false;
    this.#lines.sort((a, b) => this.#epochs.get(a.epoch) - this.#epochs.get(b.epoch) || a.seq - b.seq);
    while (this.#lines.length > this.limit) this.#lines.shift(); // their keys stay seen: never re-added
    return true;
  }

  /** The lines, oldest first. */
  get lines() { return this.#lines; }
}
