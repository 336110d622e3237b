// The start page: make a call name, show its link, or go to a call by name or link.
import { fillIcons } from "./icons.js";
import { callLink, randomRoom, toRoomName } from "./names.js";

fillIcons();
const $ = (id) => document.getElementById(id);

$("new-call").addEventListener("click", () => {
  const link = callLink(randomRoom());
  $("link").value = link;
  $("join-new").href = link;
  $("share").hidden = false;
  $("link").select();
});

$("copy").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText($("link").value);
    $("copy").querySelector("span").textContent = "Copied";
  } catch {
    $("link").select(); // no clipboard access (plain http on another host): let the user copy
  }
});

$("join-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const room = toRoomName($("room").value);
  $("room-error").hidden = room !== null;
  if (room !== null) location.assign(callLink(room));
});
