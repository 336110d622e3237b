"""The connection policy on every transport: origin, auth, rate limit, max connections and
identity expiry apply the same way on tether's picows server, under ASGI (uvicorn) and in
``tether.testing``'s memory transport (tests/transports.py). docs/security.md.

Raw-HTTP details only tether's own server has (431, 426, the bytes of a refusal) are in
tests/test_security.py and tests/test_limits.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

import tether
from conftest import TIMEOUT_SCALE, echo, timeout
from test_security import async_auth, sync_auth  # the same hooks as tether's own server's tests
from transports import Served, Start, start  # noqa: F401  (fixture)

async def whoami(conn: tether.Conn) -> None:
    """Say who the peer is, then echo."""
    identity = conn.identity
    await conn.send(json.dumps({"subject": identity.subject if identity else None}))
    async for message in conn:
        await conn.send(message)


async def refused(served: Served, target: str = "/app", headers: dict[str, str] | None = None) -> int:
    """The HTTP status a refused connection got."""
    with pytest.raises(tether.InvalidHandshake) as info:
        async with timeout(5):
            await served.connect(target, headers=headers)
    return info.value.status


async def subject(served: Served, target: str = "/app", headers: dict[str, str] | None = None) -> str | None:
    async with timeout(5), served.connect(target, headers=headers) as conn:
        seen = json.loads(await conn.receive())["subject"]
        await conn.send("ping")
        assert await conn.receive() == "ping"
    return seen  # type: ignore[no-any-return]


# -- origin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["http://evil.example", "https://evil.example", "null"])
async def test_policy_cross_site_origin_is_refused_403(start: Start, origin: str) -> None:
    served = await start(whoami)
    assert await refused(served, headers={"Origin": origin}) == 403
    assert await subject(served) is None  # others still served


async def test_policy_same_origin_and_no_origin_are_accepted(start: Start) -> None:
    served = await start(whoami)
    assert await subject(served, headers={"Origin": f"http://{served.host.upper()}"}) is None
    assert await subject(served) is None


async def test_policy_allowed_origins_list_refuses_others(start: Start) -> None:
    served = await start(whoami, allowed_origins=["https://app.example"])
    assert await subject(served, headers={"Origin": "https://app.example"}) is None
    assert await refused(served, headers={"Origin": f"http://{served.host}"}) == 403
    assert await subject(served) is None


async def test_policy_allowed_origins_star_accepts_any(start: Start) -> None:
    served = await start(whoami, allowed_origins=["*"])
    assert await subject(served, headers={"Origin": "http://anything.example"}) is None


async def test_policy_origin_is_checked_before_auth_runs(start: Start) -> None:
    calls: list[tether.Request] = []

    def auth(request: tether.Request) -> tether.Identity:
        calls.append(request)
        return tether.Identity("x")

    served = await start(whoami, auth=auth)
    assert await refused(served, headers={"Origin": "http://evil.example"}) == 403
    assert calls == []


# -- auth -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 401, id="no_token"),
        pytest.param({"Authorization": "Bearer nope"}, 401, id="wrong_token"),
        pytest.param({"Authorization": "Bearer unknown"}, 401, id="close_4001"),
        pytest.param({"Authorization": "Bearer banned"}, 403, id="close_4003"),
    ],
)
async def test_policy_sync_auth_refuses_before_upgrade(start: Start, headers: dict[str, str], status: int) -> None:
    served = await start(whoami, auth=sync_auth)
    assert await refused(served, headers=headers) == status
    assert await subject(served, headers={"Authorization": "Bearer good"}) == "ada"


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        pytest.param("/app", {"Authorization": "Bearer good"}, id="authorization_header"),
        pytest.param("/app?token=good", {}, id="query"),
        pytest.param("/app", {"Cookie": "theme=dark; token=good"}, id="cookie"),
    ],
)
async def test_policy_sync_auth_reads_token_and_handler_sees_identity(start: Start, target: str, headers: dict[str, str]) -> None:
    served = await start(whoami, auth=sync_auth)
    assert await subject(served, target, headers) == "ada"


async def test_policy_auth_hook_raising_refuses_500(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    def broken(request: tether.Request) -> tether.Identity:
        raise KeyError("db password is hunter2")

    caplog.set_level("CRITICAL", logger="tether")
    served = await start(echo, auth=broken)
    assert await refused(served) == 500


@pytest.mark.parametrize(("token", "code"), [(None, 4001), ("nope", 4001), ("banned", 4003)])
async def test_policy_async_auth_refusal_closes_after_upgrade(start: Start, token: str | None, code: int) -> None:
    ran: list[tether.Conn] = []

    async def handler(conn: tether.Conn) -> None:
        ran.append(conn)

    served = await start(handler, auth=async_auth)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with timeout(5), served.connect(headers=headers) as conn:
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert info.value.code == code
    assert ran == []  # no handler runs for a rejected connection


async def test_policy_async_auth_identity_reaches_a_typed_app(start: Start) -> None:
    app = tether.App()

    @app.on("whoami")
    def who(conn: tether.Conn) -> str:
        return str(conn.identity.subject)

    served = await start(app, auth=async_auth)
    async with timeout(5), served.connect("/app?token=other") as conn:
        assert json.loads(await conn.receive())["type"] == "welcome"
        await conn.send('{"type": "whoami", "id": 1}')
        assert json.loads(await conn.receive()) == {"type": "reply", "data": "bob", "id": 1}


# -- identity expiry --------------------------------------------------------------------------


def expiring(lifetime: float) -> Any:
    def auth(request: tether.Request) -> tether.Identity | None:
        return tether.Identity("ada", expires_at=time.time() + lifetime)

    return auth


async def test_policy_identity_expiry_closes_4002(start: Start) -> None:
    served = await start(whoami, auth=expiring(0.3))
    began = time.monotonic()
    async with timeout(5), served.connect() as conn:
        assert json.loads(await conn.receive())["subject"] == "ada"
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert (info.value.code, info.value.reason) == (4002, "token expired")
    assert 0.25 <= time.monotonic() - began < 0.3 + 2 * TIMEOUT_SCALE


async def test_policy_identity_already_expired_closes_4002_at_once(start: Start) -> None:
    served = await start(whoami, auth=expiring(-10.0))
    async with timeout(5), served.connect() as conn:
        await conn.wait_closed()
    assert conn.close_code == 4002


# -- rate limit -------------------------------------------------------------------------------

SLOW = tether.RateLimit(rate=0.001, burst=3)  # three messages, then (almost) nothing


def adder() -> tether.App:
    app = tether.App()

    @app.on("add")
    def add(conn: tether.Conn, data: dict[str, int]) -> int:
        return data["a"] + data["b"]

    return app


def add(id: int) -> str:
    return json.dumps({"type": "add", "data": {"a": id, "b": 1}, "id": id})


async def test_policy_rate_limited_typed_app_answers_with_ids_then_closes_1008(start: Start) -> None:
    """Every message gets its answer, in order (the accepted ones their replies, the rejected
    ones an error with their id) before the 1008, however the transport batches them."""
    served = await start(adder(), rate_limit=SLOW)
    async with timeout(5), served.connect() as other, served.connect() as conn:
        assert json.loads(await conn.receive())["type"] == "welcome"
        for i in range(6):
            await conn.send(add(i))
        got = [json.loads(await conn.receive()) for _ in range(5)]
        assert [m["type"] for m in got[:3]] == ["reply"] * 3
        error = {"code": "rate_limited", "message": "too many messages: slow down"}
        assert got[3:] == [{"type": "error", "data": error, "id": 3}, {"type": "error", "data": error, "id": 4}]
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
        assert (info.value.code, info.value.reason) == (1008, "rate limit exceeded")
        assert json.loads(await other.receive())["type"] == "welcome"
        await other.send(add(7))  # its own bucket
        assert json.loads(await other.receive()) == {"type": "reply", "data": 8, "id": 7}


async def test_policy_rate_limited_plain_handler_closes_1008_at_once(start: Start) -> None:
    served = await start(echo, rate_limit=SLOW)
    async with timeout(5), served.connect() as conn:
        for i in range(3):
            await conn.send(str(i))
            assert await conn.receive() == str(i)
        await conn.send("one too many")
        with pytest.raises(tether.ConnectionClosedError) as info:
            await conn.receive()
    assert info.value.code == 1008


# -- max connections --------------------------------------------------------------------------


async def test_policy_max_connections_refuses_503_and_admits_again_after_a_close(start: Start) -> None:
    served = await start(whoami, max_connections=2)
    async with timeout(10):
        first = await served.connect()
        second = await served.connect()
        for conn in (first, second):
            assert json.loads(await conn.receive()) == {"subject": None}
        assert await refused(served) == 503
        await second.send("still served")
        assert await second.receive() == "still served"
        await first.close()
        # The server counts the close when it has seen it: poll (bounded by the timeout).
        while True:
            try:
                third = await served.connect()
            except tether.InvalidHandshake as exc:
                assert exc.status == 503
                await asyncio.sleep(0.01)
                continue
            break
        assert json.loads(await third.receive()) == {"subject": None}
        await third.close()
        await second.close()
