// Call names and default display names. Pure functions; `random` is injectable for tests.

/** The server's rule (examples/call/app.py ROOM_NAME): 3-64 of a-z, 0-9 and inner dashes. */
export const ROOM_NAME = /^[a-z0-9][a-z0-9-]{1,62}[a-z0-9]$/;

const ADJECTIVES = [
  "amber", "brisk", "calm", "clever", "coral", "crisp", "dusky", "eager", "gentle", "golden",
  "hazel", "jolly", "lively", "lucky", "mellow", "misty", "noble", "olive", "quiet", "rapid",
  "rosy", "rustic", "sandy", "silver", "snowy", "sunny", "swift", "tidy", "velvet", "witty",
];
const ANIMALS = [
  "badger", "beaver", "bison", "crane", "dolphin", "falcon", "ferret", "finch", "fox", "gecko",
  "heron", "ibex", "koala", "lemur", "lynx", "marten", "moose", "newt", "otter", "owl",
  "panda", "puffin", "quail", "raven", "robin", "seal", "stoat", "tapir", "walrus", "wren",
];

const pick = (list, random) => list[Math.floor(random() * list.length)];
const capitalize = (word) => word[0].toUpperCase() + word.slice(1);

/** A fresh call name such as "amber-otter-4821" (about 9 million of them). */
export function randomRoom(random = Math.random) {
  const number = String(Math.floor(random() * 10000)).padStart(4, "0");
  return `${pick(ADJECTIVES, random)}-${pick(ANIMALS, random)}-${number}`;
}

/** A display name until the user picks one, such as "Swift Heron". */
export function randomName(random = Math.random) {
  return `${capitalize(pick(ADJECTIVES, random))} ${capitalize(pick(ANIMALS, random))}`;
}

/** "Amber Otter" -> "AO": the avatar shown while a camera is off. */
export function initials(name) {
  const words = name.trim().split(/\s+/).filter(Boolean);
  return (words.length > 1 ? words[0][0] + words.at(-1)[0] : (words[0] ?? "?").slice(0, 2)).toUpperCase();
}

/** The link of a call, e.g. http://127.0.0.1:8000/call/amber-otter-4821. */
export function callLink(room, origin = location.origin) {
  return `${origin}/call/${encodeURIComponent(room)}`;
}

/** The room of a call page's address: /call/<room> (or an older /call?room=<room>). */
export function roomOf({ pathname, search }) {
  const path = pathname.match(/^\/call\/([^/]+)\/?$/);
  if (path) return decodeURIComponent(path[1]);
  return new URLSearchParams(search).get("room") ?? "";
}

/** What a user typed (a name like "Team Sync!" or a pasted link) as a call name, or null. */
export function toRoomName(text) {
  const link = text.match(/\/call\/([^/?#\s]+)/) ?? text.match(/[?&]room=([^&#\s]+)/); // a pasted link
  const words = link ? decodeURIComponent(link[1]) : text;
  const name = words.trim().toLowerCase().replace(/[^a-z0-9]+/g, "-").slice(0, 64).replace(/^-+|-+$/g, "");
  return ROOM_NAME.test(name) ? name : null;
}
