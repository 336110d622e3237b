"""``tether run`` as users run it: the command in a child process (``python -m tether run``).

A typed app served and a request answered; options from ``TETHER_*`` variables; ``--factory``;
``--workers 2 --broker redis://`` (a real redis-server) serving one room across both
processes; ``--reload`` restarting on a file change; bad targets and bad combinations as one
line and exit code 2; SIGTERM and SIGINT draining connections (1001) and exiting 0; JSON logs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import tether
from tests.conftest import timeout
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401
from tests.tether_run import ROOT, SERVERS, TetherRun, Typed, get, tether_run  # noqa: F401

Run = Callable[..., TetherRun]


async def test_run_serves_a_typed_app_and_answers_a_request(tether_run: Run) -> None:
    proc = await tether_run("ops_app:app").start()
    async with timeout(10), tether.connect(proc.url()) as conn:
        client = Typed(conn)
        assert await client.request("echo", {"n": 7}) == {"n": 7}
        who = await client.request("whoami")
    assert who["pid"] == proc.proc.pid  # type: ignore[union-attr]
    assert (await get(proc.http("/health"))).status_code == 200


async def test_run_takes_every_option_from_tether_environment_variables(tether_run: Run) -> None:
    env = {"TETHER_APP": "ops_app:make_app", "TETHER_FACTORY": "true", "TETHER_APP_DIR": str(SERVERS), "TETHER_PORT": "0",
           "TETHER_LOG_FORMAT": "json", "TETHER_WS_PING_INTERVAL": "0.25", "TETHER_METRICS": "false"}
    proc = await tether_run(env=env, bare=True).start()  # nothing on the command line
    async with timeout(10), tether.connect(proc.url()) as conn:
        welcome = json.loads(await conn.receive())
        assert welcome["data"]["heartbeat"]["interval"] == 0.25
        assert await Typed(conn).request("echo", 1) == 1
    assert proc.records and len(proc.records) == len(proc.lines), "TETHER_LOG_FORMAT=json: every line is a JSON object"
    assert (await get(proc.http("/metrics"))).status_code == 404  # TETHER_METRICS=false


def test_every_run_option_has_a_tether_environment_variable() -> None:
    from tether.cli import build_parser

    parser = build_parser({})
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = [a.option_strings[0] for a in run._actions if a.option_strings and a.option_strings[0] != "-h"]
    env_of = run.get_default("env_of")
    assert sorted(flags) == sorted(env_of)
    assert all(env.startswith("TETHER_") for env in env_of.values())
    for action in run._actions:
        if action.option_strings and action.option_strings[0] != "-h":
            assert env_of[action.option_strings[0]] in (action.help or ""), action.option_strings
    # What users of uvicorn look for is there.
    for flag in ("--host", "--port", "--workers", "--factory", "--reload", "--ssl-certfile", "--ssl-keyfile",
                 "--proxy-headers", "--forwarded-allow-ips", "--ws-ping-interval", "--ws-ping-timeout",
                 "--log-level", "--log-format", "--broker", "--static", "--timeout-graceful-shutdown"):
        assert flag in env_of


def test_workers_default_comes_from_web_concurrency() -> None:
    from tether.cli import build_parser

    args = build_parser({"WEB_CONCURRENCY": "3"}).parse_args(["run", "x:y"])
    assert args.workers == 3
    args = build_parser({"WEB_CONCURRENCY": "3", "TETHER_WORKERS": "2"}).parse_args(["run", "x:y"])
    assert args.workers == 2
    assert build_parser({"TETHER_WORKERS": "2"}).parse_args(["run", "x:y", "--workers", "4"]).workers == 4


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["no_such_module:app"], "no such module"),
        (["ops_app:nothing"], "has no attribute 'nothing'"),
        (["ops_app"], "expected module:attribute"),
        (["ops_app:make_app"], "a factory? add --factory"),
        (["ops_app:Say"], "is not an App, a handler or a dict of routes"),
        (["ops_app:app", "--reload", "--workers", "2"], "--reload runs one process"),
        (["ops_app:app", "--workers", "2"], "needs a shared --broker"),
        (["ops_app:app", "--ssl-keyfile", "key.pem"], "--ssl-keyfile needs --ssl-certfile"),
        (["ops_app:app", "--ssl-certfile", "/nonexistent.pem"], "cannot load the TLS certificate"),
        ([], "no app"),
    ],
)
def test_run_bad_target_or_options_is_one_line_and_exit_2(args: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tether", "run", "--app-dir", str(SERVERS), *args, "--port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("tether: ") and says in done.stderr, done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_drains_on_signal_and_exits_0(tether_run: Run, sig: int) -> None:
    proc = await tether_run("ops_app:app", "--timeout-graceful-shutdown", "3").start()
    async with timeout(15), tether.connect(proc.url()) as conn:
        assert await Typed(conn).request("echo", "x") == "x"
        proc.signal(sig)
        with pytest.raises(tether.ConnectionClosed) as closed:
            while True:
                await conn.receive()
        assert closed.value.code == 1001
    assert await proc.wait(15) == 0
    assert any("shutting down" in line for line in proc.lines)


async def test_run_logs_connections_as_json(tether_run: Run) -> None:
    proc = await tether_run("ops_app:app").start()
    async with timeout(10), tether.connect(proc.url()) as conn:
        await Typed(conn).request("echo", 1)
    opened = await proc.wait_for(lambda r: r.get("event") == "open")
    closed = await proc.wait_for(lambda r: r.get("event") == "close")
    assert opened["logger"] == "tether.access" and opened["path"] == "/ws" and opened["remote"].startswith("127.0.0.1:")
    assert closed["code"] == 1000 and closed["duration_seconds"] > 0 and closed["remote"] == opened["remote"]
    assert {"time", "level", "message"} <= closed.keys() and closed["level"] == "info"


async def test_run_no_access_log_silences_connection_lines(tether_run: Run) -> None:
    proc = await tether_run("ops_app:app", "--no-access-log").start()
    async with timeout(10), tether.connect(proc.url()) as conn:
        await Typed(conn).request("echo", 1)
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
    assert not [r for r in proc.records if r.get("logger") == "tether.access"]
    assert any(r.get("message") == "shutting down" for r in proc.records)


async def test_run_serves_tls_with_certificate_files(tether_run: Run, tmp_path: Path) -> None:
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    proc = await tether_run("ops_app:app", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)).start()
    assert proc.scheme == "https"
    context = ssl.create_default_context(cafile=str(cert))
    async with timeout(10), tether.connect(proc.url(), ssl=context) as conn:
        assert await Typed(conn).request("echo", "tls") == "tls"


@pytest.mark.redis
async def test_run_two_workers_with_redis_serve_one_room(tether_run: Run, redis_server: RedisServer) -> None:  # noqa: F811
    proc = await tether_run("ops_app:app", "--workers", "2", "--broker", redis_server.url).start(30)
    clients: list[Typed] = []
    pids: dict[int, Typed] = {}
    try:
        async with timeout(30):
            for _ in range(40):  # SO_REUSEPORT spreads connections by hash: both workers appear soon
                conn = await tether.connect(proc.url(query="room=lobby"))
                client = Typed(conn)
                clients.append(client)
                pids.setdefault((await client.request("whoami"))["pid"], client)
                if len(pids) == 2:
                    break
            assert len(pids) == 2, "both workers serve the port"
            sender, receiver = pids.values()
            await sender.request("say", {"room": "lobby", "text": "across"})
            said = await receiver.event("said")
            assert said["data"]["text"] == "across"
            assert said["data"]["pid"] != (await receiver.request("whoami"))["pid"]  # broadcast by the other worker
    finally:
        for client in clients:
            await client.conn.close()
    proc.signal(signal.SIGTERM)
    assert await proc.wait(30) == 0


APP_V1 = '''
import tether

app = tether.App()


@app.on("version")
def version(conn):
    return "{version}"
'''


async def test_run_reload_restarts_on_a_source_change(tether_run: Run, tmp_path: Path) -> None:
    module = tmp_path / "live_app.py"
    module.write_text(APP_V1.format(version="one"))
    proc = await tether_run("live_app:app", "--app-dir", str(tmp_path), "--reload", "--timeout-graceful-shutdown", "1", cwd=tmp_path).start()

    async def version() -> str | None:
        try:
            async with tether.connect(proc.url("/")) as conn:
                return str(await Typed(conn).request("version"))
        except (OSError, tether.TetherError):
            return None  # between two servers

    assert await version() == "one"
    module.write_text(APP_V1.format(version="two"))
    async with timeout(30):
        while (seen := await version()) != "two":
            assert seen in ("one", None)
            await asyncio.sleep(0.1)  # polling the condition: the new server answers
    assert any("changed; restarting" in line for line in proc.lines)
    proc.signal(signal.SIGTERM)
    assert await proc.wait(30) == 0
