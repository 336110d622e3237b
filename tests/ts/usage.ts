// Compiled by tests/test_schema.py with the generated schema.ts beside it.
import { connect } from "./tether";
import type { AppSchema } from "./schema";

const client = connect<AppSchema>("ws://127.0.0.1:8000/chat");
client.on("said", (data) => {
  const who: string = data.name;
  const text: string = data.text;
  return who + text;
});
client.send("say", { text: "hi" });
async function rename(): Promise<string> {
  return await client.request("nick", { name: "alice" });
}
void rename;
// @ts-expect-error: "say" needs {text: string}
client.send("say", { text: 42 });
// @ts-expect-error: no such message type
client.send("shout", { text: "hi" });
