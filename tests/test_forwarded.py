"""Behind a proxy: forwarding headers believed from trusted proxies only.

The parsing is pure (bytes-free here: header strings in, addresses out); then the policy on a
real server: ``remote_address`` is the client's when the peer is a trusted proxy and the
peer's otherwise, whatever the client claims; the origin check accepts the forwarded host
from a trusted proxy only (picows learns the peer after the upgrade: a forged forwarded host
from anyone else is closed with 1008 before the handler runs).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets
from multidict import CIMultiDict
from websockets.asyncio.client import ClientConnection, connect

import tether
from tests.conftest import ServerFactory, make_server, timeout  # noqa: F401
from tether.conn import make_request
from tether.transport.base import FORBIDDEN_ORIGIN, Admitted, Policy
from tether.transport.forwarded import TrustedProxies, parse_forwarded, parse_node

# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "parsed"),
    [
        ("192.0.2.43", ("192.0.2.43", 0)),
        ("192.0.2.43:47011", ("192.0.2.43", 47011)),
        ('"[2001:db8:cafe::17]:4711"', ("2001:db8:cafe::17", 4711)),
        ("[2001:db8:cafe::17]", ("2001:db8:cafe::17", 0)),
        ("2001:db8::1", ("2001:db8::1", 0)),
        ("unknown", ("unknown", 0)),
        ("_hidden:_port", ("_hidden", 0)),
    ],
)
def test_parse_node(node: str, parsed: tuple[str, int]) -> None:
    assert parse_node(node) == parsed


def test_parse_forwarded_rfc_7239_examples() -> None:
    assert parse_forwarded('for="_gazonk"') == [{"for": "_gazonk"}]
    assert parse_forwarded('For="[2001:db8:cafe::17]:4711"') == [{"for": "[2001:db8:cafe::17]:4711"}]
    assert parse_forwarded("for=192.0.2.60;proto=http;by=203.0.113.43") == [
        {"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}
    ]
    assert parse_forwarded("for=192.0.2.43, for=198.51.100.17") == [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}]
    assert parse_forwarded('for=1.2.3.4;host="a\\"b"') == [{"for": "1.2.3.4", "host": 'a"b'}]
    assert parse_forwarded("for=1.2.3.4; nonsense") == [{"for": "1.2.3.4"}]  # stops at the malformed part


def test_trusted_proxies_addresses_networks_literals_and_any() -> None:
    proxies = TrustedProxies("127.0.0.1, 10.0.0.0/8,fd00::/8 , unix:/run/nginx.sock")
    assert proxies.trusts("127.0.0.1") and proxies.trusts("10.1.2.3") and proxies.trusts("fd00::5")
    assert proxies.trusts("unix:/run/nginx.sock")
    assert not proxies.trusts("127.0.0.2") and not proxies.trusts("11.0.0.1") and not proxies.trusts("unknown")
    assert TrustedProxies(["127.0.0.1", "::1"]).trusts("::1")
    assert TrustedProxies("*").trusts("203.0.113.9")
    with pytest.raises(ValueError, match="empty"):
        TrustedProxies(" , ")


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_resolve_believes_only_a_trusted_peer_and_skips_trusted_hops() -> None:
    proxies = TrustedProxies("127.0.0.1,10.0.0.0/8")
    h = headers(("X-Forwarded-For", "6.6.6.6, 203.0.113.7, 10.0.0.2"), ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "example.com"))
    assert proxies.resolve(h, "192.0.2.1") is None  # not a proxy of ours: nothing it says counts
    hop = proxies.resolve(h, "127.0.0.1")
    assert hop is not None
    assert hop.client == ("203.0.113.7", 0)  # 10.0.0.2 is ours; 6.6.6.6 is the client's own claim
    assert (hop.proto, hop.host) == ("https", "example.com")
    all_ours = proxies.resolve(headers(("X-Forwarded-For", "10.0.0.3, 10.0.0.2")), "127.0.0.1")
    assert all_ours is not None and all_ours.client == ("10.0.0.3", 0)
    bare = proxies.resolve(headers(), "127.0.0.1")
    assert bare is not None and (bare.client, bare.proto, bare.host) == (None, None, None)


def test_resolve_reads_every_header_line_and_the_nearest_proto_and_host() -> None:
    proxies = TrustedProxies("127.0.0.1")
    h = headers(("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.7"),
                ("X-Forwarded-Proto", "http, HTTPS"), ("X-Forwarded-Host", "evil.example, example.com"))
    hop = proxies.resolve(h, "127.0.0.1")
    assert hop is not None and hop.client == ("203.0.113.7", 0) and (hop.proto, hop.host) == ("https", "example.com")


def test_resolve_prefers_forwarded_over_x_forwarded() -> None:
    proxies = TrustedProxies("127.0.0.1")
    h = headers(("Forwarded", 'for=6.6.6.6, for="[2001:db8::7]:4711";proto=https;host=example.com'), ("X-Forwarded-For", "1.1.1.1"))
    hop = proxies.resolve(h, "127.0.0.1")
    assert hop is not None and hop.client == ("2001:db8::7", 4711) and (hop.proto, hop.host) == ("https", "example.com")


# -- the policy, peer known before the upgrade (ASGI, tether.testing) --------------------------------
def test_policy_with_a_known_peer_rewrites_the_request_and_checks_the_forwarded_host() -> None:
    policy = Policy(forwarded_allow_ips="127.0.0.1")
    proxied = headers(("Host", "upstream"), ("Origin", "https://example.com"), ("X-Forwarded-For", "203.0.113.7"),
                      ("X-Forwarded-Host", "example.com"))
    request = make_request("/ws", proxied, ("127.0.0.1", 40000))
    decision = policy.admit(request)
    assert isinstance(decision, Admitted) and decision.forwarded and not decision.confirm_origin
    assert request.remote_address == ("203.0.113.7", 0)
    spoofed = make_request("/ws", proxied, ("192.0.2.9", 40000))
    assert policy.admit(spoofed) is FORBIDDEN_ORIGIN
    assert spoofed.remote_address == ("192.0.2.9", 40000)
    assert Policy().admit(make_request("/ws", proxied, ("127.0.0.1", 40000))) is FORBIDDEN_ORIGIN  # off by default


# -- a real server (picows: the peer is known only after the upgrade) --------------------------------
async def whoami(conn: tether.Conn) -> None:
    await conn.send(json.dumps({"remote": conn.remote_address}))
    async for _ in conn:
        pass


async def open_from(source: str, port: int, path: str = "/ws", **kwargs: Any) -> ClientConnection:
    """A WebSocket client whose TCP connection comes from ``source`` (a loopback address)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await connect(f"ws://127.0.0.1:{port}{path}", sock=sock, ping_interval=None, **kwargs)


@pytest.fixture
async def proxied(make_server: ServerFactory) -> AsyncIterator[tuple[tether.Server, list[tether.Conn]]]:  # noqa: F811
    opened: list[tether.Conn] = []

    async def handler(conn: tether.Conn) -> None:
        opened.append(conn)
        await whoami(conn)

    server = await make_server({"/ws": handler}, forwarded_allow_ips="127.0.0.1")
    yield server, opened


async def remote_seen(ws: ClientConnection) -> list[Any]:
    async with timeout(5):
        message = json.loads(await ws.recv())
    await ws.close()
    return message["remote"]  # type: ignore[no-any-return]


async def test_server_takes_the_client_address_from_a_trusted_proxy(proxied: tuple[tether.Server, list[tether.Conn]]) -> None:
    server, _ = proxied
    ws = await open_from("127.0.0.1", server.port, additional_headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.7"})
    assert await remote_seen(ws) == ["203.0.113.7", 0]


async def test_server_ignores_forwarding_headers_from_anyone_else(proxied: tuple[tether.Server, list[tether.Conn]]) -> None:
    server, _ = proxied
    ws = await open_from("127.0.0.2", server.port, additional_headers={"X-Forwarded-For": "203.0.113.7"})
    remote = await remote_seen(ws)
    assert remote[0] == "127.0.0.2"


async def test_server_origin_check_accepts_the_forwarded_host_of_a_trusted_proxy(proxied: tuple[tether.Server, list[tether.Conn]]) -> None:
    server, _ = proxied
    forged = {"X-Forwarded-Host": "app.example", "X-Forwarded-For": "203.0.113.7"}
    ws = await open_from("127.0.0.1", server.port, origin="https://app.example", additional_headers=forged)
    assert await remote_seen(ws) == ["203.0.113.7", 0]
    with pytest.raises(websockets.InvalidStatus) as refused:  # the Host header does not match and nothing else helps
        await open_from("127.0.0.1", server.port, origin="https://app.example")
    assert refused.value.response.status_code == 403


async def test_server_closes_a_forged_forwarded_host_from_an_untrusted_peer_before_the_handler(
    proxied: tuple[tether.Server, list[tether.Conn]],
) -> None:
    server, opened = proxied
    forged = {"X-Forwarded-Host": "evil.example"}
    ws = await open_from("127.0.0.2", server.port, origin="https://evil.example", additional_headers=forged)
    async with timeout(5):
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1008
    assert opened == [], "the handler never ran"


async def test_server_without_trusted_proxies_ignores_forwarding_headers(make_server: ServerFactory) -> None:  # noqa: F811
    server = await make_server({"/ws": whoami})
    ws = await open_from("127.0.0.1", server.port, additional_headers={"X-Forwarded-For": "203.0.113.7"})
    assert (await remote_seen(ws))[0] == "127.0.0.1"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await open_from("127.0.0.1", server.port, origin="https://app.example", additional_headers={"X-Forwarded-Host": "app.example"})
    assert refused.value.response.status_code == 403
