"""``tether.Client`` (the reconnecting Python client) and the server's keepalive, over real sockets.

Servers run in-process (closed and reopened on the same port) or as a child process
(tests/servers/reconnect_app.py) that a test can SIGKILL or SIGSTOP. Every wait is on an
event or a polled condition under a deadline scaled by TETHER_TEST_TIMEOUT_SCALE; short
intervals (backoff, pings) are scaled by the same factor.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

import tether
from conftest import TIMEOUT_SCALE, timeout, within
from rawws import OP_PING, OP_TEXT, RawWS
from servers.reconnect_app import ClientEvents, ServerProcess, make_app, until
from tether.proto.backoff import Backoff
from tether.app.dispatch import Dispatcher
from tether.conn import Conn

S = TIMEOUT_SCALE


def fast_backoff(**kw: float) -> Backoff:
    """Reconnect within tens of milliseconds (scaled)."""
    return Backoff(base=kw.pop("base", 0.02 * S), cap=kw.pop("cap", 0.1 * S), **kw)


class PinnedBackoff(Backoff):
    """The real schedule with the jitter pinned to the middle, so delays are predictable."""

    def next_delay(self, rand: float) -> float:
        return super().next_delay(0.5)


def free_port() -> int:
    """A port nothing listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Probe:
    """A test app's server-side view: every connection it saw, and knobs for its handlers."""

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.reject: tuple[int, str] | None = None  # on_connect closes with this
        self.hanging = asyncio.Event()

    @property
    def tokens(self) -> list[str | None]:
        return [conn.query.get("token") for conn in self.conns]


def probe_app(probe: Probe) -> tether.App:
    app = make_app()  # add, append, log

    @app.on_connect
    @app.on_resume
    def seen(conn: Conn) -> None:
        probe.conns.append(conn)
        if probe.reject is not None:
            raise tether.CloseConnection(*probe.reject)

    @app.on("hang", concurrent=True)
    async def hang(conn: Conn) -> None:
        probe.hanging.set()
        await conn.wait_closed()  # never replies

    return app


class Servers:
    """In-process servers: ``await servers.start(app, port)``; all closed at teardown."""

    def __init__(self) -> None:
        self.running: list[tether.Server] = []

    async def start(self, app: Any, port: int = 0, **settings: Any) -> tether.Server:
        server = await tether.serve({"/ws": app}, "127.0.0.1", port, **settings)
        self.running.append(server)
        return server


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    servers = Servers()
    yield servers
    for server in servers.running:
        await within(server.close(), 15)


@pytest.fixture
async def child() -> AsyncIterator[ServerProcess]:
    proc = ServerProcess()
    yield proc
    await proc.aclose()


def ws(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


async def elapse(since: float, seconds: float) -> None:
    """Let ``seconds`` pass since ``since`` (time itself is the condition here)."""
    await asyncio.sleep(max(0.0, since + seconds - time.monotonic()))


# -- restart on the same port ---------------------------------------------------------------------


async def test_client_reconnects_after_in_process_server_restart_on_same_port(servers):
    server = await servers.start(make_app())
    port = server.port
    async with tether.Client(ws(port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await client.wait_open()
            assert await client.request("add", {"a": 1, "b": 2}) == 3
            await server.close()
            (code, _), _ = await events.wait("close")
            await servers.start(make_app(), port)
            await events.wait("reconnected")
            assert await client.request("add", {"a": 2, "b": 3}) == 5
    assert code == 1001
    assert events.names()[:4] == ["open", "close", "reconnecting", "open"]


async def test_client_reconnects_after_server_process_killed_and_restarted(child):
    port = await child.start()
    async with tether.Client(ws(port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(20):
            assert await client.request("add", {"a": 1, "b": 2}) == 3
            await child.kill()
            (code, _), _ = await events.wait("close")
            await events.wait("reconnecting")
            await child.start(port)
            await events.wait("reconnected")
            assert await client.request("add", {"a": 20, "b": 22}) == 42
    assert code == 1006  # no close frame from a killed process


async def test_client_outbox_flushed_in_order_after_process_restart(child):
    port = await child.start()
    async with tether.Client(ws(port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(20):
            await client.wait_open()
            await child.kill()
            await events.wait("reconnecting")
            for i in range(10):
                client.send("append", i)
            log = asyncio.ensure_future(client.request("log", timeout=None))  # queued behind them
            await child.start(port)
            assert await log == list(range(10))
    assert len(events.of("reconnected")) == 1


async def test_client_outbox_flushed_in_order_after_in_process_restart(servers):
    server = await servers.start(make_app())
    port = server.port
    async with tether.Client(ws(port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await client.wait_open()
            await server.close()
            await events.wait("reconnecting")
            assert client.state == "reconnecting"
            for i in range(10):
                client.send("append", {"n": i})
            await servers.start(make_app(), port)
            await events.wait("reconnected")
            assert await client.request("log") == [{"n": i} for i in range(10)]


# -- outbox and requests ------------------------------------------------------------------------------


async def test_client_outbox_overflow_drops_oldest_and_fails_dropped_request(servers):
    port = free_port()
    async with tether.Client(ws(port), outbox_size=3, backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await events.wait("reconnecting")  # nothing listens yet
            dropped = asyncio.ensure_future(client.request("add", {"a": 1, "b": 1}))
            await asyncio.sleep(0)  # let the request reach the outbox
            for i in range(3):
                client.send("append", i)  # the third one pushes the request out
            with pytest.raises(tether.OutboxOverflow):
                await dropped
            assert len(events.of("outboxoverflow")) == 1
            await servers.start(make_app(), port)
            await client.wait_open()  # (a request now would push another one out)
            assert await client.request("log") == [0, 1, 2]


async def test_client_outbox_size_zero_fails_request_at_once_while_down():
    async with tether.Client(ws(free_port()), outbox_size=0, backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await events.wait("reconnecting")
            client.send("append", 1)
            with pytest.raises(tether.OutboxOverflow):
                await client.request("add", {"a": 1, "b": 1}, timeout=None)
    assert len(events.of("outboxoverflow")) == 2


async def test_client_request_times_out_with_timeout_error(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe))
    async with tether.Client(ws(server.port)) as client:
        async with timeout(5):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.request("hang", timeout=0.2 * S)
            assert time.monotonic() - started >= 0.2 * S
            assert probe.hanging.is_set()
            assert await client.request("add", {"a": 1, "b": 1}) == 2  # still usable
    assert client._futures == {} and client._session.pending == set()


async def test_client_request_default_timeout_is_request_timeout(servers):
    server = await servers.start(probe_app(Probe()))
    async with tether.Client(ws(server.port), request_timeout=0.1 * S) as client:
        with pytest.raises(TimeoutError):
            await within(client.request("hang"), 5)


async def test_client_request_in_flight_survives_a_drop_with_its_session(servers):
    """The session resumes: the request's reply (the handler ended with the old connection)
    reaches the client on the new one."""
    probe = Probe()
    server = await servers.start(probe_app(probe))
    async with tether.Client(ws(server.port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            hung = asyncio.ensure_future(client.request("hang", timeout=None))
            await probe.hanging.wait()
            await probe.conns[0].close(1012, "restarting")
            await events.wait("reconnected")
            assert await hung is None
            assert await client.request("add", {"a": 1, "b": 1}) == 2


async def test_client_request_in_flight_when_connection_drops_raises_connection_lost_without_sessions(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe))
    async with tether.Client(ws(server.port), backoff=fast_backoff(), resume=False) as client:
        events = ClientEvents(client)
        async with timeout(5):
            hung = asyncio.ensure_future(client.request("hang", timeout=None))
            await probe.hanging.wait()
            await probe.conns[0].close(1012, "restarting")
            with pytest.raises(tether.ConnectionLost):
                await hung
            await events.wait("reconnected")
            assert await client.request("add", {"a": 1, "b": 1}) == 2


async def test_client_closed_fails_pending_request_and_refuses_new_ones(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe))
    client = tether.Client(ws(server.port))
    client.start()
    async with timeout(5):
        hung = asyncio.ensure_future(client.request("hang", timeout=None))
        await probe.hanging.wait()
        await client.close()
        with pytest.raises(tether.ClientClosed):
            await hung
        with pytest.raises(tether.ClientClosed):
            await client.request("add", {"a": 1, "b": 1})
        with pytest.raises(tether.ClientClosed):
            client.send("append", 1)
    assert client.state == "closed"


# -- close codes that stop reconnecting ---------------------------------------------------------------


@pytest.mark.parametrize(("code", "reason"), [(4001, "bad token"), (4003, "forbidden"), (1008, "rate limit")])
async def test_client_rejected_with_final_code_is_closed_and_never_retries(servers, code, reason):
    probe = Probe()
    probe.reject = (code, reason)
    server = await servers.start(probe_app(probe))
    async with tether.Client(ws(server.port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            got, _ = await events.wait("close")
            await until(lambda: client.state == "closed")
            assert client._task is not None
            await client._task  # the supervisor is done: nothing left that could reconnect
            with pytest.raises(tether.ClientClosed):
                await client.wait_open()
            with pytest.raises(tether.ClientClosed):
                await client.request("add", {"a": 1, "b": 1})
    assert got == (code, reason)
    assert len(probe.conns) == 1
    assert "reconnecting" not in events.names()


async def test_client_refused_handshake_403_is_closed_and_never_retries(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe))  # same-origin check refuses a foreign Origin
    async with tether.Client(ws(server.port), headers={"Origin": "http://evil.example"}, backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        with pytest.raises(tether.ClientClosed):
            await within(client.wait_open(), 5)
    assert client.state == "closed"
    assert events.names() == []
    assert probe.conns == []


async def test_client_server_close_4002_reconnects(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe))
    async with tether.Client(ws(server.port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await client.wait_open()
            await probe.conns[0].close(4002, "token expired")
            await events.wait("reconnected")
    assert len(probe.conns) == 2


# -- params ------------------------------------------------------------------------------------------


async def test_client_params_function_called_again_on_every_reconnect(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe))
    counter = itertools.count(1)
    params = lambda: {"token": f"t{next(counter)}"}  # noqa: E731
    async with tether.Client(ws(server.port) + "?room=a", params=params, backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await client.wait_open()
            for n in (1, 2):
                await probe.conns[-1].close(4002, "token expired")
                await events.wait("reconnected", n)
    assert probe.tokens == ["t1", "t2", "t3"]
    assert all(conn.query.get("room") == "a" for conn in probe.conns)


async def test_client_async_params_function_is_awaited(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe))

    async def params() -> dict[str, str]:
        await asyncio.sleep(0)
        return {"token": "fresh"}

    async with tether.Client(ws(server.port), params=params) as client:
        await within(client.wait_open(), 5)
    assert probe.tokens == ["fresh"]


# -- backoff -----------------------------------------------------------------------------------------


async def test_client_backoff_delays_grow_to_the_cap_while_server_is_down():
    base, cap = 0.02 * S, 0.16 * S
    async with tether.Client(ws(free_port()), backoff=PinnedBackoff(base=base, cap=cap)) as client:
        events = ClientEvents(client)
        await within(events.wait("reconnecting", 6), 10)
    tries = events.of("reconnecting")[:6]
    attempts = [args[0] for args, _ in tries]
    delays = [args[1] for args, _ in tries]
    assert attempts == [1, 2, 3, 4, 5, 6]
    assert delays == pytest.approx([0.5 * min(cap, base * 2**k) for k in range(6)])
    assert delays[0] < delays[1] < delays[2] < delays[3] == delays[4] == delays[5]
    for (_, before), (_, after), delay in zip(tries, tries[1:], delays):
        assert after - before >= delay - 0.005  # the client really waited


async def test_client_backoff_resets_only_after_connection_was_stable(servers):
    probe = Probe()
    probe.reject = (1011, "flaky")  # accepts, then drops at once: not stable
    server = await servers.start(probe_app(probe))
    stable = 0.3 * S
    backoff = PinnedBackoff(base=0.01 * S, cap=0.05 * S, stable_after=stable)
    async with tether.Client(ws(server.port), backoff=backoff) as client:
        events = ClientEvents(client)
        async with timeout(10):
            await events.wait("reconnecting", 4)
            assert [args[0] for args, _ in events.of("reconnecting")[:4]] == [1, 2, 3, 4]
            assert len(probe.conns) >= 4  # each retry did connect, and the counter still grew
            probe.reject = None
            _, opened = await events.wait("open")  # "open": the welcome came (none did before)
            await elapse(opened, stable)
            count = len(events.of("reconnecting"))
            await probe.conns[-1].close(1012, "restarting")
            (attempt, _), _ = await events.wait("reconnecting", count + 1)
    assert attempt == 1


async def test_client_honours_retry_after_from_1001(servers):
    server = await servers.start(make_app())
    port = server.port
    async with tether.Client(ws(port), backoff=fast_backoff()) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await client.wait_open()
            await server.close(1001, "going away; retry_after=0.5")
            _, closed = await events.wait("close")
            await servers.start(make_app(), port)  # back at once; the client must still wait
            (_, delay), _ = await events.wait("reconnecting")
            client.wake()  # skips the backoff, never the server's retry_after
            _, opened = await events.wait("reconnected")
    assert delay >= 0.5
    assert opened - closed >= 0.5


async def test_client_wake_skips_backoff(servers):
    port = free_port()
    backoff = Backoff(base=30.0, cap=30.0)
    async with tether.Client(ws(port), backoff=backoff) as client:
        events = ClientEvents(client)
        async with timeout(5):
            await events.wait("reconnecting")
            await servers.start(make_app(), port)
            client.wake()
            await client.wait_open()


@pytest.mark.slow  # ~10 s: 500 clients in asyncio debug mode, and the kernel's SYN retries once
# the restarted server's accept backlog (100) overflows
async def test_reconnect_storm_500_clients_dropped_at_once_spread_out(servers):
    """A deploy drops everyone at once: full jitter must spread the comebacks (default schedule)."""
    n = 500
    server = await servers.start(make_app(), ping_interval=None)
    port = server.port
    clients = [tether.Client(ws(port), ping_interval=None) for _ in range(n)]
    back: list[float] = []
    all_back = asyncio.Event()

    def reconnected() -> None:
        back.append(time.monotonic())
        if len(back) == n:
            all_back.set()

    for client in clients:
        client.add_listener("reconnected", reconnected)
        client.start()
    try:
        async with timeout(60):
            await asyncio.gather(*(client.wait_open() for client in clients))
            await server.close()  # 1001 "going away", no retry_after
            dropped = time.monotonic()
            await servers.start(make_app(), port, ping_interval=None)
            await all_back.wait()
    finally:
        await asyncio.gather(*(client.close() for client in clients))
    back.sort()
    densest = max(sum(1 for t in back if start <= t < start + 0.1) for start in back)
    assert densest < n / 2, f"{densest} of {n} clients came back within the same 100 ms"
    assert back[-1] - back[0] >= 0.3  # the first retry's window is 0.5 s wide
    assert back[0] > dropped


# -- keepalive: the client detects a dead server ----------------------------------------------------------


async def test_client_detects_paused_server_with_keepalive_timeout_and_reconnects_after_resume(child):
    interval, ping_timeout = 0.2 * S, 0.3 * S
    port = await child.start()
    client = tether.Client(
        ws(port), ping_interval=interval, ping_timeout=ping_timeout, open_timeout=0.5 * S, backoff=fast_backoff()
    )
    async with client:
        events = ClientEvents(client)
        async with timeout(20):
            await client.wait_open()
            child.pause()
            paused = time.monotonic()
            in_flight = asyncio.ensure_future(client.request("add", {"a": 1, "b": 1}, timeout=None))
            (code, reason), closed = await events.wait("close")
            await events.wait("reconnecting", 2)  # retries while the server is still frozen
            assert client.state != "open" and not in_flight.done()
            child.resume()
            await events.wait("reconnected")
            assert await in_flight == 2  # the session resumed: the request was not lost
            assert await client.request("add", {"a": 2, "b": 2}) == 4
    assert (code, reason) == (1011, "keepalive timeout")
    assert isinstance(tether.errors.closed_error(code, reason), tether.KeepaliveTimeout)
    assert closed - paused <= interval + ping_timeout + 0.25 * S


async def test_client_latency_measured_from_pings(servers):
    server = await servers.start(make_app())
    async with tether.Client(ws(server.port), ping_interval=0.05 * S) as client:
        assert client.latency is None
        async with timeout(5):
            await until(lambda: client.latency is not None)
    assert 0 <= client.latency < 1


async def test_client_answers_server_heartbeat(servers, monkeypatch):
    echoes: list[Any] = []
    original = Dispatcher._client_heartbeat

    def recording(self: Dispatcher, data: Any) -> None:
        if isinstance(data, dict) and data.get("t") == self._heartbeat_sent:
            echoes.append(data)  # our own heartbeat, echoed back by the client
        original(self, data)

    monkeypatch.setattr(Dispatcher, "_client_heartbeat", recording)
    server = await servers.start(make_app(), ping_interval=0.05 * S)
    async with tether.Client(ws(server.port), ping_interval=None) as client:
        async with timeout(5):
            await client.wait_open()
            await until(lambda: len(echoes) >= 2)


# -- keepalive: the server side ----------------------------------------------------------------------------


async def test_server_closes_client_that_never_answers_pings_with_1011_keepalive_timeout(servers):
    server = await servers.start(make_app(), ping_interval=0.1 * S, ping_timeout=0.2 * S)
    raw = await RawWS.open(server.port, "/ws")
    try:
        assert raw.status == 101
        async with timeout(5):
            opcodes: list[int] = []
            while True:
                opcode, _, payload = await raw.recv_frame()
                if opcode == 8:
                    break
                opcodes.append(opcode)
            assert await raw.eof()
    finally:
        await raw.aclose()
    assert OP_PING in opcodes
    assert payload[:2] == (1011).to_bytes(2, "big")
    assert payload[2:] == b"keepalive timeout"


async def test_server_ping_timeout_none_waits_for_pong_without_spinning(servers, monkeypatch):
    ticks = 0
    original = Conn.keepalive_tick

    def counting(self: Conn) -> None:
        nonlocal ticks
        ticks += 1
        original(self)

    monkeypatch.setattr(Conn, "keepalive_tick", counting)
    interval = 0.05 * S
    server = await servers.start(make_app(), ping_interval=interval, ping_timeout=None)
    raw = await RawWS.open(server.port, "/ws")  # never answers pings
    try:
        window = 10 * interval
        await asyncio.sleep(window)  # measuring a rate over a window of time
        assert len(server.connections) == 1  # never declared dead
    finally:
        await raw.aclose()
    assert ticks <= 4 * window / interval


async def test_server_measures_latency_from_pongs(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe), ping_interval=0.05 * S)
    async with tether.connect(ws(server.port), ping_interval=None) as conn:  # answers pings only
        async with timeout(5):
            await until(lambda: bool(probe.conns) and probe.conns[0].latency is not None)
            assert msgspec.json.decode(await conn.receive())["type"] == "welcome"
    assert 0 <= probe.conns[0].latency < 1


async def test_server_measures_latency_from_app_heartbeat_echo(servers):
    probe = Probe()
    server = await servers.start(probe_app(probe), ping_interval=0.05 * S, ping_timeout=30)
    raw = await RawWS.open(server.port, "/ws")  # answers heartbeats, never pings
    try:
        async with timeout(5):
            while True:
                opcode, _, payload = await raw.recv_frame()
                if opcode == OP_TEXT and msgspec.json.decode(payload)["type"] == "heartbeat":
                    break
            await raw.send_frame(OP_TEXT, payload)
            await until(lambda: probe.conns[0].latency is not None)
    finally:
        await raw.aclose()
    assert 0 <= probe.conns[0].latency < 1


async def test_server_welcome_announces_heartbeat_settings(servers):
    server = await servers.start(make_app(), ping_interval=0.5, ping_timeout=0.25)
    async with tether.connect(ws(server.port)) as conn:
        welcome = msgspec.json.decode(await within(conn.receive()))
    assert welcome == {"type": "welcome", "data": {"heartbeat": {"interval": 0.5, "timeout": 0.25}}}


async def test_server_welcome_announces_heartbeat_off(servers):
    server = await servers.start(make_app(), ping_interval=None)
    async with tether.connect(ws(server.port)) as conn:
        welcome = msgspec.json.decode(await within(conn.receive()))
    assert welcome["data"] == {"heartbeat": {"interval": None, "timeout": 20.0}}


async def test_server_echoes_client_heartbeat(servers):
    server = await servers.start(make_app())
    async with tether.connect(ws(server.port)) as conn:
        async with timeout(5):
            assert msgspec.json.decode(await conn.receive())["type"] == "welcome"
            await conn.send('{"type": "heartbeat", "data": {"t": 1234.5}}')
            echo = msgspec.json.decode(await conn.receive())
    assert echo == {"type": "heartbeat", "data": {"t": 1234.5}}
