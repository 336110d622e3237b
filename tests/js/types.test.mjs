// tether.d.ts compiles with the session API as an app uses it (tests/js/resume_usage.ts),
// with the TypeScript pinned in tests/ts (installed by `make deps`).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const here = (path) => fileURLToPath(new URL(path, import.meta.url));
const TSC = here("../ts/node_modules/.bin/tsc");

test("tether.d.ts types the session API: options, emit, resumed and gap events, (data, room) handlers, Session", () => {
  const dir = mkdtempSync(join(tmpdir(), "tether-dts-"));
  try {
    copyFileSync(here("../../src/tether/static/tether.d.ts"), join(dir, "tether.d.ts"));
    copyFileSync(here("./resume_usage.ts"), join(dir, "usage.ts"));
    const args = ["--noEmit", "--strict", "--target", "es2022", "--module", "es2022", "--moduleResolution", "bundler", "--lib", "es2022,dom", "usage.ts"];
    try {
      execFileSync(TSC, args, { cwd: dir, encoding: "utf8", timeout: 120_000 });
    } catch (error) {
      assert.fail(`tsc: ${error.stdout}${error.stderr}`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
