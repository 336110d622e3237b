"""``wss://`` with an ``ssl.SSLContext``, using a self-signed certificate made by the test."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import tether
from conftest import echo, timeout
from rawws import RawWS
from tether.proto.backoff import Backoff

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for CN=localhost, valid for IP 127.0.0.1 and DNS localhost."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def server_ctx(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*certificate)
    return ctx


@pytest.fixture
def client_ctx(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture
async def wss(server_ctx: ssl.SSLContext) -> AsyncIterator[tether.Server]:
    server = await tether.serve({"/socket": echo, "/app": typed_app()}, "127.0.0.1", 0, ssl=server_ctx)
    yield server
    async with timeout(15):
        await server.close()


def typed_app() -> tether.App:
    app = tether.App()

    @app.on("upper")
    def upper(conn: tether.Conn, data: str) -> str:
        return data.upper()

    return app


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_wss_round_trip_with_self_signed_certificate(wss: tether.Server, client_ctx: ssl.SSLContext, host: str) -> None:
    async with timeout(5), tether.connect(f"wss://{host}:{wss.port}/socket", ssl=client_ctx) as conn:
        await conn.send("over tls ✓")
        assert await conn.receive() == "over tls ✓"
        await conn.send(b"\x00" * 200_000)
        assert await conn.receive() == b"\x00" * 200_000
    assert conn.close_code == 1000


async def test_wss_handler_sees_tls_connection(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    seen: asyncio.Future[tether.Conn] = asyncio.get_running_loop().create_future()

    async def handler(conn: tether.Conn) -> None:
        seen.set_result(conn)
        await conn.receive()

    server = await tether.serve({"/socket": handler}, "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        async with timeout(5), tether.connect(f"wss://127.0.0.1:{server.port}/socket", ssl=client_ctx):
            conn = await seen
            assert conn.remote_address is not None and conn.remote_address[0] == "127.0.0.1"
            assert conn._transport._raw.get_extra_info("ssl_object") is not None  # type: ignore[attr-defined]


async def test_plain_ws_client_to_tls_port_fails_cleanly(wss: tether.Server, client_ctx: ssl.SSLContext) -> None:
    async with timeout(10):
        with pytest.raises(tether.InvalidHandshake):  # not an AssertionError from deep inside
            await tether.connect(f"ws://127.0.0.1:{wss.port}/socket", open_timeout=5)
        # A raw plaintext handshake gets no HTTP answer, only a closed connection.
        ws = await RawWS.connect(wss.port)
        ws.writer.write(b"GET /socket HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        try:
            answer = await ws.reader.read()
        except ConnectionResetError:
            answer = b""
        assert b"101" not in answer and b"HTTP/1.1" not in answer
        ws.abort()
        await assert_wss_serves(wss, client_ctx)


async def test_wss_client_that_does_not_trust_the_certificate_fails_cleanly(wss: tether.Server, client_ctx: ssl.SSLContext) -> None:
    async with timeout(10):
        with pytest.raises(ssl.SSLCertVerificationError):
            await tether.connect(f"wss://127.0.0.1:{wss.port}/socket", ssl=ssl.create_default_context(), open_timeout=5)
        await assert_wss_serves(wss, client_ctx)


async def assert_wss_serves(server: tether.Server, client_ctx: ssl.SSLContext) -> None:
    async with timeout(5), tether.connect(f"wss://127.0.0.1:{server.port}/socket", ssl=client_ctx) as conn:
        await conn.send("still serving")
        assert await conn.receive() == "still serving"


async def test_client_over_wss_requests_and_reconnects(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """tether.Client over wss: a request, a server-side drop, a reconnect, another request."""
    app = typed_app()
    opened: list[tether.Conn] = []
    app.on_connect(opened.append)
    app.on_resume(opened.append)
    server = await tether.serve({"/app": app}, "127.0.0.1", 0, ssl=server_ctx)
    async with server:
        reconnected = asyncio.Event()
        client = tether.Client(f"wss://127.0.0.1:{server.port}/app", ssl=client_ctx, backoff=Backoff(base=0.05, cap=0.1))
        client.add_listener("reconnected", reconnected.set)
        async with timeout(10), client:
            assert await client.request("upper", "tls") == "TLS"
            await opened[0].close(1011, "restarting")
            await reconnected.wait()
            assert await client.request("upper", "again") == "AGAIN"
        assert len(opened) == 2
