"""`tether schema`: the AsyncAPI document is valid for the official parser, the TypeScript compiles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import tether
from tether.schema import asyncapi, typescript

ROOT = Path(__file__).resolve().parent.parent
TS = ROOT / "tests" / "ts"


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tether", "schema", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class Point(msgspec.Struct):
    x: int
    y: int = 0


def _app() -> tether.App:
    app = tether.App()

    @app.on("move")
    def move(conn: tether.Conn, data: Point) -> list[Point]:
        return [data]

    @app.on("ping")
    def ping(conn: tether.Conn) -> None:
        return None

    app.emits("moved", Point)
    return app


def test_asyncapi_lists_every_message_type_with_its_schema():
    doc = asyncapi(_app(), title="t")
    assert doc["asyncapi"] == "3.0.0"
    assert set(doc["operations"]) == {"move", "ping", "push.moved"}
    assert doc["operations"]["move"]["action"] == "receive"
    assert doc["operations"]["push.moved"]["action"] == "send"
    point = doc["components"]["schemas"]["Point"]
    assert point["required"] == ["x"] and point["properties"]["x"]["type"] == "integer"
    payload = doc["components"]["messages"]["move"]["payload"]
    assert payload["properties"]["data"] == {"$ref": "#/components/schemas/Point"}


def test_typescript_declares_send_request_and_receive():
    ts = typescript(_app())
    assert "export type Point = { x: number; y?: number };" in ts
    assert "move: { data: Point; reply: Array<Point> };" in ts
    assert "moved: Point;" in ts


def test_cli_asyncapi_document_is_valid_for_the_asyncapi_parser(tmp_path):
    doc = tmp_path / "chat.json"
    doc.write_text(_cli("examples.chat.app:app", "--address", "/chat"))
    assert json.loads(doc.read_text())["channels"]["socket"]["address"] == "/chat"
    done = subprocess.run(
        ["node", str(TS / "validate-asyncapi.mjs"), str(doc)], cwd=TS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid AsyncAPI 3.0.0" in done.stdout


def test_cli_asyncapi_parser_rejects_a_broken_document(tmp_path):
    """The validator itself can fail: a document without channels' messages is rejected."""
    doc = json.loads(_cli("examples.chat.app:app"))
    doc["operations"]["nick"]["channel"] = {"$ref": "#/channels/missing"}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run(["node", str(TS / "validate-asyncapi.mjs"), str(path)], cwd=TS, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0


def test_cli_typescript_compiles_against_tether_d_ts(tmp_path):
    shutil.copy(ROOT / "src" / "tether" / "static" / "tether.d.ts", tmp_path / "tether.d.ts")
    shutil.copy(TS / "usage.ts", tmp_path / "usage.ts")
    (tmp_path / "schema.ts").write_text(_cli("examples.chat.app:app", "--typescript"))
    tsc = TS / "node_modules" / ".bin" / "tsc"
    done = subprocess.run(
        [str(tsc), "--noEmit", "--strict", "--target", "es2022", "--module", "es2022", "--moduleResolution", "bundler",
         "usage.ts"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_cli_rejects_something_that_is_not_an_app():
    done = subprocess.run(
        [sys.executable, "-m", "tether", "schema", "examples.chat.app:members"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "is not a tether.App" in done.stderr


@pytest.mark.parametrize(
    ("command", "target", "says"),
    [
        ("schema", "examples.chat.app", "expected module:attribute"),
        ("schema", "examples.chat.app:nothing", "has no attribute 'nothing'"),
        ("schema", "no_such_module:app", "no such module"),
        ("run", "examples.chat.app:nothing", "has no attribute 'nothing'"),
        ("run", "no_such_module:app", "no such module"),
    ],
)
def test_cli_bad_target_is_one_line_and_exit_2(command, target, says):
    done = subprocess.run([sys.executable, "-m", "tether", command, target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("tether: ") and says in done.stderr
