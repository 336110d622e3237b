// A fake WebSocket and a mocked clock for the tether.js driver tests (imported, not a test file).
import assert from "node:assert/strict";

import { connect } from "../../src/tether/static/tether.js";

export const START = 1_000_000; // ms: the mocked Date.now() when a test starts
export const WELCOME = { type: "welcome", data: { heartbeat: { interval: 25, timeout: 10 } } };
/** A welcome from a server that keeps no sessions and sends no heartbeats. */
export const PLAIN_WELCOME = { type: "welcome", data: { heartbeat: { interval: null, timeout: null } } };

/** A WebSocket class recording every instance; tests drive it with open/receive/drop. */
export function fakeWebSocketClass() {
  return class FakeSocket {
    static instances = [];
    readyState = 0;
    bufferedAmount = 0; // bytes "not yet on the network": a test sets it to make emit() wait
    sent = [];
    closedWith = null;
    onopen = null; onmessage = null; onerror = null; onclose = null;

    constructor(url, protocols = []) {
      this.url = new URL(url);
      this.protocols = protocols;
      FakeSocket.instances.push(this);
    }
    send(text) {
      assert.equal(this.readyState, 1, "send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.readyState = 2;
      this.closedWith = { code, reason };
    }
    /** The socket opens and the server's `welcome` arrives (null: not yet). */
    open(welcome = PLAIN_WELCOME) {
      this.readyState = 1;
      this.onopen?.({});
      if (welcome !== null) this.receive(welcome);
    }
    receive(message) {
      this.onmessage?.({ data: JSON.stringify(message) });
    }
    drop(code = 1006, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
  };
}

/** Mock timers and Math.random, connect, and record the client's events. */
export function setup(t, options = {}, url = "ws://example.test/ws") {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"], now: START });
  t.mock.method(Math, "random", () => 0.5);
  const WebSocket = fakeWebSocketClass();
  const client = connect(url, { WebSocket, reconnectOnWake: false, ...options });
  const events = [];
  for (const name of ["open", "close", "reconnecting", "reconnected", "error", "outboxoverflow", "resumed", "gap"]) {
    client.addEventListener(name, (event) => events.push([name, event.detail]));
  }
  t.after(() => client.close());
  return { client, sockets: WebSocket.instances, events, tick: (ms) => t.mock.timers.tick(ms) };
}

export const named = (name) => (error) => error.name === name;
