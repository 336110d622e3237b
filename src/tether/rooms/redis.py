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
  ``presence_ttl`` seconds. Joins and leaves write their member (HSET, HDEL); a heartbeat
  every ``heartbeat_interval`` seconds only renews the TTLs (one pipelined PEXPIRE per key).
  A key the renewal finds gone (evicted, or expired during a long pause) has its room
  rewritten, as has a room whose write failed; the whole presence is rewritten after each
  (re)connect. A process that dies stops renewing: its members vanish from every presence
  list within ``presence_ttl``.
* **Faults**: every way a session ends (Redis gone, a timeout, or an unexpected error,
  logged with its traceback) is logged, and the broker reconnects with exponential backoff
  and jitter; only :meth:`RedisBroker.close` stops it. Meanwhile the server keeps serving its
  own connections (local broadcasts still arrive). On reconnect it resubscribes and
  rewrites its presence (a restarted Redis has none). While Redis is away, broadcasts to
  and from other processes are dropped, and so is a batch of publications in a pipeline
  that failed (all counted in ``dropped``: unconfirmed means lost, never resent); presence
  lists show only this process's members.
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

from ..proto.backoff import Backoff
from .broker import Broker, Deliver

__all__ = ["RedisBroker", "LinkState"]

logger = logging.getLogger("tether.redis")

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

# Drop from a room's node set the nodes whose presence hash is gone, in one step: a node that
# rewrote its hash between our read and the removal stays listed. KEYS: the node set, then
# one hash per node of ARGV.
_DROP_GONE = """
local removed = 0
for i, node in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], node)
  end
end
return removed
"""


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
    ``backoff_base`` and ``backoff_cap`` seconds (it starts again from ``backoff_base`` once
    a session stayed up ``heartbeat_interval``).
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
        #: Publications dropped: Redis away, outbox full, or lost in a failed pipeline.
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
        self._synced: set[str] = set()  # rooms whose presence we wrote (keys we may have in Redis)
        self._dirty: set[str] = set()  # rooms whose presence write failed or waits for the link
        self._drop_gone: Any = None
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._wake = asyncio.Event()
        # Presence writes go one at a time: a rewrite of a snapshot taken before a join
        # would otherwise erase that join in Redis.
        self._presence_lock = asyncio.Lock()
        self._run_task: asyncio.Task[None] | None = None
        self._session_over = False
        self._first: asyncio.Future[None] | None = None
        self._backoff = Backoff(base=backoff_base, cap=backoff_cap, stable_after=heartbeat_interval)

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
        self._drop_gone = self._client.register_script(_DROP_GONE)
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
        if was_up and (self._synced or self._dirty):
            try:
                await self._withdraw()
            except _ERRORS as exc:
                logger.warning("could not withdraw presence from %s: %s", _redact(self.url), exc)
        await self._client.aclose()

    async def _withdraw(self) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for room in self._synced | self._dirty:
                pipe.delete(self._hash(room))
                pipe.srem(self._nodes(room), self._node)
            await pipe.execute()

    # -- the connection loop -------------------------------------------------------------
    async def _run(self) -> None:
        """Sessions until :meth:`close`: however one ends, log it, back off, reconnect."""
        failed = 0  # attempts in a row that never came up
        while not self._is_closed():
            try:
                error = await self._attempt()
            finally:  # CancelledError (close) goes through here and on up
                was_up = self.state is LinkState.UP
                if not self._is_closed():
                    self.state = LinkState.DOWN
                self._lost()
            if self._is_closed():
                return
            self._log_end(error, was_up, failed)
            failed = 0 if was_up else failed + 1
            self._backoff.maybe_reset(asyncio.get_running_loop().time())
            delay = self._backoff.next_delay(random.random())
            logger.debug("reconnecting to Redis in %.2fs (attempt %d)", delay, self._backoff.attempt)
            await asyncio.sleep(delay)

    async def _attempt(self) -> Exception | None:
        """One session; returns what ended it. Any exception, not only Redis's: a bug in a
        callback or an error type redis-py adds must not leave the broker dead."""
        try:
            await self._session()
        except Exception as exc:
            return exc
        return None

    def _log_end(self, error: Exception | None, was_up: bool, failed: int) -> None:
        expected = isinstance(error, _ERRORS)
        if error is None:
            why = "the session ended"  # not expected either: its tasks only end by failing
        elif expected:
            why = str(error) or type(error).__name__
        else:
            why = f"unexpected {type(error).__name__}: {error}"
        if was_up:
            message = "lost Redis at %s (%s); serving local members only, reconnecting"
        elif failed == 0 or not expected:
            message = "cannot reach Redis at %s (%s); retrying"
        else:
            logger.debug("still cannot reach Redis at %s (%s)", _redact(self.url), why)
            return
        # An unexpected error is a bug somewhere: keep its traceback.
        logger.log(logging.WARNING if expected else logging.ERROR, message, _redact(self.url), why, exc_info=None if expected else error)

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
            self._backoff.connected(asyncio.get_running_loop().time())
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
            async with self._presence_lock:
                await self._renew()

    async def _renew(self) -> None:
        """Renew the TTL of this node's presence keys, one pipelined PEXPIRE each; rewrite
        only the rooms that need it: a key gone (PEXPIRE answered 0), a failed write, or the
        last member gone (then the keys are removed)."""
        renew = [room for room in self._synced if room in self._local and room not in self._dirty]
        if renew:
            ttl = self._ttl_ms()
            async with self._client.pipeline(transaction=False) as pipe:
                for room in renew:
                    pipe.pexpire(self._hash(room), ttl)
                    pipe.pexpire(self._nodes(room), ttl)
                renewed = await pipe.execute()
            pairs = zip(renewed[::2], renewed[1::2], strict=True)  # (hash, node set): 0 = no such key
            gone = [room for room, (hash_, nodes) in zip(renew, pairs, strict=True) if not (hash_ and nodes)]
            if gone:
                logger.warning("presence keys of %d rooms were gone from Redis (evicted or expired); rewriting them", len(gone))
                self._dirty.update(gone)
        stale = self._dirty | (self._local.keys() - self._synced) | (self._synced - self._local.keys())
        if stale:
            await self._rewrite(stale)

    async def _sync_presence(self) -> None:
        """Rewrite this node's whole presence with a fresh TTL (heals a restarted Redis)."""
        async with self._presence_lock:
            await self._rewrite(self._local.keys() | self._synced | self._dirty)

    async def _rewrite(self, rooms: set[str]) -> None:
        """Write ``rooms``' presence from this node's own record, in one transaction: a room
        with members gets its hash replaced and this node in its set, a room without has both
        removed. Call it holding the presence lock."""
        snapshot = {room: dict(self._local.get(room, {})) for room in rooms}
        self._dirty -= rooms
        ttl = self._ttl_ms()
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for room, members in snapshot.items():
                    key = self._hash(room)
                    pipe.delete(key)
                    if members:
                        pipe.hset(key, mapping=members)
                        pipe.pexpire(key, ttl)
                        pipe.sadd(self._nodes(room), self._node)
                        pipe.pexpire(self._nodes(room), ttl)
                    else:
                        pipe.srem(self._nodes(room), self._node)
                await pipe.execute()
        except BaseException:
            self._dirty |= rooms  # not written: the next heartbeat or session tries again
            raise
        for room, members in snapshot.items():
            if members:
                self._synced.add(room)
            else:
                self._synced.discard(room)

    def _ttl_ms(self) -> int:
        return int(self.presence_ttl * 1000)

    async def _publisher(self) -> None:
        while not self._session_over:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox and not self._session_over:
                batch = list(self._outbox)
                self._outbox.clear()
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for channel, data in batch:
                            pipe.publish(channel, data)
                        await pipe.execute()
                except BaseException:
                    self.dropped += len(batch)  # out of the outbox and unconfirmed: lost, not resent
                    raise
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
            # The next session rewrites it all; the heartbeat, if that session's snapshot was
            # taken before this join.
            self._dirty.add(room)
            return
        ttl = self._ttl_ms()
        try:
            async with self._presence_lock, self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self._hash(room), member, meta)
                pipe.pexpire(self._hash(room), ttl)
                pipe.sadd(self._nodes(room), self._node)
                pipe.pexpire(self._nodes(room), ttl)
                await pipe.execute()
                self._synced.add(room)
        except _ERRORS as exc:
            self._dirty.add(room)
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
            self._dirty.add(room)
            return
        try:
            async with self._presence_lock:
                await self._client.hdel(self._hash(room), member)
        except _ERRORS as exc:
            self._dirty.add(room)
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
            keys = [self._nodes(room), *(f"{self.prefix}:presence:{room}:{node.decode()}" for node in gone)]
            await self._drop_gone(keys=keys, args=gone)
        return found


def _redact(url: str) -> str:
    """``url`` without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
