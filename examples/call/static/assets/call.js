// The call page (/call/<name>): camera and microphone, the tether connection, who is in
// the call, one Peer per other participant, the chat and the controls.
//
// The connection keeps a tether session (on by default): after a dropped socket the client
// resumes it, and the page does nothing. It stays in the call under the same member id and
// seat (the others see no leave/join), its peer connections carry on (video never went through
// the server), and what it missed (chat lines, presence changes, signals) is replayed in order.
// Only when the session is lost (`resumed: false`, a `session` gap: the server restarted, or
// the socket was away longer than its window) does the page join again, under a new member id:
// it then drops its old peer connections once the join reply is in and negotiates new ones.
// A page that goes away ends its session (pagehide): the others see it leave at once, and a
// reload joins afresh. Presence is a state plus tether's presence diffs (roster.js); chat
// merges live lines and history replies by line id (chat.js).
import { connect } from "/tether.js";
import { ChatLog } from "./chat.js";
import { fillIcons, icon } from "./icons.js";
import { bestGrid } from "./layout.js";
import { ROOM_NAME, callLink, initials, randomName, roomOf } from "./names.js";
import { Peer } from "./peer.js";
import { Roster, isPolite } from "./roster.js";
import { watch } from "./status.js";

const VIDEO = { width: { ideal: 640 }, height: { ideal: 360 }, frameRate: { ideal: 24 } };
const NAME_KEY = "tether-call.name";
const EARLY_SIGNALS = 500; // signals that beat our join reply, kept until it comes
const WAIT = { timeout: null }; // a request's reply comes after a resume, or it fails with ConnectionLost

const $ = (id) => document.getElementById(id);
const room = roomOf(location);
const me = { name: (localStorage.getItem(NAME_KEY) || randomName()).slice(0, 40), mic: true, cam: true };

/** Everything the page knows; `window.call` for the curious (and the tests). */
const call = {
  room,
  me,
  client: null,
  stream: null,
  iceServers: [],
  myId: null, // our member id in the call (the same across resumed reconnects), once joined
  myIds: new Set(), // every member id we had (to tell our own chat lines)
  selfId: null, // our entry in the roster shown (kept while joining again)
  session: 0, // counts tether sessions: replies for an older one are ignored
  joining: false,
  roster: new Roster(),
  peers: new Map(), // member id -> Peer
  early: [], // signals received before the join reply
  held: null, // signals held back by hold() (tests: make offers cross)
  chat: new ChatLog(),
  unsent: [], // chat texts not yet said (sent one at a time, while in the call)
  sending: false,
  connectionLog: [],
  resumes: [], // `resumed` of each reconnect: true (the session went on) or false (a new one)
  gaps: [], // tether `gap` events: {room, reason}
  presenceLog: [], // presence diffs received: {event, id}
  soundBlocked: false,
  left: false,
  hold() { call.held ??= []; },
  release() {
    const held = call.held ?? [];
    call.held = null;
    for (const message of held) receiveSignal(message);
  },
  summary,
};
window.call = call;

fillIcons();
if (ROOM_NAME.test(room)) start();
else end("This is not a call link.", "Call links look like /call/amber-otter-4821. Start one from the home page.", { rejoin: false });

async function start() {
  $("room-name").textContent = room;
  document.title = `${room} · tether call`;
  call.stream = await openMedia();
  wireControls();
  new ResizeObserver(layout).observe($("grid"));
  render();
  // No `persist`: a reload makes new RTCPeerConnections anyway, so the page ends its session
  // when it goes away (the others see a leave at once, not a ghost for the resume window).
  const client = (call.client = connect("/ws", { backoff: { base: 0.5, cap: 8 } }));
  call.connectionLog = watch(client, $("conn"));
  client.addEventListener("open", opened);
  client.addEventListener("resumed", ({ detail }) => {
    call.resumes.push(detail.resumed);
    if (!detail.resumed) newSession();
  });
  client.addEventListener("gap", ({ detail }) => missed(detail));
  client.addEventListener("close", () => render());
  client.on("presence", (diff, where) => {
    if (where !== room) return;
    call.presenceLog.push({ event: diff.event, id: diff.id });
    changed(() => call.roster.apply(diff));
  });
  client.on("signal", receiveSignal);
  client.on("chat", (line, where) => { if (where === room) addChat([line]); });
  addEventListener("pagehide", () => { if (!call.left) client.close(); });
  addEventListener("pageshow", (event) => { if (event.persisted) location.reload(); }); // back from the bfcache
}

async function openMedia() {
  if (!navigator.mediaDevices) {
    me.mic = me.cam = false;
    notice("Camera and microphone need https (or localhost): you can watch, listen and chat.");
    return null;
  }
  try {
    return await navigator.mediaDevices.getUserMedia({ audio: true, video: VIDEO });
  } catch (error) {
    for (const [constraints, off, text] of [[{ audio: true }, "cam", "No camera"], [{ video: VIDEO }, "mic", "No microphone"]]) {
      try {
        const stream = await navigator.mediaDevices.getUserMedia(constraints);
        me[off] = false;
        notice(`${text} (${error.name}): the others see what you have.`);
        return stream;
      } catch { /* try the next */ }
    }
    me.mic = me.cam = false;
    notice(`No camera or microphone (${error.name}): you can watch, listen and chat.`);
    return null;
  }
}

// -- the connection -----------------------------------------------------------------------------

/** A connection is open: join the first time and after a new session; otherwise (resumed)
 * the server kept us in the call, and only chat lines typed meanwhile may be waiting. */
function opened() {
  if (call.myId === null) join();
  else flushChat();
}

/** The session is gone (with it our member id and our place in the call): join again. */
function newSession() {
  call.session += 1;
  call.myId = null;
  call.joining = false;
  call.early = [];
  call.roster.reset(); // shown as last known until the join reply
  render();
}

/** A gap: messages that will never come. */
function missed({ room: where, reason }) {
  call.gaps.push({ room: where, reason });
  if (where === room && reason === "session") return newSession();
  if (where === room) return refresh(); // presence changes or chat lines we missed: fetch them
  if (where === null) { // signals lost: negotiate every peer connection again
    for (const peer of call.peers.values()) peer.restartIce();
  }
}

async function join() {
  if (call.joining) return;
  call.joining = true;
  const session = call.session;
  try {
    const [config, reply] = await Promise.all([
      call.client.request("config", null, WAIT),
      call.client.request("join", { room, meta: me }, WAIT),
    ]);
    if (session !== call.session) return;
    call.iceServers = config.iceServers;
    call.myId = call.selfId = reply.id;
    call.myIds.add(reply.id);
    changed(() => call.roster.sync(reply.presence));
    for (const message of call.early.splice(0)) receiveSignal(message);
    call.joining = false;
    flushChat();
    await loadHistory(session);
  } catch (error) {
    if (session !== call.session) return; // a new session: it joins again
    call.joining = false;
    if (error.name !== "ReplyError") return;
    if (error.code === "call_full") {
      call.client.close();
      end("This call is full.", error.message, { rejoin: true });
    } else {
      notice(error.message);
    }
  }
}

/** After a gap in the call's stream: the presence list and the chat's history again. */
async function refresh() {
  const session = call.session;
  call.roster.unsync(); // diffs from now on wait for the list
  try {
    const presence = await call.client.request("presence", { room }, WAIT);
    if (session === call.session) changed(() => call.roster.sync(presence));
    await loadHistory(session);
  } catch { /* a new session: it joins again */ }
}

async function loadHistory(session) {
  const mark = call.chat.mark();
  const lines = await call.client.request("history", null, WAIT);
  if (session === call.session && call.chat.merge(lines, mark)) renderChat();
}

/** Apply a presence change, then bring the peer connections and the page in line. */
function changed(update) {
  update();
  syncPeers();
  render();
}

function syncPeers() {
  const { roster, myId, peers } = call;
  if (!roster.synced || myId === null) return;
  for (const [id, peer] of peers) {
    if (peer.self !== myId || !roster.has(id)) {
      peer.close();
      peers.delete(id);
    }
  }
  const self = { id: myId, meta: roster.get(myId) };
  if (self.meta === undefined) return;
  for (const [id, meta] of roster.entries()) {
    if (id === myId || peers.has(id)) continue;
    const peer = new Peer({
      id,
      polite: isPolite(self, { id, meta }),
      stream: call.stream,
      iceServers: call.iceServers,
      send: (signal) => sendSignal(myId, id, signal),
      onChange: () => render(),
    });
    peer.self = myId;
    peers.set(id, peer);
  }
}

function sendSignal(from, to, signal) {
  // Only in the session the peer was made for (a new one has another member id). While the
  // socket is down it waits in the client's outbox and goes out when the session resumes.
  if (from === call.myId && !call.left) call.client.send("signal", { to, ...signal });
}

function receiveSignal(message) {
  if (call.held !== null) return void call.held.push(message);
  if (call.myId === null) {
    call.early.push(message);
    if (call.early.length > EARLY_SIGNALS) call.early.shift();
    return;
  }
  const { from, ...signal } = message;
  call.peers.get(from)?.receive(signal); // unknown: not (or no longer) in the call
}

// -- what the user does -------------------------------------------------------------------------

function wireControls() {
  $("mic").addEventListener("click", () => setMedia("mic", !me.mic));
  $("cam").addEventListener("click", () => setMedia("cam", !me.cam));
  $("leave").addEventListener("click", leave);
  $("copy-link").addEventListener("click", copyLink);
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("chat-text").value.trim();
    if (text) say(text);
    $("chat-text").value = "";
  });
  $("sound").querySelector("button").addEventListener("click", enableSound);
}

function setMedia(kind, on) {
  const tracks = (kind === "mic" ? call.stream?.getAudioTracks() : call.stream?.getVideoTracks()) ?? [];
  if (tracks.length === 0) return;
  for (const track of tracks) track.enabled = on;
  me[kind] = on;
  publishState();
}

function rename(name) {
  name = name.trim().slice(0, 40);
  if (!name || name === me.name) return render();
  me.name = name;
  localStorage.setItem(NAME_KEY, name);
  publishState();
}

function publishState() {
  render();
  // Not in the call: the next join carries `me`. While the socket is down it waits for the resume.
  const id = call.myId;
  if (id === null) return;
  call.client.request("state", me, WAIT).then(
    (meta) => { if (id === call.myId) changed(() => call.roster.apply({ event: "update", id, meta })); },
    () => {}, // a new session: its join carries `me`
  );
}

function say(text) {
  call.unsent.push(text);
  renderChat();
  flushChat();
}

/** Say the waiting chat lines, one at a time, while in the call. While the socket is down a
 * line waits in the client's outbox and goes out when the session resumes; a line that a new
 * session cut off (it may or may not have been said) or that reached the server before our
 * join again is sent once we are back in the call. */
async function flushChat() {
  if (call.sending) return;
  call.sending = true;
  try {
    while (call.myId !== null && call.unsent.length > 0 && !call.left) {
      try {
        addChat([await call.client.request("chat", { text: call.unsent[0] }, WAIT)]);
      } catch (error) {
        if (error.name !== "ReplyError" || error.code === "not_in_call") break; // after the next join
        notice(error.message); // refused: dropped
      }
      call.unsent.shift();
    }
  } finally {
    call.sending = false;
    renderChat();
  }
}

function addChat(lines) {
  if (call.chat.add(lines)) renderChat();
}

async function leave() {
  call.left = true;
  try {
    if (call.myId !== null) await call.client.request("leave", { room }, { timeout: 2000 });
  } catch { /* closing anyway */ }
  call.client.close();
  for (const peer of call.peers.values()) peer.close();
  call.peers.clear();
  for (const track of call.stream?.getTracks() ?? []) track.stop();
  end("You left the call.", `The others in ${room} carry on without you.`);
}

async function copyLink() {
  const label = $("copy-link").querySelector("span");
  try {
    await navigator.clipboard.writeText(callLink(room));
    label.textContent = "Copied";
  } catch {
    label.textContent = callLink(room); // no clipboard here: show it to copy by hand
  }
  setTimeout(() => { label.textContent = "Copy link"; }, 2500);
}

function enableSound() {
  call.soundBlocked = false;
  $("sound").hidden = true;
  for (const video of document.querySelectorAll(".tile.remote video")) {
    video.muted = false;
    video.play().catch(() => {});
  }
}

// -- drawing ------------------------------------------------------------------------------------

function render() {
  if (call.left) return;
  renderGrid();
  renderPeople();
  renderControls();
}

/** The others in the roster shown (the last one known while reconnecting), in seat order. */
function others() {
  return call.roster.entries().filter(([id]) => id !== call.selfId);
}

function renderGrid() {
  const grid = $("grid");
  const tiles = [["me", { ...me, seat: 0 }], ...others()];
  if (grid.dataset.count !== String(tiles.length)) {
    grid.dataset.count = String(tiles.length);
    layout();
  }
  keyed(grid, tiles, (id) => newTile(id), (tile, [id, meta]) => {
    const peer = id === "me" ? null : call.peers.get(id);
    const stream = id === "me" ? call.stream : peer?.remote ?? null;
    const showVideo = Boolean(meta.cam && stream?.getVideoTracks().length);
    tile.classList.toggle("no-video", !showVideo);
    tile.querySelector(".name").textContent = id === "me" ? `${me.name} (you)` : meta.name;
    tile.querySelector(".avatar span").textContent = initials(meta.name);
    tile.querySelector(".avatar").style.setProperty("--hue", hue(meta.name));
    tile.querySelector(".mic-off").hidden = meta.mic;
    const link = id === "me" ? "" : peerLabel(peer);
    tile.querySelector(".link").textContent = link;
    tile.querySelector(".link").hidden = !link;
    attach(tile.querySelector("video"), stream, id === "me");
  });
}

function layout() {
  const grid = $("grid");
  const { tile, tileHeight } = bestGrid(Number(grid.dataset.count), grid.clientWidth, grid.clientHeight);
  grid.style.setProperty("--tile", `${Math.max(tile, 120)}px`);
  grid.style.setProperty("--tile-height", `${Math.max(tileHeight, 68)}px`);
}

function peerLabel(peer) {
  if (!peer || call.myId === null) return "Reconnecting…";
  return { new: "Connecting…", connecting: "Connecting…", connected: "", disconnected: "Connection lost…", failed: "Reconnecting media…", closed: "" }[peer.state] ?? "";
}

function newTile(id) {
  const tile = document.createElement("figure");
  tile.className = id === "me" ? "tile local" : "tile remote";
  tile.innerHTML = `<video autoplay playsinline></video>
    <div class="avatar"><span></span></div>
    <figcaption><span class="mic-off" title="Muted">${icon("micOff", { size: 16 })}</span><span class="name"></span></figcaption>
    <span class="link"></span>`;
  return tile;
}

function attach(video, stream, local) {
  if (video.srcObject === stream) return;
  video.srcObject = stream;
  video.muted = local || call.soundBlocked;
  video.play().catch((error) => {
    if (error.name !== "NotAllowedError" || local) return;
    call.soundBlocked = true; // autoplay with sound needs a click on this page first
    $("sound").hidden = false;
    video.muted = true;
    video.play().catch(() => {});
  });
}

function renderPeople() {
  const entries = call.roster.size > 0 && call.selfId !== null
    ? [...call.roster.entries()].sort(([a], [b]) => (b === call.selfId) - (a === call.selfId)) // you first
    : [["me", { ...me, seat: 0 }]];
  $("people-count").textContent = String(entries.length);
  keyed($("people"), entries, (id) => newPerson(id), (item, [id, meta]) => {
    const mine = id === call.selfId || id === "me";
    item.classList.toggle("mine", mine);
    const shown = mine ? me : meta;
    const input = item.querySelector("input");
    input.hidden = !mine;
    if (mine && document.activeElement !== input) input.value = me.name;
    item.querySelector(".name").hidden = mine;
    item.querySelector(".name").textContent = meta.name;
    item.querySelector(".avatar span").textContent = initials(shown.name);
    item.querySelector(".avatar").style.setProperty("--hue", hue(shown.name));
    item.querySelector(".state").innerHTML =
      (shown.mic ? icon("mic", { size: 16, label: "mic on" }) : `<span class="off">${icon("micOff", { size: 16, label: "muted" })}</span>`) +
      (shown.cam ? icon("cam", { size: 16, label: "camera on" }) : `<span class="off">${icon("camOff", { size: 16, label: "camera off" })}</span>`);
    item.dataset.mic = String(shown.mic);
    item.dataset.cam = String(shown.cam);
    const peer = call.peers.get(id);
    item.dataset.link = mine ? "self" : peer?.state ?? "none";
  });
}

function newPerson(id) {
  const item = document.createElement("li");
  item.innerHTML = `<span class="avatar sm"><span></span></span>
    <span class="name"></span>
    <label class="rename"><input maxlength="40" aria-label="Your name" spellcheck="false">${icon("edit", { size: 14 })}</label>
    <span class="state"></span>`;
  const input = item.querySelector("input");
  input.addEventListener("change", () => rename(input.value));
  input.addEventListener("keydown", (event) => { if (event.key === "Enter") input.blur(); });
  return item;
}

function renderControls() {
  for (const [kind, on, onText, offText, tracks] of [
    ["mic", me.mic, "Mute", "Unmute", call.stream?.getAudioTracks() ?? []],
    ["cam", me.cam, "Stop video", "Start video", call.stream?.getVideoTracks() ?? []],
  ]) {
    const button = $(kind);
    button.classList.toggle("off", !on);
    button.setAttribute("aria-pressed", String(!on));
    button.disabled = tracks.length === 0;
    button.querySelector(".text").textContent = on ? onText : offText;
  }
}

function renderChat() {
  const list = $("chat-lines");
  const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const lines = call.chat.lines.map((line) => ({ key: `line:${line.id}`, line }));
  const unsent = call.unsent.map((text, index) => ({ key: `unsent:${index}:${text}`, line: { name: me.name, text, from: "me" } }));
  keyed(list, [...lines, ...unsent].map((entry) => [entry.key, entry.line]), () => newLine(), (item, [key, line]) => {
    const mine = line.from === "me" || call.myIds.has(line.from);
    item.classList.toggle("mine", mine);
    item.classList.toggle("unsent", key.startsWith("unsent:"));
    item.querySelector(".who").textContent = mine ? "You" : line.name;
    item.querySelector("time").textContent = line.at ? new Date(line.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "sending…";
    item.querySelector(".text").textContent = line.text;
  });
  if (stick) list.scrollTop = list.scrollHeight;
}

function newLine() {
  const item = document.createElement("li");
  item.innerHTML = `<div class="line-meta"><span class="who"></span><time></time></div><div class="text"></div>`;
  return item;
}

/** Make `container`'s children match `entries` ([key, value]) in order, reusing them by key. */
function keyed(container, entries, create, update) {
  const existing = new Map([...container.children].map((element) => [element.dataset.id, element]));
  entries.forEach((entry, index) => {
    const key = entry[0];
    let element = existing.get(key);
    if (element === undefined) {
      element = create(key);
      element.dataset.id = key;
    }
    existing.delete(key);
    if (container.children[index] !== element) container.insertBefore(element, container.children[index] ?? null);
    update(element, entry);
  });
  for (const element of existing.values()) element.remove();
}

function hue(name) {
  let h = 0;
  for (const char of name) h = (h * 31 + char.codePointAt(0)) % 360;
  return String(h);
}

function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

function end(title, text, { rejoin = true } = {}) {
  document.body.classList.add("is-ended");
  $("ended-title").textContent = title;
  $("ended-text").textContent = text;
  $("rejoin").hidden = !rejoin;
  $("rejoin").href = callLink(room);
  $("ended").hidden = false;
}

/** A JSON-able picture of the call, for tests and the console. */
function summary() {
  return {
    myId: call.myId,
    session: call.session,
    connection: call.client?.state ?? null,
    roster: call.roster.entries().map(([id, meta]) => ({ id, ...meta })),
    peers: [...call.peers.values()].map((peer) => ({ id: peer.id, polite: peer.polite, state: peer.state, stats: { ...peer.stats } })),
    chat: call.chat.lines.map((line) => line.text),
  };
}
