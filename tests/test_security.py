"""Origin policy and the auth hook over real sockets, and both in headless Chromium.

Origin: same-origin by default, an allow-list, ``*``; a cross-site handshake gets 403 and no
upgrade; clients that send no Origin (non-browsers) pass. Auth: a sync hook answers 401/403
before the upgrade; an async one closes with 4001 after it; handlers see ``conn.identity``;
tokens come from the Authorization header, the query, a cookie or the ``Sec-WebSocket-Protocol``
trick; an identity's ``expires_at`` closes the connection with 4002 and clients reconnect with
a fresh token. Basic origin cases live in test_server.py; these add what it does not cover.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import tether
from conftest import TIMEOUT_SCALE, ServerFactory, assert_serves, echo, timeout, url
from rawws import OP_TEXT, RawWS
from tether.proto.backoff import Backoff

MS = int(10_000 * TIMEOUT_SCALE)  # Playwright waits, in ms

# -- origin -------------------------------------------------------------------------------


async def handshake(server: tether.Server, headers: dict[str, str | None], path: str = "/socket") -> RawWS:
    ws = await RawWS.connect(server.port)
    async with timeout(5):
        await ws.handshake(path, headers)
    return ws


async def assert_refused(ws: RawWS, status: int) -> None:
    """Refused with ``status``: no upgrade headers, and the socket carries no WebSocket."""
    assert ws.status == status
    assert "sec-websocket-accept" not in ws.headers and "upgrade" not in ws.headers
    async with timeout(5):
        assert await ws.eof()  # picows closes after an error response
    await ws.aclose()


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://127.0.0.1.evil.example:{port}",
        "http://127.0.0.1:{port}.evil.example",
        "null",  # sandboxed iframes and file: pages
    ],
)
async def test_server_cross_site_origin_is_refused_403_without_upgrade(echo_server: tether.Server, origin: str) -> None:
    port = echo_server.port
    ws = await handshake(echo_server, {"Host": f"127.0.0.1:{port}", "Origin": origin.format(port=port)})
    await assert_refused(ws, 403)
    assert ws.body.startswith(b"403")
    await assert_serves(echo_server)


async def test_server_same_origin_compares_host_case_insensitively(echo_server: tether.Server) -> None:
    port = echo_server.port
    ws = await handshake(echo_server, {"Host": f"LOCALHOST:{port}", "Origin": f"http://localhost:{port}"})
    assert ws.status == 101
    await ws.aclose()


async def test_server_allowed_origins_star_accepts_any_origin(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, allowed_origins=["*"])
    for origin in ["https://anything.example", "null", None]:
        ws = await handshake(server, {"Origin": origin})
        assert ws.status == 101, origin
        await ws.send_frame(OP_TEXT, b"hi")
        async with timeout(5):
            assert await ws.recv_frame() == (OP_TEXT, True, b"hi")
        await ws.aclose()


async def test_server_allowed_origins_list_refuses_others_and_accepts_no_origin(make_server: ServerFactory) -> None:
    server = await make_server({"/socket": echo}, allowed_origins=["https://app.example", "https://admin.example"])
    for origin, status in [("https://admin.example", 101), ("https://app.example.evil", 403), ("http://app.example", 403), (None, 101)]:
        ws = await handshake(server, {"Origin": origin})
        if status == 101:
            assert ws.status == 101, origin
            await ws.aclose()
        else:
            await assert_refused(ws, status)
    await assert_serves(server)


async def test_server_origin_checked_before_auth_runs(make_server: ServerFactory) -> None:
    calls: list[str] = []

    def auth(request: tether.Request) -> tether.Identity:
        calls.append(request.path)
        return tether.Identity("x")

    server = await make_server({"/socket": echo}, auth=auth)
    await assert_refused(await handshake(server, {"Origin": "http://evil.example"}), 403)
    assert calls == []


# -- auth: the sync hook answers before the upgrade -----------------------------------------

TOKENS = {"good": "ada", "other": "bob"}


def sync_auth(request: tether.Request) -> tether.Identity | None:
    token = tether.auth.token(request)
    if token == "banned":
        raise tether.CloseConnection(4003, "forbidden")
    if token == "unknown":
        raise tether.CloseConnection(4001, "who are you")
    subject = TOKENS.get(token or "")
    return None if subject is None else tether.Identity(subject, claims={"token": token})


async def whoami(conn: tether.Conn) -> None:
    identity = conn.identity
    await conn.send(json.dumps({"subject": identity.subject, "claims": identity.claims}))
    async for message in conn:
        await conn.send(message)


@pytest.fixture
async def authed(make_server: ServerFactory) -> tether.Server:
    return await make_server({"/socket": whoami}, auth=sync_auth)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no_token"),
        pytest.param({"Authorization": "Bearer nope"}, 401, id="wrong_token"),
        pytest.param({"Authorization": "Basic good"}, 401, id="not_bearer"),
        pytest.param({"Authorization": "Bearer unknown"}, 401, id="close_4001"),
        pytest.param({"Authorization": "Bearer banned"}, 403, id="close_4003"),
    ],
)
async def test_server_sync_auth_refuses_before_upgrade(authed: tether.Server, headers: dict[str, str | None], status: int) -> None:
    await assert_refused(await handshake(authed, headers), status)
    await assert_authed_serves(authed)


async def test_client_refused_by_sync_auth_raises_invalid_handshake_with_status(authed: tether.Server) -> None:
    async with timeout(5):
        for headers, status in [({}, 401), ({"Authorization": "Bearer banned"}, 403)]:
            with pytest.raises(tether.InvalidHandshake) as info:
                await tether.connect(url(authed), headers=headers)
            assert info.value.status == status


async def assert_authed_serves(server: tether.Server) -> None:
    async with timeout(5), tether.connect(url(server), headers={"Authorization": "Bearer good"}) as conn:
        assert json.loads(await conn.receive())["subject"] == "ada"
        await conn.send("ping")
        assert await conn.receive() == "ping"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("/socket", {"Authorization": "Bearer good"}, id="authorization_header"),
        pytest.param("/socket", {"authorization": "bearer   good  "}, id="header_any_case"),
        pytest.param("/socket?token=good", {}, id="query"),
        pytest.param("/socket", {"Cookie": "theme=dark; token=good; x=1"}, id="cookie"),
        pytest.param("/socket", {"Sec-WebSocket-Protocol": "tether, token.good"}, id="subprotocol"),
    ],
)
async def test_server_sync_auth_reads_token_and_handler_sees_identity(authed: tether.Server, path: str, headers: dict[str, str | None]) -> None:
    ws = await handshake(authed, headers, path)
    assert ws.status == 101
    async with timeout(5):
        opcode, _, payload = await ws.recv_frame()
    assert opcode == OP_TEXT and json.loads(payload) == {"subject": "ada", "claims": {"token": "good"}}
    if "Sec-WebSocket-Protocol" in headers:
        # The 101 must select exactly one offered subprotocol, never the token [4.2.2].
        assert ws.headers["sec-websocket-protocol"] == "tether"
    else:
        assert "sec-websocket-protocol" not in ws.headers
    await ws.aclose()


async def test_auth_token_sources_in_documented_order() -> None:
    """Header beats query beats cookie beats subprotocol."""
    from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

    def request(headers: dict[str, str], query: dict[str, str]) -> tether.Request:
        return tether.Request("/", CIMultiDictProxy(CIMultiDict(headers)), MultiDictProxy(MultiDict(query)), None)

    every = {"Authorization": "Bearer h", "Cookie": "token=c", "Sec-WebSocket-Protocol": "tether, token.s"}
    assert tether.auth.token(request(every, {"token": "q"})) == "h"
    del every["Authorization"]
    assert tether.auth.token(request(every, {"token": "q"})) == "q"
    assert tether.auth.token(request(every, {})) == "c"
    del every["Cookie"]
    assert tether.auth.token(request(every, {})) == "s"
    assert tether.auth.token(request({}, {})) is None
    assert tether.auth.token(request({"Cookie": "sid=1"}, {"sid": "2"}), name="sid") == "2"


async def test_server_subprotocol_offered_without_tether_selects_none(authed: tether.Server) -> None:
    """A client that offers only the token gets no Sec-WebSocket-Protocol back (RFC 6455 lets
    the server pick none; the token is never echoed)."""
    ws = await handshake(authed, {"Sec-WebSocket-Protocol": "token.good"})
    assert ws.status == 101 and "sec-websocket-protocol" not in ws.headers
    await ws.aclose()


async def test_server_auth_hook_raising_answers_500_and_hides_details(make_server: ServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: tether.Request) -> tether.Identity:
        raise KeyError("db password is hunter2")

    server = await make_server({"/socket": echo}, auth=broken)
    caplog.set_level("CRITICAL", logger="tether")
    ws = await handshake(server, {})
    assert ws.status == 500 and b"hunter2" not in ws.body
    await ws.aclose()


# -- auth: the async hook runs after the upgrade -------------------------------------------


async def async_auth(request: tether.Request) -> tether.Identity | None:
    await asyncio.sleep(0)  # a database look-up
    token = tether.auth.token(request)
    if token == "banned":
        raise tether.CloseConnection(4003, "forbidden")
    subject = TOKENS.get(token or "")
    return None if subject is None else tether.Identity(subject)


@pytest.mark.parametrize(("token", "code"), [(None, 4001), ("nope", 4001), ("banned", 4003)])
async def test_server_async_auth_refusal_closes_after_upgrade(make_server: ServerFactory, token: str | None, code: int) -> None:
    ran: list[tether.Conn] = []

    async def handler(conn: tether.Conn) -> None:
        ran.append(conn)

    server = await make_server({"/socket": handler, "/echo": echo}, auth=async_auth)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with timeout(5), tether.connect(url(server), headers=headers) as conn:
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert info.value.code == code
    assert ran == []  # no handler runs for a rejected connection
    async with timeout(5), tether.connect(url(server, "/echo"), headers={"Authorization": "Bearer good"}) as conn:
        await conn.send("ok")
        assert await conn.receive() == "ok"


async def test_server_async_auth_identity_visible_in_typed_app(make_server: ServerFactory) -> None:
    app = tether.App()

    @app.on("whoami")
    def who(conn: tether.Conn) -> str:
        return str(conn.identity.subject)

    server = await make_server({"/app": app}, auth=async_auth)
    async with timeout(5), tether.Client(url(server, "/app"), params=lambda: {"token": "other"}) as client:
        assert await client.request("whoami") == "bob"


# -- token expiry --------------------------------------------------------------------------


class Tokens:
    """Issues numbered tokens; each is valid for ``lifetime`` seconds from its first use."""

    def __init__(self, lifetimes: list[float | None]) -> None:
        self.lifetimes = lifetimes
        self.issued = 0

    def fresh(self) -> dict[str, str]:
        self.issued += 1
        return {"token": f"t{self.issued}"}

    def auth(self, request: tether.Request) -> tether.Identity | None:
        token = tether.auth.token(request) or ""
        if not token.startswith("t"):
            return None
        n = int(token[1:])
        lifetime = self.lifetimes[min(n, len(self.lifetimes)) - 1]
        return tether.Identity(f"user-{n}", expires_at=None if lifetime is None else time.time() + lifetime)


async def test_server_identity_expiry_closes_4002_token_expired(make_server: ServerFactory) -> None:
    tokens = Tokens([0.5])
    server = await make_server({"/socket": whoami}, auth=tokens.auth)
    start = time.monotonic()
    async with timeout(5), tether.connect(url(server, "/socket?token=t1")) as conn:
        assert json.loads(await conn.receive())["subject"] == "user-1"
        await conn.send("before expiry")
        assert await conn.receive() == "before expiry"
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert (info.value.code, info.value.reason) == (4002, "token expired")
    assert 0.4 <= time.monotonic() - start < 0.5 + 2 * TIMEOUT_SCALE
    await assert_serves_token(server, "t2")


async def assert_serves_token(server: tether.Server, token: str) -> None:
    async with timeout(5), tether.connect(url(server, f"/socket?token={token}")) as conn:
        assert json.loads(await conn.receive())["subject"] == f"user-{token[1:]}"


async def test_server_identity_already_expired_closes_4002_at_once(make_server: ServerFactory) -> None:
    tokens = Tokens([-10.0])
    server = await make_server({"/socket": whoami}, auth=tokens.auth)
    async with timeout(5), tether.connect(url(server, "/socket?token=t1")) as conn:
        await conn.wait_closed()
    assert conn.close_code == 4002


async def test_client_with_params_function_reconnects_after_4002_with_fresh_token(make_server: ServerFactory) -> None:
    """4002 is retryable: tether.Client calls ``params`` again and the fresh token works."""
    tokens = Tokens([1.0, None])
    app = tether.App()

    @app.on("whoami")
    def who(conn: tether.Conn) -> str:
        return str(conn.identity.subject)

    server = await make_server({"/app": app}, auth=tokens.auth)
    closes: list[tuple[Any, ...]] = []
    reconnected = asyncio.Event()
    client = tether.Client(url(server, "/app"), params=tokens.fresh, backoff=Backoff(base=0.05, cap=0.1))
    client.add_listener("close", lambda *args: closes.append(args))
    client.add_listener("reconnected", reconnected.set)
    async with timeout(10), client:
        assert await client.request("whoami") == "user-1"
        await reconnected.wait()
        assert await client.request("whoami") == "user-2"
    assert closes[0] == (4002, "token expired")
    assert tokens.issued == 2


# -- in Chromium ----------------------------------------------------------------------------

PROBE_PAGE = """<!doctype html>
<meta charset="utf-8">
<script>
  // Open a raw WebSocket to ?ws=<url> and record what the page can see of it.
  window.result = new Promise((resolve) => {
    const events = [];
    const ws = new WebSocket(new URLSearchParams(location.search).get("ws"));
    ws.onopen = () => { events.push("open"); ws.send("from the page"); };
    ws.onmessage = (e) => { events.push("message:" + e.data); ws.close(1000); };
    ws.onerror = () => events.push("error");
    ws.onclose = (e) => { events.push("close:" + e.code); resolve(events); };
  });
</script>
"""


async def start_site(make_server: ServerFactory, directory: Path, routes: dict[str, Any] | None = None, **settings: Any) -> tether.Server:
    """A server for pages in ``directory`` (with ``routes``, default none: a plain HTTP site)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.html").write_text(PROBE_PAGE)
    return await make_server(routes or {}, static_dir=directory, **settings)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from tests.browser import chromium

    async with chromium() as b:
        yield b


async def page_result(browser: Any, page_url: str) -> list[str]:
    page = await browser.new_page()
    await page.goto(page_url)
    async with timeout(10):
        result: list[str] = await page.evaluate("window.result")
    await page.close()
    return result


@pytest.mark.browser
async def test_browser_cross_origin_page_cannot_open_socket_same_origin_page_can(make_server: ServerFactory, tmp_path: Path, browser: Any) -> None:
    target = await start_site(make_server, tmp_path / "target", {"/socket": echo})
    other = await start_site(make_server, tmp_path / "other")  # another origin: another port
    ws = f"ws://127.0.0.1:{target.port}/socket"
    cross = await page_result(browser, f"http://127.0.0.1:{other.port}/?ws={ws}")
    assert cross == ["error", "close:1006"]
    same = await page_result(browser, f"http://127.0.0.1:{target.port}/?ws={ws}")
    assert same == ["open", "message:from the page", "close:1000"]


@pytest.mark.browser
async def test_browser_page_on_allowed_origin_can_open_socket(make_server: ServerFactory, tmp_path: Path, browser: Any) -> None:
    other = await start_site(make_server, tmp_path / "other")
    target = await start_site(
        make_server, tmp_path / "target", {"/socket": echo}, allowed_origins=[f"http://127.0.0.1:{other.port}"]
    )
    ws = f"ws://127.0.0.1:{target.port}/socket"
    assert await page_result(browser, f"http://127.0.0.1:{other.port}/?ws={ws}") == ["open", "message:from the page", "close:1000"]
    # The allow-list replaces same-origin: the target's own pages are now refused.
    assert await page_result(browser, f"http://127.0.0.1:{target.port}/?ws={ws}") == ["error", "close:1006"]


TOKEN_PAGE = """<!doctype html>
<meta charset="utf-8">
<script type="module">
  import { connect } from "/tether.js";
  window.events = [];
  window.tokens = [];
  let issued = 0;
  // A token function, called again before every (re)connect; async like a real refresh.
  const token = async () => { issued += 1; window.tokens.push("t" + issued); return "t" + issued; };
  const client = connect("/app", { token, backoff: { base: 0.05, cap: 0.1 } });
  for (const name of ["open", "close", "reconnected"]) {
    client.addEventListener(name, (e) => window.events.push({ name, detail: e.detail }));
  }
  window.client = client;
</script>
"""


@pytest.mark.browser
async def test_browser_tether_js_token_option_sends_subprotocol_and_refreshes_after_4002(make_server: ServerFactory, tmp_path: Path, browser: Any) -> None:
    """tether.js offers ``tether, token.<tok>``; the server reads the token and selects
    ``tether`` (else Chromium would fail the connection); after 4002 the page reconnects with
    the next token from its ``token`` function."""
    tokens = Tokens([0.5, None])
    seen: list[str | None] = []

    def auth(request: tether.Request) -> tether.Identity | None:
        seen.append(request.headers.get("Sec-WebSocket-Protocol"))
        assert "token" not in request.query  # not in the URL (nor in access logs)
        return tokens.auth(request)

    app = tether.App()

    @app.on("whoami")
    def who(conn: tether.Conn) -> str:
        return str(conn.identity.subject)

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(TOKEN_PAGE)
    server = await make_server({"/app": app}, static_dir=site, auth=auth)
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{server.port}/")
    await page.wait_for_function("window.events && events.some((e) => e.name === 'reconnected')", timeout=MS)
    assert await page.evaluate("client.request('whoami')") == "user-2"
    events = await page.evaluate("events")
    assert [e["name"] for e in events] == ["open", "close", "open", "reconnected"]
    assert events[1]["detail"] == {"code": 4002, "reason": "token expired", "willReconnect": True}
    # The token as a subprotocol, beside "tether" and the session entry: a new session for
    # user-1, then an offer to resume it (a new one again: user-2 is another identity).
    assert [entry.split(", ")[:2] for entry in seen] == [["tether", "token.t1"], ["tether", "token.t2"]]
    assert seen[0].split(", ")[2] == "session" and seen[1].split(", ")[2].startswith("session.")
    await page.close()
