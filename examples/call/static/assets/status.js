// The connection indicator: what to show for the client's state. `describe` is pure (the
// time is passed in); `watch` drives it from a tether.js client's events.

/**
 * @param {"connecting" | "connected" | "reconnecting" | "offline"} state
 * @param {number | null} retryAt ms timestamp of the next attempt while reconnecting
 * @param {number} now ms timestamp
 */
export function describe(state, retryAt, now) {
  switch (state) {
    case "connected": return "Connected";
    case "offline": return "Offline";
    case "connecting": return "Connecting…";
    case "reconnecting": {
      const seconds = Math.ceil(((retryAt ?? now) - now) / 1000);
      return seconds > 0 ? `Reconnecting in ${seconds} s` : "Reconnecting…";
    }
  }
  throw new RangeError(`unknown state ${state}`);
}

/**
 * Keep `element` showing the connection of `client`: its text, and `data-state` for styling.
 * Returns the log of states it went through ([{state, at}]), which the tests read.
 */
export function watch(client, element, { now = () => Date.now() } = {}) {
  let state = "connecting";
  let retryAt = null;
  let timer = null;
  const log = [{ state, at: now() }];
  const render = () => {
    element.dataset.state = state;
    element.querySelector(".label").textContent = describe(state, retryAt, now());
  };
  const go = (next) => {
    clearInterval(timer);
    timer = null;
    if (next !== state) log.push({ state: next, at: now() });
    state = next;
    render();
  };
  client.addEventListener("open", () => go("connected"));
  client.addEventListener("reconnecting", (event) => {
    retryAt = now() + event.detail.delay;
    go("reconnecting");
    timer = setInterval(render, 250); // the countdown
  });
  client.addEventListener("close", (event) => {
    if (!event.detail.willReconnect) go("offline");
  });
  globalThis.addEventListener?.("offline", () => { if (state !== "connected") go("offline"); });
  render();
  return log;
}
