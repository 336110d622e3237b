"""The Redis broker: rooms and presence shared by every process using one Redis.

The only module that imports redis (``pip install 'tether[redis]'``).

.. code-block:: python

    tether.run(app, port=8000, workers=4, broker="redis://127.0.0.1:6379/0")
    # or, to tune it:
    tether.run(app, broker=RedisBroker("redis://...", presence_ttl=10, heartbeat_interval=3))

* **Fan-out**: one Redis pub/sub channel per room (``<prefix>:room:<room>``), subscribed
  while this process has a member in the room. Each broadcast is published once; the
  publishing process drops its own copy (it delivered locally already), so every member
  gets it exactly once. Publications are queued and pipelined by one task: a broadcast
  never waits for Redis.
* **Presence**: one hash per room and process (``<prefix>:presence:<room>:<node>``,
  member id -> JSON meta) plus a set of the processes in the room, all with a TTL of
  ``presence_ttl`` seconds that a heartbeat every ``heartbeat_interval`` seconds renews by
  rewriting this process's whole presence. A process that dies stops renewing: its members
  vanish from every presence list within ``presence_ttl``.
* **Faults**: if Redis goes away the server keeps serving its own connections (local
  broadcasts still arrive), logs a warning, and reconnects with exponential backoff and
  jitter; on reconnect it resubscribes and rewrites its presence (a restarted Redis has
  none). While Redis is away, broadcasts to and from other processes are dropped (counted
  in ``dropped``), and presence lists show only this process's members.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections import deque
from typing import Any
from urllib.parse import urlsplit, urlunsplit

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - exercised by tests with redis hidden
    raise ImportError("tether's Redis broker needs redis-py: pip install 'tether[redis]'") from exc

from ..proto.backoff import backoff_delay
from .broker import Broker, Deliver

__all__ = ["RedisBroker", "LinkState"]

logger = logging.getLogger("tether.redis")

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class LinkState(enum.Enum):
    CONNECTING = 1
    UP = 2
    DOWN = 3
    CLOSED = 4


class RedisBroker(Broker):
    """A :class:`tether.broker.Broker` over Redis pub/sub, with presence kept in Redis.

    Settings: ``url`` (``redis://[:password@]host:port/db``, ``rediss://`` for TLS);
    ``prefix`` of every key and channel; ``presence_ttl`` (seconds a dead process's members
    stay listed, at most) and ``heartbeat_interval`` (must be well below it);
    ``max_outbox`` publications waiting for Redis (oldest dropped beyond);
    ``connect_timeout`` and ``command_timeout`` in seconds; reconnect backoff between
    ``backoff_base`` and ``backoff_cap`` seconds.
    """

    shared = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "tether",
        # Presence
        presence_ttl: float = 15.0,
        heartbeat_interval: float = 5.0,
        # Limits
        max_outbox: int = 10_000,
        # Timeouts
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        if not 0 < heartbeat_interval < presence_ttl:
            raise ValueError("need 0 < heartbeat_interval < presence_ttl")
        self.url = url
        self.prefix = prefix
        self.presence_ttl = presence_ttl
        self.heartbeat_interval = heartbeat_interval
        self.max_outbox = max_outbox
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.state = LinkState.CONNECTING
        #: Publications dropped: Redis away, or outbox full.
        self.dropped = 0
        #: Publications sent and received.
        self.published = 0
        self.received = 0
        self._node = ""
        self._deliver: Deliver | None = None
        self._client: Any = None
        self._pubsub: Any = None
        self._rooms: dict[bytes, str] = {}  # channel -> room, rooms we subscribe to
        self._local: dict[str, dict[str, bytes]] = {}  # this node's presence: room -> member -> meta
        self._synced: set[str] = set()  # rooms whose presence hash we wrote
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._wake = asyncio.Event()
        # Presence writes go one at a time: a heartbeat rewriting a snapshot taken before a
        # join would otherwise erase that join in Redis.
        self._presence_lock = asyncio.Lock()
        self._run_task: asyncio.Task[None] | None = None
        self._session_over = False
        self._first: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<RedisBroker {_redact(self.url)} {self.state.name}>"

    # -- keys --------------------------------------------------------------------------
    def _channel(self, room: str) -> bytes:
        return f"{self.prefix}:room:{room}".encode()

    def _hash(self, room: str) -> str:
        return f"{self.prefix}:presence:{room}:{self._node}"

    def _nodes(self, room: str) -> str:
        return f"{self.prefix}:nodes:{room}"

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, node: str, deliver: Deliver) -> None:
        """Connect; returns after the first attempt (connected or not: then it retries)."""
        self._node, self._deliver = node, deliver
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=self.command_timeout,
            retry=Retry(NoBackoff(), 0),  # we reconnect ourselves; never block a caller retrying
        )
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._run_task = loop.create_task(self._run())
        await asyncio.wait([self._first], timeout=self.connect_timeout + self.command_timeout)

    async def close(self) -> None:
        if self.state is LinkState.CLOSED:
            return
        was_up = self.state is LinkState.UP
        self.state = LinkState.CLOSED
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.wait([self._run_task], timeout=self.command_timeout)
        if self._client is None:
            return
        if was_up and self._synced:
            try:
                await self._withdraw()
            except _ERRORS as exc:
                logger.warning("could not withdraw presence from %s: %s", _redact(self.url), exc)
        await self._client.aclose()

    async def _withdraw(self) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for room in self._synced:
                pipe.delete(self._hash(room))
                pipe.srem(self._nodes(room), self._node)
            await pipe.execute()

    # -- the connection loop -------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while self.state is not LinkState.CLOSED:
            try:
                await self._session()
            except _ERRORS as exc:
                if self._is_closed():
                    return
                if self.state is LinkState.UP:
                    attempt = 0
                    logger.warning(
                        "lost Redis at %s (%s); serving local members only, reconnecting", _redact(self.url), exc or type(exc).__name__
                    )
                elif attempt == 0:
                    logger.warning("cannot reach Redis at %s (%s); retrying", _redact(self.url), exc or type(exc).__name__)
                self.state = LinkState.DOWN
            finally:
                self._lost()
            delay = backoff_delay(attempt, random.random(), base=self.backoff_base, cap=self.backoff_cap)
            attempt += 1
            logger.debug("reconnecting to Redis in %.2fs (attempt %d)", delay, attempt)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection: subscribe, resync presence, then read until the link fails."""
        pubsub = self._client.pubsub()
        try:
            channels = [f"{self.prefix}:node:{self._node}".encode(), *self._rooms]
            await pubsub.subscribe(*channels)
            await self._sync_presence()
            self._pubsub = pubsub
            recovered = self.state is LinkState.DOWN
            self.state = LinkState.UP
            missing = set(self._rooms) - set(channels)
            if missing:
                await pubsub.subscribe(*missing)
            if recovered:
                logger.warning("reconnected to Redis at %s; resubscribed to %d rooms", _redact(self.url), len(self._rooms))
            else:
                logger.info("connected to Redis at %s", _redact(self.url))
            self._release_first()
            await self._supervise(pubsub)
        finally:
            self._pubsub = None
            try:
                await pubsub.aclose()
            except _ERRORS:
                pass

    async def _supervise(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        self._session_over = False
        tasks = [loop.create_task(c) for c in (self._read(pubsub), self._heartbeat(), self._publisher())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the failure that ended the session
        finally:
            # redis-py can swallow a cancellation that lands inside a pipeline: the loops
            # also check _session_over, and we never wait for them without a bound.
            self._session_over = True
            for task in tasks:
                task.cancel()
            self._wake.set()
            await asyncio.wait(tasks, timeout=self.command_timeout)

    def _lost(self) -> None:
        self._release_first()
        self.dropped += len(self._outbox)
        self._outbox.clear()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _is_closed(self) -> bool:
        return self.state is LinkState.CLOSED  # a separate call: close() may run during an await

    def _release_first(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    async def _read(self, pubsub: Any) -> None:
        while not self._session_over:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == b"message" or kind == "message":
                self._on_publication(channel, message["data"])
            elif kind == b"subscribe" or kind == "subscribe":
                for fut in self._waiters.pop(channel, ()):
                    if not fut.done():
                        fut.set_result(None)

    def _on_publication(self, channel: bytes, data: bytes) -> None:
        room = self._rooms.get(channel)
        if room is None or self._deliver is None:
            return
        self.received += 1
        try:
            self._deliver(room, data)
        except Exception:
            logger.exception("delivering a broadcast in room %r failed", room)

    async def _heartbeat(self) -> None:
        while not self._session_over:
            await asyncio.sleep(self.heartbeat_interval)
            await self._sync_presence()

    async def _sync_presence(self) -> None:
        """Rewrite this node's whole presence with a fresh TTL (heals a restarted Redis)."""
        async with self._presence_lock:
            await self._write_presence()

    async def _write_presence(self) -> None:
        ttl = int(self.presence_ttl * 1000)
        rooms = {room: dict(members) for room, members in self._local.items() if members}
        async with self._client.pipeline(transaction=True) as pipe:
            for room, members in rooms.items():
                key = self._hash(room)
                pipe.delete(key)
                pipe.hset(key, mapping=members)
                pipe.pexpire(key, ttl)
                pipe.sadd(self._nodes(room), self._node)
                pipe.pexpire(self._nodes(room), ttl)
            for room in self._synced - rooms.keys():
                pipe.delete(self._hash(room))
                pipe.srem(self._nodes(room), self._node)
            await pipe.execute()
        self._synced = set(rooms)

    async def _publisher(self) -> None:
        while not self._session_over:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox and not self._session_over:
                batch = list(self._outbox)
                self._outbox.clear()
                async with self._client.pipeline(transaction=False) as pipe:
                    for channel, data in batch:
                        pipe.publish(channel, data)
                    await pipe.execute()
                self.published += len(batch)

    # -- Broker --------------------------------------------------------------------------
    async def subscribe(self, room: str) -> None:
        return await self._subscribe(room)

    async def _subscribe(self, room: str) -> None:
        channel = self._channel(room)
        self._rooms[channel] = room
        pubsub = self._pubsub
        if self.state is not LinkState.UP or pubsub is None:
            return  # the next session subscribes to every room
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(fut)
        try:
            await pubsub.subscribe(channel)
            await asyncio.wait_for(asyncio.shield(fut), self.command_timeout)
        except _ERRORS as exc:
            logger.debug("subscribe to %r failed (%s); the reconnect will retry", room, exc)

    async def unsubscribe(self, room: str) -> None:
        return await self._unsubscribe(room)

    async def _unsubscribe(self, room: str) -> None:
        channel = self._channel(room)
        self._rooms.pop(channel, None)
        pubsub = self._pubsub
        if self.state is LinkState.UP and pubsub is not None:
            try:
                await pubsub.unsubscribe(channel)
            except _ERRORS as exc:
                logger.debug("unsubscribe from %r failed: %s", room, exc)

    async def publish(self, room: str, data: bytes) -> None:
        if self.state is not LinkState.UP:
            self.dropped += 1
            return
        if len(self._outbox) >= self.max_outbox:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append((self._channel(room), data))
        self._wake.set()

    async def put_member(self, room: str, member: str, meta: bytes) -> None:
        return await self._put_member(room, member, meta)

    async def _put_member(self, room: str, member: str, meta: bytes) -> None:
        self._local.setdefault(room, {})[member] = meta
        if self.state is not LinkState.UP:
            return
        ttl = int(self.presence_ttl * 1000)
        try:
            async with self._presence_lock, self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self._hash(room), member, meta)
                pipe.pexpire(self._hash(room), ttl)
                pipe.sadd(self._nodes(room), self._node)
                pipe.pexpire(self._nodes(room), ttl)
                await pipe.execute()
                self._synced.add(room)
        except _ERRORS as exc:
            logger.debug("presence write for %r failed (%s); the heartbeat will retry", room, exc)

    async def drop_member(self, room: str, member: str) -> None:
        return await self._drop_member(room, member)

    async def _drop_member(self, room: str, member: str) -> None:
        members = self._local.get(room)
        if members is not None:
            members.pop(member, None)
            if not members:
                del self._local[room]
        if self.state is not LinkState.UP:
            return
        try:
            async with self._presence_lock:
                await self._client.hdel(self._hash(room), member)
        except _ERRORS as exc:
            logger.debug("presence removal for %r failed (%s); the heartbeat will retry", room, exc)

    async def members(self, room: str) -> dict[str, bytes]:
        """Members on every node; only this node's while Redis is away."""
        return await self._members(room)

    async def _members(self, room: str) -> dict[str, bytes]:
        if self.state is LinkState.UP:
            try:
                return await self._read_members(room)
            except _ERRORS as exc:
                logger.debug("presence read for %r failed (%s); answering with local members", room, exc)
        return dict(self._local.get(room, {}))

    async def _read_members(self, room: str) -> dict[str, bytes]:
        nodes = sorted(await self._client.smembers(self._nodes(room)))
        if not nodes:
            return {}
        async with self._client.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.hgetall(f"{self.prefix}:presence:{room}:{node.decode()}")
            hashes = await pipe.execute()
        found: dict[str, bytes] = {}
        gone = []
        for node, members in zip(nodes, hashes, strict=True):  # one HGETALL reply per node
            if not members:
                gone.append(node)  # its hash expired: the process died
            for member, meta in members.items():
                found[member.decode()] = meta
        if gone:
            await self._client.srem(self._nodes(room), *gone)
        return found


def _redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
