"""Prometheus metrics: ``/metrics`` scraped before and after traffic, parsed with
prometheus_client's parser, each documented series checked to move as it should.

- the hooks themselves (``tether.metrics.Metrics``) and the exposition: names, types, units,
  bounded labels, histogram buckets;
- a server with ``metrics=True``: what the server counts (connections accepted, open, closed
  by code, refused by status, plain HTTP answers, broker counters and link state read at
  scrape time) and what the connection core counts through its hooks (messages and bytes by
  type, handler durations, error replies by code, send-queue drops, slow-consumer closes,
  keepalive round trips);
- several processes: snapshots added up over a shared directory, dead workers' counters kept
  and their gauges dropped; and ``tether run --workers 2`` against a real Redis, scraped
  through either worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

import tether
from tests.conftest import ServerFactory, make_server, timeout  # noqa: F401
from tests.metrics_helpers import families, parse, scrape, value
from tests.rawws import RawWS
from tests.redis_fixture import RedisServer, eventually, redis_server  # noqa: F401
from tests.tether_run import TetherRun, Typed, get, tether_run  # noqa: F401
from tether.metrics import BUCKETS, FAMILIES, Metrics

# -- the hooks and the exposition, no server --------------------------------------------------


def render(metrics: Metrics) -> str:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return body.decode()


def test_every_family_is_exposed_with_its_type_and_follows_the_naming_rules() -> None:
    text = render(Metrics())
    declared = families(text)
    for name, (kind, label, _help) in FAMILIES.items():
        exposed = name.removesuffix("_total") if kind == "counter" else name
        assert declared.get(exposed) == kind, name
        assert name.startswith("tether_")
        assert (kind == "counter") == name.endswith("_total"), f"{name}: _total on counters only"
        if kind == "histogram":
            assert name.endswith("_seconds"), f"{name}: base unit"
        assert label not in ("room", "user", "conn", "id", "member"), f"{name}: unbounded label"
    assert "process_cpu_seconds_total" in text  # the process's own registry too


def test_hooks_move_their_series() -> None:
    m = Metrics()
    before = parse(render(m))
    m.opened(), m.opened(), m.closed(1000), m.closed(None)
    m.refused(403), m.http_response(200), m.http_response(200)
    m.received("chat", '{"type":"chat","data":"héllo"}')  # é is 2 bytes in UTF-8
    m.received("chat", b"\x00\x01")
    m.sent(1, b'{"type":"reply","data":1}'), m.sent(1, b'{"type":"chat","data":"x","room":"r"}', count=10)
    m.sent(1, b"plain text"), m.sent(2, b"\x00\x01\x02")
    m.handled("chat", 0.003), m.handled("chat", 0.3)
    m.error_reply("bad_json"), m.error_reply("bad_json"), m.error_reply("nope")
    m.send_queue_dropped(3), m.slow_consumer_closed()
    m.keepalive_rtt(0.02), m.broker_lag(0.004)
    m.resumed("ok"), m.replayed(5)
    after = parse(render(m))
    assert value(before, "tether_connections_accepted_total") == 0
    assert value(after, "tether_connections_accepted_total") == 2
    assert value(after, "tether_connections_open") == 0
    assert value(after, "tether_connections_closed_total", code=1000) == 1
    assert value(after, "tether_connections_closed_total", code=1006) == 1
    assert value(after, "tether_connections_refused_total", status=403) == 1
    assert value(after, "tether_http_responses_total", status=200) == 2
    assert value(after, "tether_messages_received_total", type="chat") == 2
    assert value(after, "tether_messages_received_bytes_total", type="chat") == len('{"type":"chat","data":"héllo"}'.encode()) + 2
    assert value(after, "tether_messages_sent_total", type="reply") == 1
    assert value(after, "tether_messages_sent_bytes_total", type="reply") == len(b'{"type":"reply","data":1}')
    assert value(after, "tether_messages_sent_total", type="chat") == 10
    assert value(after, "tether_messages_sent_bytes_total", type="chat") == 10 * len(b'{"type":"chat","data":"x","room":"r"}')
    assert value(after, "tether_messages_sent_total", type="_text") == 1
    assert value(after, "tether_messages_sent_bytes_total", type="_binary") == 3
    assert value(after, "tether_handler_duration_seconds_count", type="chat") == 2
    assert value(after, "tether_handler_duration_seconds_sum", type="chat") == pytest.approx(0.303)
    assert value(after, "tether_handler_duration_seconds_bucket", type="chat", le="0.005") == 1
    assert value(after, "tether_handler_duration_seconds_bucket", type="chat", le="0.25") == 1
    assert value(after, "tether_handler_duration_seconds_bucket", type="chat", le="0.5") == 2
    assert value(after, "tether_handler_duration_seconds_bucket", type="chat", le="+Inf") == 2
    assert value(after, "tether_error_replies_total", code="bad_json") == 2
    assert value(after, "tether_error_replies_total", code="nope") == 1
    assert value(after, "tether_send_queue_dropped_total") == 3
    assert value(after, "tether_slow_consumer_closes_total") == 1
    assert value(after, "tether_keepalive_rtt_seconds_count") == 1
    assert value(after, "tether_keepalive_rtt_seconds_bucket", le="0.025") == 1
    assert value(after, "tether_broker_lag_seconds_count") == 1
    assert value(after, "tether_resumes_total", result="ok") == 1
    assert value(after, "tether_replayed_messages_total") == 5


def test_a_value_on_a_bucket_bound_is_in_that_bucket() -> None:
    m = Metrics()
    for bound in BUCKETS:
        m.keepalive_rtt(bound)
    m.keepalive_rtt(11.0)
    samples = parse(render(m))
    for i, bound in enumerate(BUCKETS):
        le = str(bound)
        assert value(samples, "tether_keepalive_rtt_seconds_bucket", le=le) == i + 1, le
    assert value(samples, "tether_keepalive_rtt_seconds_bucket", le="+Inf") == len(BUCKETS) + 1


def test_labels_are_bounded() -> None:
    m = Metrics(max_label_values=3)
    for i in range(10):
        m.sent(1, b'{"type":"type%d"}' % i)
        m.error_reply(f"code{i}")
        m.closed(4000 + i)
    samples = parse(render(m))
    types = {dict(labels)["type"] for (name, labels) in samples if name == "tether_messages_sent_total"}
    assert types == {"type0", "type1", "type2", "_other"}
    assert value(samples, "tether_messages_sent_total", type="_other") == 7
    assert value(samples, "tether_error_replies_total", code="_other") == 7
    assert value(samples, "tether_connections_closed_total", code="_other") == 7


def test_broker_counters_and_link_state_are_read_at_scrape_time() -> None:
    class State:
        name = "UP"

    class FakeBroker:
        published, received, dropped, state = 3, 4, 1, State()

    m = Metrics()
    broker = FakeBroker()
    m.watch(broker), m.watch(broker)  # watched once
    samples = parse(render(m))
    assert value(samples, "tether_broker_published_total") == 3
    assert value(samples, "tether_broker_received_total") == 4
    assert value(samples, "tether_broker_dropped_total") == 1
    assert value(samples, "tether_broker_up") == 1
    broker.published = 10
    State.name = "DOWN"
    samples = parse(render(m))
    assert value(samples, "tether_broker_published_total") == 10
    assert value(samples, "tether_broker_up") == 0


# -- several processes: the shared directory ----------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_processes_add_up_and_dead_ones_keep_counters_but_not_gauges(tmp_path: Path) -> None:
    worker, scraper = Metrics(directory=tmp_path), Metrics(directory=tmp_path)
    worker.opened(), worker.opened(), worker.sent(2, b"xx")
    worker.write()
    scraper.opened()
    samples = parse(render(scraper))
    assert value(samples, "tether_connections_open") == 3
    assert value(samples, "tether_connections_accepted_total") == 3
    assert value(samples, "tether_messages_sent_bytes_total", type="_binary") == 2
    # A worker that died (its file stays, written by a pid that is gone):
    pid = dead_pid()
    values = worker.snapshot()
    (tmp_path / f"tether-{pid}-dead.json").write_bytes(msgspec.json.encode({"pid": pid, "final": False, "values": values}))
    live_gauge = tmp_path / f"gauge_livesum_{pid}.db"  # prometheus_client's file for the app's live gauges
    live_gauge.write_bytes(b"")
    samples = parse(render(scraper))
    assert value(samples, "tether_connections_accepted_total") == 5  # its counters still count
    assert value(samples, "tether_connections_open") == 3  # its gauges do not
    assert not live_gauge.exists(), "mark_process_dead for the dead worker"
    # A worker that closed says so in its last file: its gauges stop counting at once.
    worker.close()
    samples = parse(render(scraper))
    assert value(samples, "tether_connections_open") == 1
    assert value(samples, "tether_connections_accepted_total") == 5


def test_a_broker_down_in_one_live_process_is_down_for_all(tmp_path: Path) -> None:
    class Down:
        state = type("S", (), {"name": "DOWN"})()

    worker, scraper = Metrics(directory=tmp_path), Metrics(directory=tmp_path)
    worker.watch(Down())
    worker.write()
    assert value(parse(render(scraper)), "tether_broker_up") == 0
    worker.close()
    assert value(parse(render(scraper)), "tether_broker_up") == 1


# -- a server with metrics=True ------------------------------------------------------------------
def typed_app() -> tether.App:
    app = tether.App()

    @app.on("echo")
    def echo(conn: tether.Conn, data: Any) -> Any:
        return data

    @app.on("fail")
    def fail(conn: tether.Conn) -> None:
        raise RuntimeError("on purpose")

    @app.on("refuse")
    def refuse(conn: tether.Conn) -> None:
        raise tether.ReplyError("nope", "refused")

    @app.on("slow")
    async def slow(conn: tether.Conn, seconds: float) -> str:
        await asyncio.sleep(seconds)  # the handler's work, measured by the histogram
        return "done"

    @app.on_connect
    async def join(conn: tether.Conn) -> None:
        if conn.query.get("room"):
            await conn.join(conn.query["room"])

    @app.on("blast")
    async def blast(conn: tether.Conn, data: dict[str, Any]) -> int:
        for i in range(data["n"]):
            await app.broadcast(data["room"], "blast", "x" * data["size"])
            if i % 16 == 15:
                await asyncio.sleep(0)  # let the loop write
        return data["n"]

    return app


async def close_4000(conn: tether.Conn) -> None:
    raise tether.CloseConnection(4000, "bye")


def routes() -> dict[str, Any]:
    return {"/ws": typed_app(), "/close": close_4000}


async def test_server_series_move_with_connections_refusals_and_pages(make_server: ServerFactory) -> None:  # noqa: F811
    server = await make_server(routes(), metrics=True)
    before = await scrape(server.port)
    assert value(before, "tether_broker_up") == 1
    async with timeout(10):
        conns = [await tether.connect(f"ws://127.0.0.1:{server.port}/ws") for _ in range(3)]
        during = await scrape(server.port)
        for conn in conns:
            await conn.close()
        conn = await tether.connect(f"ws://127.0.0.1:{server.port}/close")
        await conn.wait_closed()
        with pytest.raises(tether.InvalidHandshake):
            await tether.connect(f"ws://127.0.0.1:{server.port}/ws", headers={"Origin": "http://evil.example"})
        assert (await get(f"http://127.0.0.1:{server.port}/ws")).status_code == 426
        assert (await get(f"http://127.0.0.1:{server.port}/health")).status_code == 200
        assert (await get(f"http://127.0.0.1:{server.port}/nothing")).status_code == 404

        async def settled() -> bool:
            return value(await scrape(server.port), "tether_connections_open") == 0

        await eventually(settled, 5, "every connection counted closed")
    after = await scrape(server.port)
    assert value(during, "tether_connections_open") == 3
    assert value(during, "tether_connections_accepted_total") - value(before, "tether_connections_accepted_total") == 3
    assert value(after, "tether_connections_accepted_total") - value(before, "tether_connections_accepted_total") == 4
    assert value(after, "tether_connections_closed_total", code=1000) == 3
    assert value(after, "tether_connections_closed_total", code=4000) == 1
    assert value(after, "tether_connections_refused_total", status=403) == 1
    assert value(after, "tether_connections_refused_total", status=426) == 1
    assert value(after, "tether_http_responses_total", status=200) - value(before, "tether_http_responses_total", status=200) >= 2
    assert value(after, "tether_http_responses_total", status=404) == 1


async def test_server_without_metrics_has_no_metrics_page(make_server: ServerFactory) -> None:  # noqa: F811
    server = await make_server(routes())
    assert server.metrics is None
    assert (await get(f"http://127.0.0.1:{server.port}/metrics")).status_code == 404


@pytest.mark.redis
async def test_server_reads_broker_counters_and_link_state_at_scrape_time(make_server: ServerFactory, redis_server: RedisServer) -> None:  # noqa: F811
    from tether.redis_broker import RedisBroker

    def broker() -> RedisBroker:
        return RedisBroker(redis_server.url, presence_ttl=1.0, heartbeat_interval=0.2, backoff_cap=0.2)

    one = await make_server(routes(), metrics=True, broker=broker())
    two = await make_server(routes(), metrics=True, broker=broker())
    async with timeout(20):
        listener = Typed(await tether.connect(f"ws://127.0.0.1:{two.port}/ws?room=r"))
        sender = Typed(await tether.connect(f"ws://127.0.0.1:{one.port}/ws?room=r"))
        await sender.request("blast", {"room": "r", "n": 3, "size": 10})
        for _ in range(3):
            await listener.event("blast")

        async def counted() -> bool:
            a, b = await scrape(one.port), await scrape(two.port)
            return value(a, "tether_broker_published_total") >= 3 and value(b, "tether_broker_received_total") >= 3

        await eventually(counted, 10, "publications counted on both sides")
        assert value(await scrape(one.port), "tether_broker_up") == 1
        redis_server.stop()

        async def down() -> bool:
            return value(await scrape(one.port), "tether_broker_up") == 0

        await eventually(down, 10, "broker_up goes 0 when Redis is gone")
        await sender.conn.close()
        await listener.conn.close()


@contextlib.asynccontextmanager
async def closing() -> AsyncIterator[Callable[[Any], Any]]:
    """``opened(x)`` registers a connection (``tether.Conn`` or ``RawWS``) closed on the way out,
    even when the test fails (no transport left for the garbage collector to warn about)."""
    items: list[Any] = []

    def opened(item: Any) -> Any:
        items.append(item)
        return item

    try:
        yield opened
    finally:
        for item in items:
            if isinstance(item, RawWS):
                item.abort()
                await item.aclose()
            else:
                item.drop()
                await item.wait_closed()


async def joined_flood(server: tether.Server) -> RawWS:
    """A member of room ``flood`` that never reads (a small receive buffer, nothing read)."""
    stuck = await RawWS.connect(server.port, rcvbuf=4096)
    assert await stuck.handshake("/ws?room=flood") == 101

    async def joined() -> bool:
        return bool(server.hub.local("flood"))

    await eventually(joined, 5, "the stuck member joined")
    return stuck




async def test_connection_core_series_move_with_traffic(make_server: ServerFactory) -> None:  # noqa: F811
    server = await make_server(routes(), metrics=True, ping_interval=0.05, max_send_queue=4)
    port = server.port
    before = await scrape(port)
    async with timeout(20), closing() as opened:
        client = Typed(opened(await tether.connect(f"ws://127.0.0.1:{port}/ws")))
        sent = [msgspec.json.encode({"type": "echo", "data": i, "id": i}) for i in (1, 2)]  # as Typed sends them
        for i in (1, 2):
            assert await client.request("echo", i) == i
        await client.conn.send("{not json")
        with pytest.raises(tether.ReplyError):
            await client.request("fail")
        with pytest.raises(tether.ReplyError):
            await client.request("refuse")
        assert await client.request("slow", 0.06) == "done"
        # A member that never reads: its send queue fills, then drops the oldest frames.
        opened(await joined_flood(server))
        await client.request("blast", {"room": "flood", "n": 2000, "size": 8192})

        async def moved() -> bool:
            now = await scrape(port)
            return value(now, "tether_keepalive_rtt_seconds_count") > 0 and value(now, "tether_send_queue_dropped_total") > 0

        await eventually(moved, 10, "keepalive round trips and send-queue drops counted")
        after = await scrape(port)

    def delta(name: str, **labels: Any) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("tether_messages_received_total", type="echo") == 2
    assert delta("tether_messages_received_bytes_total", type="echo") == sum(len(s) for s in sent)
    assert delta("tether_messages_received_total", type="_invalid") == 1
    assert delta("tether_messages_sent_total", type="reply") >= 3
    assert delta("tether_messages_sent_total", type="welcome") == 2
    assert delta("tether_messages_sent_total", type="error") == 3
    assert delta("tether_messages_sent_bytes_total", type="reply") > 0
    assert delta("tether_messages_sent_total", type="blast") > 0
    assert delta("tether_handler_duration_seconds_count", type="echo") == 2
    assert delta("tether_handler_duration_seconds_bucket", type="slow", le="0.05") == 0
    assert delta("tether_handler_duration_seconds_count", type="slow") == 1
    assert delta("tether_error_replies_total", code="bad_json") == 1
    assert delta("tether_error_replies_total", code="internal") == 1
    assert delta("tether_error_replies_total", code="nope") == 1
    assert delta("tether_send_queue_dropped_total") > 0
    assert delta("tether_keepalive_rtt_seconds_count") > 0


async def test_slow_consumer_close_is_counted(make_server: ServerFactory) -> None:  # noqa: F811
    server = await make_server(routes(), metrics=True, max_send_queue=2, send_overflow="close", close_timeout=0.5)
    async with timeout(20), closing() as opened:
        client = Typed(opened(await tether.connect(f"ws://127.0.0.1:{server.port}/ws")))
        opened(await joined_flood(server))
        await client.request("blast", {"room": "flood", "n": 2000, "size": 8192})

        async def counted() -> bool:
            samples = await scrape(server.port)
            closed = value(samples, "tether_connections_closed_total", code=1013)  # once its TCP is gone
            return value(samples, "tether_slow_consumer_closes_total") == 1 and closed == 1

        await eventually(counted, 10, "the slow consumer's 1013 counted")
        samples = await scrape(server.port)
    assert value(samples, "tether_connections_closed_total", code=1013) == 1


# -- tether run --workers 2: one aggregated view from either worker ---------------------------------
@pytest.mark.redis
async def test_two_workers_scrape_adds_up_both_and_survives_a_worker_death(
    tether_run: Callable[..., TetherRun], redis_server: RedisServer  # noqa: F811
) -> None:
    proc = await tether_run("ops_app:app", "--workers", "2", "--broker", redis_server.url).start(30)
    clients: dict[int, list[Typed]] = {}
    dirs: set[str] = set()
    async with timeout(60):
        before = await scrape(proc.port)
        opened = 0
        while len(clients) < 2 or min(len(c) for c in clients.values()) < 2:
            assert opened < 60, "SO_REUSEPORT gave both workers connections"
            client = Typed(await tether.connect(proc.url(query="room=lobby")))
            opened += 1
            who = await client.request("whoami")
            clients.setdefault(who["pid"], []).append(client)
            dirs.add(who["metrics_dir"])
        pids = list(clients)
        (name,) = dirs  # tether run gave both workers one directory
        directory = Path(name)
        assert directory.is_dir()
        first = clients[pids[0]][0]
        await first.request("say", {"room": "lobby", "text": "hello"})
        for client in clients[pids[1]]:
            await client.event("said")

        async def both_counted() -> bool:  # each worker writes its numbers every second
            samples = [await scrape(proc.port) for _ in range(4)]  # whichever worker answers
            return all(
                value(s, "tether_connections_open") == opened
                and value(s, "tether_connections_accepted_total") - value(before, "tether_connections_accepted_total") == opened
                and value(s, "tether_broker_published_total") >= 1
                and value(s, "tether_broker_received_total") >= 1
                for s in samples
            )

        await eventually(both_counted, 15, f"{opened} connections and one publication, seen from either worker")
        # One worker dies without a goodbye: the supervisor restarts it; its counters stay in the
        # totals, its open connections leave the gauge.
        dead = pids[1]
        os.kill(dead, signal.SIGKILL)
        for client in clients[dead]:
            await client.conn.wait_closed()
        survivors = len(clients[pids[0]])

        async def after_death() -> bool:
            try:
                samples = [await scrape(proc.port) for _ in range(4)]
            except OSError:
                return False
            return all(
                value(s, "tether_connections_open") == survivors
                and value(s, "tether_connections_accepted_total") - value(before, "tether_connections_accepted_total") >= opened
                for s in samples
            )

        await eventually(after_death, 20, "the dead worker's gauge gone, its counters kept")
        for client in clients[pids[0]]:
            await client.conn.close()
    proc.signal(signal.SIGTERM)
    assert await proc.wait(30) == 0
    assert not directory.exists(), "tether run removes the metrics directory it made"

