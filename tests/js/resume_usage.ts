// Compiled by tests/js/types.test.mjs against tether.d.ts: the session API as an app uses it.
import { connect, RoomCursor, Session, SESSION_TAKEN } from "./tether";
import type { GapDetail, ResumedDetail, SessionSnapshot, StorageLike } from "./tether";

const client = connect("wss://example.com/ws", { resume: true, ackDelay: 500, persist: "sessionStorage", persistKey: "chat" });
client.on("said", (data, room) => {
  const where: string | null = room;
  return [data, where];
});
client.on("said", (data) => data); // the room may be ignored
client.addEventListener("resumed", (event) => {
  const detail: ResumedDetail = event.detail;
  const lost: number = detail.lostMessages;
  return detail.resumed ? 0 : lost;
});
client.addEventListener("gap", (event) => {
  const detail: GapDetail = event.detail;
  if (detail.reason === "session" && detail.room !== null) return client.request("join", { room: detail.room });
  return null;
});
const emitted: Promise<void> = client.emit("said", { text: "hi" }); // waits for room, never drops
connect("/ws", { maxBufferedAmount: 1 << 20 });
// @ts-expect-error: maxBufferedAmount is a number of bytes
connect("/ws", { maxBufferedAmount: "1M" });
const memory: StorageLike = { getItem: () => null, setItem: () => {}, removeItem: () => {} };
connect("/ws", { persist: memory, resume: false });
// @ts-expect-error: only sessionStorage by name (localStorage would share one session between tabs)
connect("/ws", { persist: "localStorage" });
// @ts-expect-error: ackDelay is a number of ms
connect("/ws", { ackDelay: "1s" });

const session = new Session<string>({ resume: true });
const welcome = session.welcomed({ id: "s1", token: "tok", resumed: false, ack: 0, window: 120 });
const resend: string[] = welcome.resend;
const payload: string | null = session.wrote(null, '{"type":"a"}');
const saved: SessionSnapshot | null = session.snapshot({ maxMessages: 10 });
if (saved !== null) session.restore(saved);
const fresh: boolean = new RoomCursor("e1", 1).receive(2) && session.roomMessage("lobby", null);
const taken: 4009 = SESSION_TAKEN;
void [emitted, resend, payload, fresh, taken, session.positions(), session.offer(), session.ackDue(), welcome.lostMessages];
