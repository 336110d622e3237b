"""Real processes for rooms tests: a ``redis-server`` on a free port, a local Redis Cluster,
app server processes (``tests/rooms_app.py``), and a small typed client.

``redis_server`` (fixture) starts ``/usr/bin/redis-server --save '' --appendonly no`` on a
port the OS picked and stops it at teardown; ``stop()`` then ``start()`` brings it back on the
same port, empty.

``redis_cluster`` (fixture) is a Redis Cluster of 3 masters with one replica each: 6
``redis-server --cluster-enabled yes`` processes on free ports (client and bus ports both
picked by the OS), joined by ``redis-cli --cluster create ... --cluster-replicas 1``, ready
once every node says ``cluster_state:ok``, agrees on the slot map, and every master has a
replica in sync. It is started once per test session and reset before each test (every
node running, the cluster ok, data, ACL users, pauses and counters gone); ``stop()`` and
``start()`` restart every node (empty, the topology kept in its nodes.conf); ``kill``,
``failover`` and ``restart`` act on one node. ``any_redis`` is either, for the suites that
run on both: the same calls (``url``, ``url_as``, ``stop``, ``start``, ``admin``).
Waits poll a condition under a deadline; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

import tether
from tests.conftest import TIMEOUT_SCALE

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
APP = Path(__file__).with_name("rooms_app.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` different free ports (all held open while they are picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait_port(port: int, seconds: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + seconds * TIMEOUT_SCALE
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)  # polling a condition under a deadline
    raise TimeoutError(f"nothing listens on port {port} after {seconds}s")


class RedisServer:
    """A throwaway redis-server: ``url``, ``stop()``, ``start()``."""

    kind = "single"

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def url_as(self, user: str, password: str) -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    def admin(self, decode_responses: bool = False) -> Any:
        """A redis-py asyncio client (close it with ``aclose``)."""
        return aioredis.Redis.from_url(self.url, decode_responses=decode_responses)

    def start(self) -> None:
        cmd = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def _single() -> Iterator[RedisServer]:
    if not os.path.exists(REDIS):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from _single()


# -- a local Redis Cluster ----------------------------------------------------------------
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
SLOTS = 16384
#: ms without an answer before a node is taken for failed: low for quick failovers, not so low
#: that a loaded 2-core machine fails a node over by itself.
NODE_TIMEOUT_MS = 2000


class ClusterNodeProcess:
    """One ``redis-server --cluster-enabled yes``: ``port``, its bus port, its nodes.conf."""

    def __init__(self, port: int, bus: int, folder: Path) -> None:
        self.port, self.bus, self.folder = port, bus, folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.id = ""  # CLUSTER MYID, once started

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        cmd = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--cluster-enabled", "yes", "--cluster-config-file", str(self.folder / f"nodes-{self.port}.conf"),
               "--cluster-port", str(self.bus), "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
               "--cluster-replica-validity-factor", "0", "--cluster-allow-replica-migration", "no",
               "--repl-diskless-sync-delay", "0", "--dir", str(self.folder), "--logfile", str(self.folder / f"{self.port}.log")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 10, self.proc)
        self.id = self.call("CLUSTER", "MYID").decode()

    def kill(self) -> None:
        """SIGKILL: no goodbye to the cluster or to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def call(self, *args: Any) -> Any:
        client = redis.Redis(port=self.port, socket_timeout=2 * TIMEOUT_SCALE, socket_connect_timeout=2 * TIMEOUT_SCALE)
        try:
            return client.execute_command(*args)
        finally:
            client.close()


class ClusterView:
    """What one node says of the cluster (CLUSTER NODES): masters and their slots, replicas."""

    def __init__(self, text: str) -> None:
        self.masters: dict[str, list[tuple[int, int]]] = {}  # node id -> slot ranges
        self.replicas: dict[str, str] = {}  # replica id -> its master's id
        self.failing: set[str] = set()
        self.address: dict[str, int] = {}  # node id -> port
        for line in text.strip().splitlines():
            fields = line.split()
            node, address, flags, master = fields[0], fields[1], fields[2].split(","), fields[3]
            self.address[node] = int(address.split("@")[0].rsplit(":", 1)[1])
            if "fail" in flags or "fail?" in flags:
                self.failing.add(node)
            if "master" in flags:
                ranges = []
                for item in fields[8:]:
                    if item.startswith("["):
                        continue  # a slot being migrated
                    first, _, last = item.partition("-")
                    ranges.append((int(first), int(last or first)))
                self.masters[node] = sorted(ranges)
            elif "slave" in flags:
                self.replicas[node] = master

    def owner(self, slot: int) -> str | None:
        for node, ranges in self.masters.items():
            if any(first <= slot <= last for first, last in ranges):
                return node
        return None

    def shape(self) -> tuple[Any, ...]:
        return tuple(sorted((node, tuple(ranges)) for node, ranges in self.masters.items() if ranges))


class RedisClusterServer:
    """A local Redis Cluster: ``masters`` masters with ``replicas`` replicas each."""

    kind = "cluster"

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="tether-cluster-"))
        count = masters * (1 + replicas)
        ports = free_ports(2 * count)
        self.nodes = [ClusterNodeProcess(ports[i], ports[count + i], self.folder) for i in range(count)]
        self.masters, self.replicas = masters, replicas
        self.url = "redis+cluster://" + ",".join(node.name for node in self.nodes)

    def url_as(self, user: str, password: str) -> str:
        return f"redis+cluster://{user}:{password}@" + ",".join(node.name for node in self.nodes)

    def admin(self, decode_responses: bool = False) -> ClusterAdmin:
        """A :class:`ClusterAdmin` (close it with ``aclose``)."""
        nodes = [ClusterNode("127.0.0.1", node.port) for node in self.nodes]
        return ClusterAdmin(RedisCluster(startup_nodes=nodes, decode_responses=decode_responses))

    # -- the whole cluster ------------------------------------------------------------------
    def create(self) -> None:
        for node in self.nodes:
            node.start()
        cmd = [REDIS_CLI, "--cluster", "create", *(node.name for node in self.nodes), "--cluster-replicas", str(self.replicas), "--cluster-yes"]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60 * TIMEOUT_SCALE)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout.decode()[-2000:]} {done.stderr.decode()[-2000:]}")
        self.wait_ok()

    def stop(self) -> None:
        """Every node killed (as ``RedisServer.stop``: no persistence, the data is gone)."""
        for node in self.nodes:
            node.kill()

    def start(self) -> None:
        """Every node that is not running started again (its nodes.conf keeps the topology;
        its data is gone), then wait for the cluster to be ok."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_ok()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def view(self, node: ClusterNodeProcess | None = None) -> ClusterView:
        node = node or next(n for n in self.nodes if n.running)
        return ClusterView(node.call("CLUSTER", "NODES").decode())

    def problem(self) -> str | None:
        """Why the cluster is not ready yet (None: every node is up, says ok, agrees on the
        slot map, every master has a replica in sync)."""
        running = [node for node in self.nodes if node.running]
        if len(running) != len(self.nodes):
            return "a node is not running"
        shapes = set()
        for node in running:
            info = node.call("CLUSTER", "INFO").decode()
            if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                return f"{node.name}: not ok or not every node known"
            view = self.view(node)
            if view.failing:
                return f"{node.name} sees failing nodes"
            shapes.add(view.shape())
        if len(shapes) != 1:
            return "the nodes disagree on the slot map"
        view = self.view(running[0])
        if sum(last - first + 1 for ranges in view.masters.values() for first, last in ranges) != SLOTS:
            return "slots not covered"
        for master, ranges in view.masters.items():
            if ranges and sum(1 for m in view.replicas.values() if m == master) < self.replicas:
                return "a master without its replicas"
        for replica in view.replicas:
            node = self.node(view.address[replica])
            if node.call("INFO", "replication").get("master_link_status") != "up":
                return f"replica {node.name} not in sync"
        return None

    def wait_ok(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds * TIMEOUT_SCALE
        while (why := self.problem()) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready after {seconds}s: {why}")
            time.sleep(0.05)  # polling a condition under a deadline

    def reset(self) -> None:
        """Before each test: every node running, the cluster ok, no data, no ACL user but the
        default one, no pause, counters zero."""
        self.start()
        for node in self.nodes:
            node.call("CLIENT", "UNPAUSE")
            users = [user.decode() for user in node.call("ACL", "USERS") if user != b"default"]
            if users:
                node.call("ACL", "DELUSER", *users)
            node.call("ACL", "SETUSER", "default", "reset", "on", "nopass", "~*", "&*", "+@all")
            node.call("CONFIG", "RESETSTAT")
        view = self.view()
        for master, ranges in view.masters.items():
            if ranges:
                self.node(view.address[master]).call("FLUSHALL")

    # -- one node -------------------------------------------------------------------------
    def node(self, port: int) -> ClusterNodeProcess:
        return next(node for node in self.nodes if node.port == port)

    def master_of(self, key: str | bytes) -> ClusterNodeProcess:
        view = self.view()
        owner = view.owner(key_slot(key.encode() if isinstance(key, str) else key))
        assert owner is not None
        return self.node(view.address[owner])

    def replica_of(self, master: ClusterNodeProcess) -> ClusterNodeProcess:
        view = self.view()
        return next(self.node(view.address[r]) for r, m in view.replicas.items() if m == master.id)

    async def wait_master(self, key: str | bytes, node: ClusterNodeProcess, seconds: float = 30) -> None:
        """Until every running node says ``node`` owns ``key``'s slot and the cluster is ok."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)

        async def promoted() -> bool:
            for other in self.nodes:
                if not other.running:
                    continue
                try:
                    if self.view(other).owner(slot) != node.id or b"cluster_state:ok" not in other.call("CLUSTER", "INFO"):
                        return False
                except (redis.RedisError, OSError):
                    return False
            return True

        await eventually(promoted, seconds, f"{node.name} masters slot {slot}")

    async def kill_master(self, key: str | bytes) -> tuple[ClusterNodeProcess, ClusterNodeProcess]:
        """SIGKILL the master of ``key``'s slot; return it and its replica once the replica
        is promoted (after ``NODE_TIMEOUT_MS`` and an election)."""
        master = self.master_of(key)
        replica = self.replica_of(master)
        master.kill()
        await self.wait_master(key, replica)
        return master, replica

    async def failover(self, key: str | bytes) -> tuple[ClusterNodeProcess, ClusterNodeProcess]:
        """CLUSTER FAILOVER on the replica of ``key``'s master (a manual failover: the replica
        catches up first, nothing written is lost)."""
        master = self.master_of(key)
        replica = self.replica_of(master)
        replica.call("CLUSTER", "FAILOVER")
        await self.wait_master(key, replica)
        return master, replica


class ClusterAdmin:
    """A redis-py ``RedisCluster`` whose server commands (ACL, CLIENT, CONFIG, FLUSHALL, INFO,
    KEYS) reach every node, so tests written for one redis-server read the same."""

    ALL_NODES = frozenset({"acl_setuser", "acl_deluser", "client_kill_filter", "client_pause", "client_unpause", "config_resetstat", "config_set"})

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if name in self.ALL_NODES:
            return functools.partial(attr, target_nodes=RedisCluster.ALL_NODES)
        return attr

    async def flushall(self) -> Any:
        return await self.client.flushall(target_nodes=RedisCluster.PRIMARIES)

    async def keys(self, pattern: str = "*") -> list[bytes]:
        found = await self.client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
        return list(found)

    async def info(self, section: str) -> dict[str, Any]:
        """``commandstats``: the calls summed over the masters (replicas count what they
        replicate too)."""
        assert section == "commandstats"
        per_node = await self.client.info(section, target_nodes=RedisCluster.PRIMARIES)
        total: dict[str, dict[str, int]] = {}
        for stats in per_node.values():
            for name, stat in stats.items():
                total.setdefault(name, {"calls": 0})["calls"] += int(stat["calls"])
        return total


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisClusterServer]:
    if not os.path.exists(REDIS) or not os.path.exists(REDIS_CLI):
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    cluster = RedisClusterServer()
    try:
        cluster.create()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def redis_cluster(redis_cluster_session: RedisClusterServer) -> RedisClusterServer:
    """The session's cluster, reset for this test."""
    redis_cluster_session.reset()
    return redis_cluster_session


AnyRedis = RedisServer | RedisClusterServer


@pytest.fixture(params=["single", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> Iterator[AnyRedis]:
    """A redis-server, or the session's Redis Cluster (reset): tests that run on both."""
    if request.param == "cluster":
        yield request.getfixturevalue("redis_cluster")
        return
    yield from _single()


class AppProcess:
    """``tests/rooms_app.py`` running in its own process on ``port``."""

    def __init__(self, broker: str, *args: str, port: int | None = None) -> None:
        self.port = port if port is not None else free_port()
        cmd = [sys.executable, str(APP), str(self.port), broker, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_port(self.port, 15, self.proc)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket"

    def kill(self) -> None:
        """SIGKILL: no goodbye to Redis, presence must expire."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
async def app_processes() -> AsyncIterator[Callable[..., AppProcess]]:
    """``start(broker, *args)`` -> an :class:`AppProcess`; at teardown the test's peers
    close first (so the servers' graceful shutdown is quick), then every process stops."""
    started: list[AppProcess] = []

    def start(broker: str, *args: str, port: int | None = None) -> AppProcess:
        proc = AppProcess(broker, *args, port=port)
        started.append(proc)
        return proc

    yield start
    await _close_all_peers()
    for proc in started:
        proc.stop()


class Peer:
    """A typed client: ``request`` waits for its reply; other messages go to ``events``."""

    _ids = itertools.count(1)
    #: Every peer opened, closed by the ``close_peers`` fixture.
    opened: list[Peer] = []

    def __init__(self, conn: tether.Conn) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []
        Peer.opened.append(self)

    @classmethod
    async def open(cls, url: str, **query: str) -> Peer:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        conn = await tether.connect(f"{url}?{qs}" if qs else url)
        peer = cls(conn)
        await peer.event("welcome")  # broadcasts to rooms joined in on_connect may come first
        return peer

    async def _next(self) -> dict[str, Any]:
        message: dict[str, Any] = msgspec.json.decode(await self.conn.receive())
        return message

    async def request(self, type: str, data: Any = None) -> Any:
        id = next(self._ids)
        await self.conn.send(msgspec.json.encode({"type": type, "data": data, "id": id}).decode())
        while True:
            message = await self._next()
            if message.get("id") == id:
                if message["type"] == "error":
                    raise tether.ReplyError(message["data"]["code"], message["data"]["message"])
                return message.get("data")
            self.events.append(message)

    async def event(self, type: str | None = None) -> dict[str, Any]:
        """The next message of ``type`` (any type if None), buffered or received."""
        for i, message in enumerate(self.events):
            if type is None or message["type"] == type:
                return self.events.pop(i)
        while True:
            message = await self._next()
            if type is None or message["type"] == type:
                return message
            self.events.append(message)

    async def close(self) -> None:
        """Close; drop TCP if the server does not answer within a second (it may be dead)."""
        try:
            await asyncio.wait_for(self.conn.close(), 1.0)
        except (asyncio.TimeoutError, tether.ConnectionClosed):
            self.conn._transport.disconnect()
            await self.conn.wait_closed()


@pytest.fixture(autouse=True)
async def close_peers() -> AsyncIterator[None]:
    """Close every :class:`Peer` a test opened (import this fixture into the test module)."""
    yield
    await _close_all_peers()


async def _close_all_peers() -> None:
    peers, Peer.opened = Peer.opened, []
    await asyncio.gather(*(peer.close() for peer in peers))


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> None:
    """Poll ``check`` until it returns True; fail after ``seconds`` (scaled)."""
    deadline = time.monotonic() + seconds * TIMEOUT_SCALE
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        await asyncio.sleep(0.05)  # polling a condition under a deadline


async def open_peers(url: str, n: int, prefix: str = "p", **query: str) -> list[Peer]:
    """``n`` peers named ``<prefix>0..``, opened 50 at a time (the listen backlog is finite)."""
    peers: list[Peer] = []
    for start in range(0, n, 50):
        batch = range(start, min(n, start + 50))
        peers += await asyncio.gather(*(Peer.open(url, name=f"{prefix}{i}", **query) for i in batch))
    return peers


__all__ = [
    "RedisServer",
    "RedisClusterServer",
    "ClusterAdmin",
    "AnyRedis",
    "AppProcess",
    "Peer",
    "eventually",
    "free_port",
    "free_ports",
    "redis_server",
    "redis_cluster",
    "redis_cluster_session",
    "any_redis",
    "app_processes",
    "open_peers",
    "close_peers",
]
