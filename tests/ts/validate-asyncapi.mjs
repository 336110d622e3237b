// Validates an AsyncAPI document (path in argv[2]) with the official parser; prints diagnostics.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(process.argv[2], "utf8"));
const errors = diagnostics.filter((d) => d.severity === 0);
for (const d of errors) console.log(`${d.path.join(".")}: ${d.message}`);
if (!document || errors.length) process.exit(1);
console.log(`valid AsyncAPI ${document.version()}: ${document.operations().length} operations`);
