"""The Redis broker: rooms, their streams and presence, shared by every process using one Redis.

The only module that imports redis (``pip install 'tether[redis]'``).

.. code-block:: python

    tether.run(app, port=8000, workers=4, broker="redis://127.0.0.1:6379/0")
    # or, to tune it:
    tether.run(app, broker=RedisBroker("redis://...", presence_ttl=10, heartbeat_interval=3))
    # a Redis Cluster (Redis >= 7):
    tether.run(app, workers=4, broker="redis+cluster://10.0.0.5:7000,10.0.0.6:7000")

* **Keys**: every key of a room carries the Redis Cluster hash tag ``{r:<room>}``, so a
  room's keys live on one shard: ``<prefix>:{r:<room>}:meta`` (hash: ``epoch``, ``top`` = the
  last offset, ``at`` = the time of the last publication, ``aged`` = the last offset dropped
  for its age, ``cut`` = the time of the last age trim), ``...:stream`` (the history: a Redis stream, entry id ``<offset>-<ms>``, field
  ``d``), ``...:seq:<instance>`` (the last publication of one broker instance, to apply a
  resent one once), ``...:presence:<node>`` and ``...:nodes`` (presence, below).
* **Streams**: ``publish_stream`` queues the message; one task pipelines the queue, one Lua
  script (:data:`_PUBLISH`) per message, which atomically gives it the room's next offset
  (``HINCRBY`` on the meta hash, whose ``epoch`` it creates if the hash is gone: a new epoch,
  the old stream deleted), appends it to the stream (``XADD MAXLEN ~ max_count``, entries
  older than ``max_age`` trimmed from the front at most every ``max_age / 8``, the stream's
  TTL ``max_age``) and publishes
  ``b"\\xff<offset>:<epoch>:" + data`` on the room's channel. Every subscribed process,
  the publisher too, delivers it from that channel, with its offset, in offset order.
  ``position`` and ``history`` are one script each (:data:`_POSITION`, :data:`_HISTORY`), so
  the epoch, the head and the entries are read together; ``history`` mirrors
  :meth:`tether.proto.resume.RoomLog.read` (count and age bounds applied on reading, so
  ``MAXLEN ~`` keeping a few more changes nothing).
* **Live gaps**: pub/sub loses what is published while a subscriber's connection is down,
  or a message whose script failed half-way. Each subscribed room has a :class:`Track`: an
  offset past the next one, or a reconnect (every subscribed room's head is read again after
  resubscribing), starts a repair that reads the missing range from the stream and delivers
  it in order, holding live arrivals meanwhile; what history no longer has goes to the hub's
  ``on_gap`` handler as a :class:`tether.proto.resume.Gap` (the hub tells the room's
  members with a session). Rooms subscribed while Redis was away are positioned before the
  outbox goes out, so what this process queued reaches its own members too.
* **Fan-out of raw messages** (``hub.send``, no offset): one Redis pub/sub channel per room
  (``<prefix>:room:<room>``), subscribed while this process has a member in the room,
  published once; the publishing process drops its own copy (it delivered locally already).
* **Presence**: one hash per room and process (``<prefix>:{r:<room>}:presence:<node>``,
  member id -> JSON meta) plus a set of the processes in the room (``...:nodes``), all with
  a TTL of ``presence_ttl`` seconds. Joins and leaves write their member (a script: HSET and
  the TTLs; HDEL); a
  heartbeat every ``heartbeat_interval`` seconds only renews the TTLs (one pipelined PEXPIRE
  per key). A key the renewal finds gone (evicted, or expired during a long pause) has its
  room rewritten, as has a room whose write failed; the whole presence is rewritten after
  each (re)connect. A process that dies stops renewing: its members vanish from every
  presence list within ``presence_ttl``.
* **Faults**: every way a session ends (Redis gone, a timeout, or an unexpected error,
  logged with its traceback) is logged, and the broker reconnects with exponential backoff
  and jitter; only :meth:`RedisBroker.close` stops it. Meanwhile the server keeps serving its
  own connections. Room stream messages wait in the bounded outbox (``max_outbox``, oldest
  dropped and counted in ``dropped``) and get their offsets, and reach every member, local
  ones too, once Redis is back; a batch whose pipeline failed is sent again (a script that
  ran already is not applied twice). Raw messages (``hub.send``) to and from other processes
  are dropped while Redis is away, as is a raw batch in a pipeline that failed (counted in
  ``dropped``). On reconnect the broker resubscribes, repairs every room from its last
  delivered offset, and rewrites its presence (a restarted Redis has none); presence lists
  show only this process's members meanwhile.
* **Lost writes**: a room whose offset in Redis is behind what this process delivered (a
  failover to a replica that had not received the last writes) starts a new epoch, by the
  publish script (told the epoch and offset this process delivered last) or by a repair's
  history read: never the same offset for two messages.
* **Redis Cluster** (``redis+cluster://host:port[,host:port...]`` or ``cluster=True``): every
  multi-key script is single-slot (a room's keys share ``{r:<room>}``; a session's two keys
  ``{s:<token>}``); the room's channel is a shard channel in the room's slot
  (``<prefix>:{r:<room>}:room``), SPUBLISHed by the publish script and for raw messages, and
  the node channels are shard channels too (``<prefix>:{n:<node>}:node``). Each session
  reads the slot map and opens one pub/sub connection per master (:class:`ShardedPubSub`):
  each channel is SSUBSCRIBEd on its slot's master. A master lost, a slot moved (the old
  master answers SUNSUBSCRIBE unasked) or a redirected SSUBSCRIBE ends the session; the next
  one starts from a fresh slot map and repairs every room as after any reconnect. Commands
  go through redis-py's ``RedisCluster`` with no retries (MOVED and ASK are followed: the
  command had not run); a pipeline is one per master, and the publications of a master that
  failed under it are handled as a failed pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote

try:
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.crc import key_slot
    from redis.exceptions import (
        AskError,
        ClusterError,
        NoScriptError,
        RedisClusterException,
        RedisError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised by tests with redis hidden
    raise ImportError("tether's Redis broker needs redis-py: pip install 'tether[redis]'") from exc

from ..proto.backoff import Backoff
from ..proto.resume import EPOCH, LOST, Gap
from .broker import Broker, Deliver, History, Release

__all__ = ["RedisBroker", "LinkState", "Track", "ShardedPubSub", "SlotMoved", "cluster_settings"]

logger = logging.getLogger("tether.redis")

# RedisClusterException: a cluster out of reach ("cannot be connected"), a slot not covered.
_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
# A reply in a cluster pipeline saying its command may not have run, or did not: the node's
# connection failed, the cluster is down, its slot is moving. The session ends on it.
_UNCONFIRMED = (RedisConnectionError, RedisTimeoutError, ClusterError, TryAgainError, AskError, RedisClusterException, OSError)
_CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")

#: ``on_gap(room, gap)`` (:class:`tether.rooms.broker.LostGap`).
OnGap = Callable[[str, Gap], None]

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

# One member joins (or updates its meta) on this node, atomically (a script, not MULTI: a
# cluster pipeline cannot hold a transaction). KEYS: 1 this node's presence hash, 2 the node
# set. ARGV: 1 member, 2 meta, 3 this node, 4 the TTL (ms).
_PUT_MEMBER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# This node's presence in one room, replaced atomically (a reader never sees the hash gone
# while it is rewritten, which would drop the node from the set): with members, the hash
# holds exactly them and the node is in the set; without, both are gone.
# KEYS: 1 the hash, 2 the node set. ARGV: 1 this node, 2 the TTL (ms), then member, meta...
_REWRITE = """
redis.call('DEL', KEYS[1])
if #ARGV > 2 then
  for i = 3, #ARGV, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SREM', KEYS[2], ARGV[1])
end
return 1
"""

# One publication to a room's stream, atomically: offset, history, pub/sub.
# KEYS: 1 the room's meta hash, 2 its stream, 3 this broker instance's last publication seq.
# ARGV: 1 the room's channel, 2 the data, 3 max_count, 4 max_age (ms), 5 the meta's TTL (ms),
# 6 a fresh epoch (used only if the room has none), 7 the publication's seq, 8 the seq key's
# TTL (ms), 9 '1' if the publication is sent again (its pipeline failed: it may have run),
# 10 and 11 the epoch and offset this process delivered last in the room ('' and 0: none),
# 12 this broker instance's id (the channel message names the publication: instance.seq, so a
# publisher knows which of a failed pipeline's publications ran: it saw them come back).
# Returns the offset given, or 0 for a publication that ran already.
# A room whose offset in Redis is behind what a process delivered lost its last writes (a
# failover to a replica that had not received them, a restore from an older dump): giving
# those offsets again would make them duplicates to whoever saw the first ones, so it starts
# a new epoch instead (every member then gets an epoch gap).
# Entries older than max_age are trimmed from the front at most every max_age / 8 (the meta's
# 'cut'); reads filter by age anyway, so this bounds memory, not what a reader sees.
_PUBLISH = r"""
if ARGV[9] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen and tonumber(seen) >= tonumber(ARGV[7]) then
    return 0
  end
end
redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[8])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'at', 'cut', 'top')
local epoch, before, cut = meta[1], tonumber(meta[2] or '0'), tonumber(meta[3] or '0')
if epoch and epoch == ARGV[10] and tonumber(meta[4] or '0') < tonumber(ARGV[11]) then
  epoch = nil
end
local fields = {'at', now}
if not epoch then
  epoch = ARGV[6]
  cut = 0
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'top', 'aged', 'cut')
  fields[#fields + 1] = 'epoch'
  fields[#fields + 1] = epoch
end
local offset = redis.call('HINCRBY', KEYS[1], 'top', 1)
local max_count, max_age = tonumber(ARGV[3]), tonumber(ARGV[4])
if max_count > 0 and max_age > 0 then
  if offset > 1 and now - before > max_age and redis.call('EXISTS', KEYS[2]) == 0 then
    fields[#fields + 1] = 'aged'  -- the stream expired as a whole: the room was idle
    fields[#fields + 1] = offset - 1
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', max_count, string.format('%d-%d', offset, now), 'd', ARGV[2])
  if now - cut >= max_age / 8 then
    fields[#fields + 1] = 'cut'
    fields[#fields + 1] = now
    local aged, keep = nil, nil
    for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 256)) do
      local o, t = string.match(entry[1], '^(%d+)-(%d+)$')
      if now - tonumber(t) <= max_age then
        keep = o
        break
      end
      aged = tonumber(o)
    end
    if aged then
      redis.call('XTRIM', KEYS[2], 'MINID', keep or string.format('%d', aged + 1))
      fields[#fields + 1] = 'aged'
      fields[#fields + 1] = aged
    end
  end
  redis.call('PEXPIRE', KEYS[2], max_age)
else
  redis.call('DEL', KEYS[2])
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[1], '\255' .. string.format('%d', offset) .. ':' .. epoch .. ':' .. (ARGV[12] or '') .. '.' .. ARGV[7] .. ':' .. ARGV[2])
return offset
"""

# A room's position: {epoch, top}. A room without a meta hash (never published to, or its
# history lost) gets one now, with a fresh epoch: every process then reads the same.
# KEYS: 1 meta, 2 stream. ARGV: 1 a fresh epoch, 2 the meta's TTL (ms).
_POSITION = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {epoch, tonumber(redis.call('HGET', KEYS[1], 'top') or '0')}
"""

# The messages after offset ARGV[1] of epoch ARGV[2], as MemoryBroker.history gives them: if
# ARGV[2] is not the room's epoch (its history was lost), the current epoch's from its start.
# KEYS: 1 meta, 2 stream. ARGV: 1 after, 2 epoch, 3 limit, 4 max_count, 5 max_age (ms),
# 6 a fresh epoch, 7 the meta's TTL (ms), 8 '1' if ``after`` is what this process delivered
# (a repair): then a room behind it in the same epoch lost its last writes and starts a new
# epoch, as in _PUBLISH (an offset a client claims does not do that).
# Returns {epoch, top, reason, first, offset, data, offset, data...}: the messages kept from
# offset first on; reason '' (nothing missing), or why the ones before first are missing:
# 'trimmed', 'expired', 'too_many' (then none are replayed), 'epoch' (another epoch).
_HISTORY = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and ARGV[8] == '1' and epoch == ARGV[2] and tonumber(ARGV[1]) > tonumber(redis.call('HGET', KEYS[1], 'top') or '0') then
  epoch = nil
end
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[2])
  redis.call('HDEL', KEYS[1], 'aged', 'cut', 'at')
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
end
local top = tonumber(redis.call('HGET', KEYS[1], 'top') or '0')
local after = tonumber(ARGV[1])
local other = epoch ~= ARGV[2]
if other then
  after = 0
end
if after >= top then
  return {epoch, top, other and 'epoch' or '', top + 1}
end
if top - after > tonumber(ARGV[3]) then
  return {epoch, top, other and 'epoch' or 'too_many', top + 1}
end
local max_count, max_age = tonumber(ARGV[4]), tonumber(ARGV[5])
local reply = {epoch, top, '', top + 1}
if max_count <= 0 or max_age <= 0 then
  reply[3] = (other and 'epoch') or ((max_count <= 0) and 'trimmed') or 'expired'
  return reply
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local floor = top - max_count
local aged = false
local range = redis.call('XRANGE', KEYS[2], string.format('%d', after + 1), '+', 'COUNT', top - after)
for _, entry in ipairs(range) do
  local o, t = string.match(entry[1], '^(%d+)-(%d+)$')
  o = tonumber(o)
  if o > floor then
    if now - tonumber(t) > max_age then
      aged = true
    else
      if #reply == 4 then
        reply[4] = o
      end
      reply[#reply + 1] = o
      reply[#reply + 1] = entry[2][2]
    end
  end
end
if other then
  reply[3] = 'epoch'
elseif reply[4] > after + 1 then
  local missing = reply[4] - 1
  local last_aged = tonumber(redis.call('HGET', KEYS[1], 'aged') or '0')
  local at = tonumber(redis.call('HGET', KEYS[1], 'at') or '0')
  if missing > floor and (aged or missing <= last_aged or now - at > max_age) then
    reply[3] = 'expired'
  else
    reply[3] = 'trimmed'
  end
end
return reply
"""

#: The first byte of a stream publication (raw ones start with the ASCII node id).
_STREAM: Final = 0xFF
_SEQ_TTL_MS: Final = b"600000"  # ms a publication sent again is recognised as applied
_SYNC_ROUNDS: Final = 8  # history reads one repair makes before it gives up on a hole
_SYNC_FAILURES: Final = 5  # failed reads (with the link up) before it gives up
_RESYNC_CHUNK: Final = 500  # rooms per pipelined position read after a reconnect


class LinkState(enum.Enum):
    CONNECTING = 1
    UP = 2
    DOWN = 3
    CLOSED = 4


# -- live stream bookkeeping (pure: no I/O, no clock) -------------------------------------------
#: What :meth:`Track.arrive` says to do with a live message.
DELIVER: Final = 0
SEEN: Final = 1
HELD: Final = 2

Out = list["tuple[int, bytes] | Gap"]


class Track:
    """One subscribed room's stream as this process delivers it: in offset order, each once.

    ``epoch`` and ``last`` are what was delivered last (``last`` None until the room's position
    is known). A live message that follows ``last`` is delivered at once; any other is held
    (:data:`HELD`) and the caller syncs: it reads the room's history after ``last``
    (:meth:`read`), or its position (:meth:`position`), then :meth:`drain` delivers what was
    held and says whether a hole remains; :meth:`give_up` reports the holes as lost. A new
    epoch (Redis lost the room's history) is a gap ``Gap(0, k, "epoch", new)``: offsets start
    again, and what the new epoch kept after ``k`` follows.
    """

    __slots__ = ("epoch", "last", "held")

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.last: int | None = None
        #: Live messages waiting: ``(epoch, offset, data)`` in arrival order.
        self.held: list[tuple[str, int, bytes]] = []

    def arrive(self, epoch: str, offset: int, data: bytes, *, syncing: bool = False) -> int:
        """A live message: :data:`DELIVER` it now, :data:`SEEN` already (drop it), or
        :data:`HELD` (a hole before it, another epoch, a sync running or not positioned yet:
        sync)."""
        if not syncing and not self.held and epoch == self.epoch and self.last is not None:
            if offset == self.last + 1:
                self.last = offset
                return DELIVER
            if offset <= self.last:
                return SEEN
        self.held.append((epoch, offset, data))
        return HELD

    def position(self, epoch: str, head: int) -> None:
        """The room's position, read after subscribing: deliver from there. A held message
        at or before ``head`` was published after the subscription: it and what follows it
        are delivered; held messages of another epoch are older than the position."""
        first = min((offset for e, offset, _ in self.held if e == epoch), default=head + 1)
        self.epoch, self.last = epoch, min(head, first - 1)
        self.held = [held for held in self.held if held[0] == epoch]

    def read(self, epoch: str, items: list[tuple[int, bytes]], gap: Gap | None) -> Out:
        """The room's history after ``last``, as :meth:`RedisBroker.history` answers it
        (``epoch``: the room's now; if it is not ours the stream restarted, and the answer is
        the new epoch's from its start, after ``Gap(0, k, "epoch")``): what to deliver."""
        assert self.last is not None, "not positioned"
        out: Out = []
        if epoch != self.epoch:
            self.epoch, self.last = epoch, 0
            self.last = self._until_held(gap.last if gap is not None else 0)
            out.append(Gap(0, self.last, EPOCH, epoch))
        elif gap is not None and gap.last > self.last:
            last = self._until_held(gap.last)
            if last > self.last:
                out.append(Gap(self.last + 1, last, gap.reason, gap.epoch))
                self.last = last
        for offset, data in items:
            if offset == self.last + 1:
                out.append((offset, data))
                self.last = offset
        return out

    def _until_held(self, last: int) -> int:
        """A gap from history ends before what we hold: that arrived live, it is not lost."""
        held = [offset for epoch, offset, _ in self.held if epoch == self.epoch and offset > (self.last or 0)]
        return min(last, min(held) - 1) if held else last

    def drain(self) -> tuple[list[tuple[int, bytes]], bool]:
        """The held messages that now follow in order, and whether a hole remains (or a held
        message of another epoch was dropped: read again to learn which epoch is current)."""
        assert self.last is not None, "not positioned"
        mine = sorted((offset, data) for epoch, offset, data in self.held if epoch == self.epoch)
        other = len(mine) != len(self.held)
        out: list[tuple[int, bytes]] = []
        keep: list[tuple[str, int, bytes]] = []
        for offset, data in mine:
            if offset == self.last + 1:
                out.append((offset, data))
                self.last = offset
            elif offset > self.last:
                assert self.epoch is not None
                keep.append((self.epoch, offset, data))
        self.held = keep
        return out, bool(keep) or other

    def give_up(self) -> Out:
        """Stop waiting for the holes: each becomes a ``lost`` gap; what is held goes out."""
        if self.last is None:
            if not self.held:
                return []
            self.position(self.held[-1][0], min(o for e, o, _ in self.held if e == self.held[-1][0]) - 1)
        assert self.last is not None and self.epoch is not None
        out: Out = []
        for offset, data in sorted((o, d) for e, o, d in self.held if e == self.epoch):
            if offset <= self.last:
                continue
            if offset > self.last + 1:
                out.append(Gap(self.last + 1, offset - 1, LOST, self.epoch))
            out.append((offset, data))
            self.last = offset
        self.held = []
        return out


class _Room:
    """A subscribed room: its :class:`Track` and the sync (repair) running for it."""

    __slots__ = ("track", "task", "again", "unknown")

    def __init__(self) -> None:
        self.track = Track()
        self.task: asyncio.Task[None] | None = None
        self.again = False  # read once more when the running sync ends (a reconnect happened)
        #: A member was told the room's position is unknown (``(None, 0)``: it joined while
        #: Redis was away): it learns the epoch when the room is positioned (see _positioned).
        self.unknown = False


def parse(data: bytes) -> tuple[int, str, bytes, bytes]:
    """A stream publication from pub/sub: ``(offset, epoch, origin, data)`` (``origin``: the
    publishing broker's ``instance.seq``). Raises ``ValueError``."""
    colon = data.index(b":", 1)
    end = data.index(b":", colon + 1)
    origin = data.index(b":", end + 1)
    return int(data[1:colon]), data[colon + 1 : end].decode(), data[end + 1 : origin], data[origin + 1 :]


def _history_reply(reply: list[Any], after: int) -> tuple[str, int, list[tuple[int, bytes]], Gap | None]:
    """``(epoch, head, messages, gap)`` of a :data:`_HISTORY` reply."""
    epoch, head, reason, first = reply[0].decode(), int(reply[1]), reply[2].decode(), int(reply[3])
    items = [(int(reply[i]), bytes(reply[i + 1])) for i in range(4, len(reply), 2)]
    if not reason:
        return epoch, head, items, None
    return epoch, head, items, Gap(0 if reason == EPOCH else after + 1, first - 1, reason, epoch)


class SlotMoved(RedisError):
    """A shard channel's slot is no longer where this session subscribed to it (a failover
    or a resharding moved it): the session ends, the next one reads the slot map again."""


class ShardedPubSub:
    """Sharded pub/sub on a Redis Cluster (Redis >= 7: ``SSUBSCRIBE``): one connection per
    master, each channel subscribed on the master that owns its slot in the slot map read when
    the session started, one reader per connection.

    The same calls as redis-py's ``PubSub`` where the broker uses them (``subscribe``,
    ``unsubscribe``, ``aclose``), and :meth:`run` in the place of a ``get_message`` loop. A
    channel's slot moving (its old master answers ``SUNSUBSCRIBE`` unasked, as a master does
    when a failover demotes it, or a command there is redirected), a connection lost, or a
    slot without an owner ends :meth:`run` with the error: the broker's session ends and the
    next one starts from a fresh slot map (redis-py's own ``ClusterPubSub`` polls its nodes in
    turn, and follows a moved slot on its own, behind the broker's back)."""

    def __init__(self, owners: dict[int, str], clients: dict[str, Any]) -> None:
        self._owners = owners  # slot -> master name (host:port)
        self._clients = clients  # master name -> a Redis client of that node alone
        self._pubsubs = {name: client.pubsub() for name, client in clients.items()}
        self._where: dict[bytes, str] = {}  # channel -> the master it is subscribed on
        self._leaving: dict[bytes, int] = {}  # SUNSUBSCRIBE sent, its answer not read yet
        self._failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def connect(self) -> None:
        """Open every master's connection (a master out of reach fails the session now)."""
        await asyncio.gather(*(pubsub.connect() for pubsub in self._pubsubs.values()))

    def _fail(self, exc: Exception) -> None:
        if not self._failed.done():
            self._failed.set_exception(exc)

    async def subscribe(self, *channels: bytes) -> None:
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
        for slot, group in by_slot.items():  # one SSUBSCRIBE per slot: more is CROSSSLOT
            name = self._owners.get(slot)
            if name is None:
                exc = SlotMoved(f"slot {slot} has no master in this session's slot map")
                self._fail(exc)
                raise exc
            for channel in group:
                self._where[channel] = name
            await self._pubsubs[name].ssubscribe(*group)

    async def unsubscribe(self, *channels: bytes) -> None:
        for channel in channels:
            name = self._where.pop(channel, None)
            if name is not None:
                self._leaving[channel] = self._leaving.get(channel, 0) + 1
                await self._pubsubs[name].sunsubscribe(channel)

    async def run(self, handle: Callable[[dict[str, Any]], None]) -> None:
        """Read every master's messages into ``handle`` (types ``message`` and ``subscribe``,
        as plain pub/sub names them) until one fails; raise its error."""
        loop = asyncio.get_running_loop()
        readers = [loop.create_task(self._reader(name, pubsub, handle)) for name, pubsub in self._pubsubs.items()]
        try:
            done, _ = await asyncio.wait([*readers, self._failed], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise SlotMoved("a shard reader ended")  # not reached: readers end by failing
        finally:
            for task in readers:
                task.cancel()
            await asyncio.wait(readers, timeout=1.0)

    async def _reader(self, name: str, pubsub: Any, handle: Callable[[dict[str, Any]], None]) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            kind = kind.decode() if isinstance(kind, bytes) else kind
            channel = message["channel"]
            if kind == "smessage":
                handle({"type": "message", "channel": channel, "data": message["data"]})
            elif kind == "ssubscribe":
                handle({"type": "subscribe", "channel": channel, "data": message["data"]})
            elif kind == "sunsubscribe":
                leaving = self._leaving.get(channel, 0)
                if leaving > 1:
                    self._leaving[channel] = leaving - 1
                elif leaving == 1:
                    del self._leaving[channel]
                elif self._where.get(channel) == name:
                    raise SlotMoved(f"{name} no longer serves shard channel {channel!r}: its slot moved")

    async def aclose(self) -> None:
        for pubsub in self._pubsubs.values():
            try:
                await pubsub.aclose()
            except _ERRORS:
                pass
        for client in self._clients.values():
            try:
                await client.aclose()
            except _ERRORS:
                pass
        if not self._failed.done():
            self._failed.cancel()
        elif not self._failed.cancelled():
            self._failed.exception()  # retrieved: no "never retrieved" warning


def cluster_settings(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[user[:password]@]host:port[,host:port...][/0]`` (``rediss+cluster://``
    for TLS; ``redis://`` and ``rediss://`` with one host are taken too): the seed nodes and the
    connection settings every node shares. Raises ``ValueError``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+cluster", "rediss+cluster", "redis", "rediss"):
        raise ValueError(f"not a Redis Cluster URL: {_redact(url)!r}")
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    if path not in ("", "0"):
        raise ValueError("a Redis Cluster has database 0 only")
    userinfo, at, hosts = netloc.rpartition("@")
    settings: dict[str, Any] = {"ssl": scheme.startswith("rediss")}
    if at:
        user, colon, password = userinfo.partition(":")
        settings["username"] = unquote(user) or None
        settings["password"] = unquote(password) if colon else None
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = port, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"bad node {item!r} in {_redact(url)!r}: use host:port")
        nodes.append((host, int(port)))
    return nodes, settings


class RedisBroker(Broker):
    """A :class:`tether.broker.Broker` over Redis: room streams (offsets and history) and
    pub/sub, presence kept in Redis.

    Settings: ``url`` (``redis://[:password@]host:port/db``, ``rediss://`` for TLS; a Redis
    Cluster: ``redis+cluster://[:password@]host:port[,host:port...]``, ``rediss+cluster://``,
    or ``cluster=True`` with any of these: the hosts are seeds, the rest is discovered);
    ``prefix`` of every key and channel; ``presence_ttl`` (seconds a dead process's members
    stay listed, at most) and ``heartbeat_interval`` (must be well below it); ``history``,
    the default bounds of a room's history (1,000 messages, 120 s; per room:
    :meth:`configure`, the same on every process); ``meta_ttl`` (seconds a room's epoch and
    offset outlive its last publication while no process is subscribed; a room that outlives
    it starts a new epoch); ``max_outbox`` publications waiting for Redis (oldest dropped
    beyond); ``max_repair`` messages one live repair reads at most (more missing is a
    ``too_many`` gap); ``connect_timeout`` and ``command_timeout`` in seconds; reconnect
    backoff between ``backoff_base`` and ``backoff_cap`` seconds (it starts again from
    ``backoff_base`` once a session stayed up ``heartbeat_interval``).
    """

    shared = True
    streams = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        cluster: bool | None = None,
        prefix: str = "tether",
        # Presence
        presence_ttl: float = 15.0,
        heartbeat_interval: float = 5.0,
        # Streams
        history: History | None = None,
        meta_ttl: float = 86_400.0,
        max_repair: int = 1000,
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
        if meta_ttl <= 0 or max_repair < 1:
            raise ValueError("need meta_ttl > 0 and max_repair >= 1")
        is_cluster_url = url.startswith(_CLUSTER_SCHEMES)
        if cluster is False and is_cluster_url:
            raise ValueError("a redis+cluster:// URL with cluster=False")
        self.url = url
        #: A Redis Cluster (Redis >= 7): sharded pub/sub, one connection per master.
        self.cluster = is_cluster_url if cluster is None else cluster
        self._seeds, self._settings = cluster_settings(url) if self.cluster else ([], {})
        self.prefix = prefix
        self.presence_ttl = presence_ttl
        self.heartbeat_interval = heartbeat_interval
        self.history_bounds = history if history is not None else History()
        self.meta_ttl = meta_ttl
        self.max_repair = max_repair
        self.max_outbox = max_outbox
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.state = LinkState.CONNECTING
        #: Publications dropped: outbox full, raw ones while Redis is away or in a failed
        #: pipeline, refused by Redis, or queued when the broker closed.
        self.dropped = 0
        #: Publications sent (confirmed by Redis) and received.
        self.published = 0
        self.received = 0
        #: Stream publications sent again after their pipeline failed.
        self.resent = 0
        #: Stream messages delivered from history to fill a live hole, and gaps reported.
        self.repaired = 0
        self.gaps = 0
        self._node = ""
        self._instance = secrets.token_hex(4)  # names this broker's seq key: seqs restart with it
        self._origin = self._instance.encode() + b"."
        # Seqs of our stream publications seen back on pub/sub since the last confirmed
        # pipeline: a failed pipeline's publications that are in it ran (and were delivered),
        # so they are not sent again (a Redis restarted empty would apply them twice).
        self._echoed: set[int] = set()
        self._seq = itertools.count(1)
        self._deliver: Deliver | None = None
        self._on_gap: OnGap | None = None
        self._client: Any = None
        self._pubsub: Any = None
        self._rooms: dict[bytes, str] = {}  # channel -> room, rooms we subscribe to
        self._tracks: dict[str, _Room] = {}  # room -> its live stream, rooms we subscribe to
        self._bounds: dict[str, History] = {}  # per-room history bounds (configure)
        self._local: dict[str, dict[str, bytes]] = {}  # this node's presence: room -> member -> meta
        self._synced: set[str] = set()  # rooms whose presence we wrote (keys we may have in Redis)
        self._dirty: set[str] = set()  # rooms whose presence write failed or waits for the link
        self._drop_gone: Any = None
        self._scripts: dict[str, Any] = {}
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        # (room, data, seq): seq > 0 for a stream publication, < 0 for one sent again (-seq:
        # its pipeline failed, it may have run), 0 for a raw one.
        self._outbox: deque[tuple[str, bytes, int]] = deque()
        self._args: dict[str, tuple[Any, ...]] = {}  # room -> what its publish script is called with
        self._wake = asyncio.Event()
        # Presence writes go one at a time: a rewrite of a snapshot taken before a join
        # would otherwise erase that join in Redis.
        self._presence_lock = asyncio.Lock()
        self._sync_limit = asyncio.Semaphore(8)  # repairs reading Redis at once
        self._syncs: set[asyncio.Task[None]] = set()
        self._meta_renewed = 0.0
        self._run_task: asyncio.Task[None] | None = None
        self._session_over = False
        self._first: asyncio.Future[None] | None = None
        self._backoff = Backoff(base=backoff_base, cap=backoff_cap, stable_after=heartbeat_interval)
        # Sessions (tether.sessions): release requests from other processes, and ours waiting.
        self._release_handlers: list[Release] = []
        self._releases: dict[bytes, asyncio.Future[None]] = {}
        self._release_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<RedisBroker {_redact(self.url)} {self.state.name}>"

    # -- keys --------------------------------------------------------------------------
    def _channel(self, room: str) -> bytes:
        """The room's channel; on a cluster a shard channel under the room's hash tag (the
        publish script's SPUBLISH must stay in its keys' slot)."""
        if self.cluster:
            return f"{self.prefix}:{{r:{room}}}:room".encode()
        return f"{self.prefix}:room:{room}".encode()

    def _key(self, room: str, name: str) -> str:
        """A key of ``room``: all of them share the hash tag ``{r:<room>}`` (one cluster slot)."""
        return f"{self.prefix}:{{r:{room}}}:{name}"

    def _hash(self, room: str, node: str | None = None) -> str:
        return self._key(room, f"presence:{node if node is not None else self._node}")

    def _nodes(self, room: str) -> str:
        return self._key(room, "nodes")

    def _stream_keys(self, room: str) -> list[str]:
        return [self._key(room, "meta"), self._key(room, "stream")]

    def _node_channel(self, node: str) -> bytes:
        if self.cluster:
            return f"{self.prefix}:{{n:{node}}}:node".encode()
        return f"{self.prefix}:node:{node}".encode()

    def _session_key(self, token: str) -> str:
        """A session's state; its version is ``<this>:v``, in the same slot (hash tag
        ``{s:<token>}``): the save script reads and writes both."""
        return f"{self.prefix}:{{s:{token}}}"

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, node: str, deliver: Deliver) -> None:
        """Connect; returns after the first attempt (connected or not: then it retries)."""
        self._node, self._deliver = node, deliver
        common: dict[str, Any] = {
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.command_timeout,
            "retry": Retry(NoBackoff(), 0),  # we reconnect ourselves; never block a caller retrying
            "client_name": f"{self.prefix}:{node}",
        }
        if self.cluster:
            # No retries in redis-py either: a stream publication sent again must say so (the
            # script applies it once). MOVED and ASK are still followed (the command did not run).
            self._client = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in self._seeds], **self._settings, **common)
        else:
            self._client = aioredis.Redis.from_url(self.url, **common)
        self._drop_gone = self._client.register_script(_DROP_GONE)
        publish = _PUBLISH.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'") if self.cluster else _PUBLISH
        scripts = (("publish", publish), ("position", _POSITION), ("history", _HISTORY), ("save_session", _SAVE_SESSION), ("put_member", _PUT_MEMBER), ("rewrite", _REWRITE))
        for name, body in scripts:
            self._scripts[name] = self._client.register_script(body)
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._run_task = loop.create_task(self._run())
        await asyncio.wait([self._first], timeout=self.connect_timeout + self.command_timeout)

    def on_gap(self, handler: OnGap) -> None:
        self._on_gap = handler

    async def close(self) -> None:
        if self.state is LinkState.CLOSED:
            return
        was_up = self.state is LinkState.UP
        self.state = LinkState.CLOSED
        for task in self._syncs:
            task.cancel()
        if self._run_task is not None:
            self._run_task.cancel()
            await asyncio.wait([self._run_task], timeout=self.command_timeout)
        if self._syncs:
            await asyncio.wait(self._syncs, timeout=self.command_timeout)
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
            await self._drop_idle()
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
            message = "lost Redis at %s (%s); serving local members only, room messages wait for it, reconnecting"
        elif failed == 0 or not expected:
            message = "cannot reach Redis at %s (%s); retrying"
        else:
            logger.debug("still cannot reach Redis at %s (%s)", _redact(self.url), why)
            return
        # An unexpected error is a bug somewhere: keep its traceback.
        logger.log(logging.WARNING if expected else logging.ERROR, message, _redact(self.url), why, exc_info=None if expected else error)

    async def _session(self) -> None:
        """One connection: subscribe, resync presence and streams, then read until the link
        fails."""
        pubsub: Any = None
        try:
            pubsub = await self._open_pubsub()
            await self._load_scripts()
            channels = [self._node_channel(self._node), *self._rooms]
            confirmed = self._expect(channels[1:])
            await pubsub.subscribe(*channels)
            await self._sync_presence()
            self._pubsub = pubsub
            recovered = self.state is LinkState.DOWN
            self.state = LinkState.UP
            self._backoff.connected(asyncio.get_running_loop().time())
            missing = set(self._rooms) - set(channels)
            if missing:
                confirmed += self._expect(missing)
                await pubsub.subscribe(*missing)
            if recovered:
                logger.warning("reconnected to Redis at %s; resubscribed to %d rooms", _redact(self.url), len(self._rooms))
            else:
                logger.info("connected to Redis at %s", _redact(self.url))
            self._release_first()
            await self._supervise(pubsub, confirmed)
        finally:
            self._pubsub = None
            try:
                if pubsub is not None:
                    await pubsub.aclose()
            except _ERRORS:
                pass

    async def _open_pubsub(self) -> Any:
        """Plain Redis: a ``PubSub`` on the client. A cluster: the slot map read afresh (the
        last session may have ended on a failover) and a :class:`ShardedPubSub` on its
        masters, every connection open."""
        if not self.cluster:
            return self._client.pubsub()
        await self._client.initialize()  # the first time (or after redis-py saw a node fail)
        await self._client.nodes_manager.initialize()  # the slot map, read again
        owners: dict[int, str] = {}
        masters: dict[str, tuple[str, int]] = {}
        for slot, nodes in self._client.nodes_manager.slots_cache.items():
            owners[slot] = nodes[0].name
            masters[nodes[0].name] = (nodes[0].host, nodes[0].port)
        clients = {
            name: aioredis.Redis(
                host=host,
                port=port,
                **self._settings,
                socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.command_timeout,
                retry=Retry(NoBackoff(), 0),
                client_name=f"{self.prefix}:{self._node}",
            )
            for name, (host, port) in masters.items()
        }
        pubsub = ShardedPubSub(owners, clients)
        try:
            await asyncio.wait_for(pubsub.connect(), self.connect_timeout + self.command_timeout)
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

    async def _load_scripts(self) -> None:
        """Load the stream scripts (a restarted Redis has none): pipelines call them by sha."""
        for script in self._scripts.values():
            script.sha = await self._client.script_load(script.script)

    def _expect(self, channels: Any) -> list[asyncio.Future[None]]:
        """Futures resolved when Redis confirms the subscription to each of ``channels``."""
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(channel, []).append(fut)
            futures.append(fut)
        return futures

    async def _supervise(self, pubsub: Any, confirmed: list[asyncio.Future[None]]) -> None:
        loop = asyncio.get_running_loop()
        self._session_over = False
        tasks = [loop.create_task(c) for c in (self._read(pubsub), self._heartbeat(), self._publisher(confirmed))]
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

    async def _drop_idle(self) -> None:
        """Close the pool's idle connections once a session failed: if Redis went away their
        sockets are dead (CLOSE_WAIT) and would stay open until a command picked them (found
        by the fault soak: a Redis restart left the server with sockets to the old one).
        A cluster client's pools per node reconnect on their own."""
        pool = getattr(self._client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect(inuse_connections=False)

    def _lost(self) -> None:
        """A session ended: raw publications waiting are dropped (they would reach the other
        processes late, out of place); stream ones wait for the next session, unless closed."""
        self._release_first()
        kept = [entry for entry in self._outbox if entry[2]] if not self._is_closed() else []
        self.dropped += len(self._outbox) - len(kept)
        self._outbox = deque(kept)
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()

    def _is_closed(self) -> bool:
        return self.state is LinkState.CLOSED  # a separate call: close() may run during an await

    def _release_first(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    async def _read(self, pubsub: Any) -> None:
        if isinstance(pubsub, ShardedPubSub):
            await pubsub.run(self._on_message)
            return
        while not self._session_over:
            message = await pubsub.get_message(timeout=None)
            if message is not None:
                self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == b"message" or kind == "message":
            self._on_publication(channel, message["data"])
        elif kind == b"subscribe" or kind == "subscribe":
            for fut in self._waiters.pop(channel, ()):
                if not fut.done():
                    fut.set_result(None)

    def _on_publication(self, channel: bytes, data: bytes) -> None:
        room = self._rooms.get(channel)
        if room is None and channel == self._node_channel(self._node):
            self._on_node_message(data)
            return
        if room is None or self._deliver is None:
            return
        self.received += 1
        try:
            if data[:1] == b"\xff":
                self._arrived(room, data)
            else:
                self._deliver(room, data)
        except Exception:
            logger.exception("delivering a broadcast in room %r failed", room)

    async def _heartbeat(self) -> None:
        while not self._session_over:
            await asyncio.sleep(self.heartbeat_interval)
            async with self._presence_lock:
                await self._renew()
            await self._renew_meta()

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

    async def _renew_meta(self) -> None:
        """Keep the epoch and offset of the rooms we subscribe to while they are quiet (a
        quarter of ``meta_ttl`` apart), so their members' positions stay valid."""
        now = time.monotonic()
        if now - self._meta_renewed < self.meta_ttl / 4 or not self._tracks:
            return
        self._meta_renewed = now
        ttl = int(self.meta_ttl * 1000)
        async with self._client.pipeline(transaction=False) as pipe:
            for room in list(self._tracks):
                pipe.pexpire(self._key(room, "meta"), ttl)
            await pipe.execute()

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
        sha = self._scripts["rewrite"].sha
        try:
            for attempt in range(2):
                # One script per room (atomic per room, as a reader needs; rooms live on
                # different cluster slots, so no transaction could hold them all).
                async with self._client.pipeline(transaction=False) as pipe:
                    for room, members in snapshot.items():
                        pairs = [item for member in members.items() for item in member]
                        pipe.execute_command("EVALSHA", sha, 2, self._hash(room), self._nodes(room), self._node, ttl, *pairs)
                    results = await pipe.execute(raise_on_error=False)
                errors = [result for result in results if isinstance(result, Exception)]
                if not errors:
                    break
                if attempt == 0 and all(isinstance(error, NoScriptError) for error in errors):
                    await self._load_scripts()  # a restarted Redis, a new master: load, again
                    continue
                raise errors[0]
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

    # -- publishing --------------------------------------------------------------------
    async def _publisher(self, confirmed: list[asyncio.Future[None]]) -> None:
        # Rooms are positioned before the outbox goes out: what we queued while Redis was away
        # gets offsets after the positions, so it reaches our own members too.
        await self._resync(confirmed)
        while not self._session_over:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox and not self._session_over:
                ran = self._echoed  # came back on pub/sub after their pipeline failed: not again
                batch = [entry for entry in self._outbox if entry[2] >= 0 or -entry[2] not in ran]
                self._outbox.clear()
                if not batch:
                    continue
                try:
                    results = await self._send(batch)
                except BaseException:
                    self._unconfirmed(batch)
                    raise
                self._echoed = set()
                await self._confirmed(batch, results)

    async def _send(self, batch: list[tuple[str, bytes, int]]) -> list[Any]:
        """One pipeline: a :data:`_PUBLISH` script per stream publication, a PUBLISH per raw one."""
        # A room without an epoch gets this one (one per batch is enough). Not a secret, only
        # unlikely to repeat: random.getrandbits, not secrets (a getrandom(2) per batch).
        epoch = b"%08x" % random.getrandbits(32)
        sha = self._scripts["publish"].sha
        async with self._client.pipeline(transaction=False) as pipe:
            for room, data, seq in batch:
                if seq:
                    args = self._args.get(room) or self._publish_args(room)
                    state = self._tracks.get(room)
                    known = (state.track.epoch or "", state.track.last or 0) if state is not None else ("", 0)
                    again = b"1" if seq < 0 else b"0"
                    # EVALSHA as a raw command: redis-py's cluster pipeline refuses pipe.evalsha
                    pipe.execute_command(
                        "EVALSHA", sha, 3, *args[:4], data, *args[4:], epoch, b"%d" % abs(seq), _SEQ_TTL_MS, again, *known, self._instance
                    )
                elif self.cluster:
                    pipe.spublish(self._channel(room), data)
                else:
                    pipe.publish(self._channel(room), data)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _publish_args(self, room: str) -> tuple[Any, ...]:
        """``(meta, stream, seq key, channel, max_count, max_age ms, meta ttl ms)`` of ``room``,
        encoded once (redis-py passes bytes through as they are)."""
        if len(self._args) >= 10_000:
            self._args.clear()  # many short-lived rooms: start over rather than grow
        bounds = self._bounds.get(room, self.history_bounds)
        args = (
            *(key.encode() for key in self._stream_keys(room)),
            self._key(room, f"seq:{self._instance}").encode(),
            self._channel(room),
            b"%d" % bounds.max_count,
            b"%d" % int(bounds.max_age * 1000),
            b"%d" % int(self.meta_ttl * 1000),
        )
        self._args[room] = args
        return args

    def _unconfirmed(self, batch: list[tuple[str, bytes, int]]) -> None:
        """A pipeline failed with ``batch`` in it, applied or not: raw publications are lost
        (counted), stream ones go back to the front of the outbox (the script applies each
        once)."""
        ran = self._echoed
        stream = [(room, data, seq) for room, data, seq in batch if seq]
        again = [(room, data, -abs(seq)) for room, data, seq in stream if abs(seq) not in ran]
        self.dropped += len(batch) - len(stream)
        self.resent += len(again)
        self._outbox.extendleft(reversed(again))
        self._bound_outbox()

    async def _confirmed(self, batch: list[tuple[str, bytes, int]], results: list[Any]) -> None:
        unknown: list[tuple[str, bytes, int]] = []  # the script was gone (SCRIPT FLUSH, a new master)
        refused: list[Exception] = []
        unsure: list[tuple[str, bytes, int]] = []  # a cluster node failed under them: maybe run
        failure: Exception | None = None
        for entry, result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):
                unknown.append(entry)
                unsure.append(entry)
            elif isinstance(result, _UNCONFIRMED):
                unsure.append(entry)
                failure = failure or result
            elif isinstance(result, Exception):
                refused.append(result)
            else:
                self.published += 1
        if refused:
            self.dropped += len(refused)
            logger.warning("Redis refused %d publications (%s); dropped", len(refused), refused[0])
        if failure is not None:
            # A cluster pipeline is one pipeline per master: the others' replies are in. What
            # the failed master had is handled as a failed pipeline (sent again, marked: the
            # script applies each once; raw ones dropped), and the session ends.
            self._unconfirmed(unsure)
            raise failure
        if unknown:
            await self._load_scripts()
            self._outbox.extendleft(reversed(unknown))
            self._bound_outbox()

    def _bound_outbox(self) -> None:
        while len(self._outbox) > self.max_outbox:
            self._outbox.popleft()
            self.dropped += 1

    # -- live streams --------------------------------------------------------------------
    def _arrived(self, room: str, data: bytes) -> None:
        """A stream publication from pub/sub: deliver it in order, or hold it and repair."""
        try:
            offset, epoch, origin, payload = parse(data)
        except ValueError:
            logger.warning("dropped a malformed stream message in room %r", room)
            return
        if origin.startswith(self._origin):  # ours: it ran (a resend of it must not run again)
            self._echoed.add(int(origin[len(self._origin):]))
        state = self._tracks.get(room)
        if state is None:
            return
        verdict = state.track.arrive(epoch, offset, payload, syncing=state.task is not None)
        if verdict == DELIVER:
            assert self._deliver is not None
            self._deliver(room, payload, offset)
        elif verdict == HELD:
            if len(state.track.held) > self.max_outbox:  # a repair that cannot keep up
                self._emit(room, state.track.give_up())
            self._want_sync(room, state)

    def _want_sync(self, room: str, state: _Room) -> None:
        if state.task is not None:
            state.again = True
            return
        state.task = task = asyncio.get_running_loop().create_task(self._sync(room, state))
        self._syncs.add(task)
        task.add_done_callback(self._syncs.discard)

    async def _sync(self, room: str, state: _Room) -> None:
        """Bring ``room``'s delivery up to date: position it, or read its history after what
        was delivered, deliver what was held, until no hole remains (bounded)."""
        track = state.track
        failures, delay = 0, self.backoff_base
        rounds = 0
        try:
            while rounds < _SYNC_ROUNDS:
                state.again = False
                try:
                    async with self._sync_limit:
                        if track.last is None:
                            epoch, head = await self._position(room)
                            if self._tracks.get(room) is not state:
                                return
                            self._positioned(room, state, epoch, head)
                        else:
                            after, current = track.last, track.epoch
                            epoch, _, items, gap = await self._read_stream(room, after, current, self.max_repair, repair=True)
                            if self._tracks.get(room) is not state:
                                return
                            out = track.read(epoch, items, gap)
                            self.repaired += sum(1 for item in out if not isinstance(item, Gap))
                            self._emit(room, out)
                except _ERRORS as exc:
                    if self.state is not LinkState.UP or self._tracks.get(room) is not state:
                        return  # the next session's resync takes over
                    failures += 1
                    logger.debug("reading room %r to repair it failed (%s)", room, exc)
                    if failures >= _SYNC_FAILURES:
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff_cap)
                    continue
                rounds += 1
                delivered, hole = track.drain()
                self._emit(room, delivered)
                if not (hole or state.again):
                    return
            if self._tracks.get(room) is state:
                self._emit(room, track.give_up())
        finally:
            state.task = None

    def _positioned(self, room: str, state: _Room, epoch: str, head: int) -> None:
        """Position a room's track. Members told its position was unknown (they joined while
        Redis was away) get an ``epoch`` gap up to where delivery starts, ahead of every
        message: room messages do not carry their epoch, and a client that never learned it
        would, resuming, be answered as one of an older epoch and get them all again."""
        state.track.position(epoch, head)
        if state.unknown:
            state.unknown = False
            assert state.track.last is not None
            self._emit(room, [Gap(0, state.track.last, EPOCH, epoch)])

    def _emit(self, room: str, out: Any) -> None:
        """Hand the hub what a repair produced: messages (deliver) and gaps (on_gap)."""
        for item in out:
            try:
                if isinstance(item, Gap):
                    self.gaps += 1
                    logger.info("room %r: messages %d..%d are lost (%s)", room, item.first, item.last, item.reason)
                    if self._on_gap is not None:
                        self._on_gap(room, item)
                elif self._deliver is not None:
                    self._deliver(room, item[1], item[0])
            except Exception:
                logger.exception("delivering a repaired message in room %r failed", room)

    async def _resync(self, confirmed: list[asyncio.Future[None]]) -> None:
        """After (re)subscribing: position the rooms that are not (subscribed while Redis was
        away), and repair every room whose head moved while we were away (or that holds
        messages). Raises the Redis error that fails the session."""
        if confirmed:
            await asyncio.wait(confirmed, timeout=self.command_timeout)
        rooms = list(self._tracks.items())
        for start in range(0, len(rooms), _RESYNC_CHUNK):
            chunk = rooms[start : start + _RESYNC_CHUNK]
            positions = await self._positions([room for room, _ in chunk])
            for (room, state), (epoch, head) in zip(chunk, positions, strict=True):
                track = state.track
                if self._tracks.get(room) is not state:
                    continue
                if track.last is None and state.task is None:
                    self._positioned(room, state, epoch, head)
                    delivered, hole = track.drain()
                    self._emit(room, delivered)
                    if hole:
                        self._want_sync(room, state)
                elif state.task is not None or track.held or (epoch, head) != (track.epoch, track.last):
                    self._want_sync(room, state)

    async def _position(self, room: str) -> tuple[str, int]:
        reply = await self._scripts["position"](keys=self._stream_keys(room), args=[secrets.token_hex(4), int(self.meta_ttl * 1000)])
        return reply[0].decode(), int(reply[1])

    async def _positions(self, rooms: list[str]) -> list[tuple[str, int]]:
        epoch, ttl, sha = secrets.token_hex(4), int(self.meta_ttl * 1000), self._scripts["position"].sha
        async with self._client.pipeline(transaction=False) as pipe:
            for room in rooms:
                pipe.execute_command("EVALSHA", sha, 2, *self._stream_keys(room), epoch, ttl)
            replies = await pipe.execute()
        return [(reply[0].decode(), int(reply[1])) for reply in replies]

    async def _read_stream(
        self, room: str, after: int, epoch: str | None, limit: int, *, repair: bool = False
    ) -> tuple[str, int, list[tuple[int, bytes]], Gap | None]:
        bounds = self._bounds.get(room, self.history_bounds)
        args = [after, epoch or "", limit, bounds.max_count, int(bounds.max_age * 1000), secrets.token_hex(4), int(self.meta_ttl * 1000), "1" if repair else "0"]
        return _history_reply(await self._scripts["history"](keys=self._stream_keys(room), args=args), after)

    # -- Broker --------------------------------------------------------------------------
    async def subscribe(self, room: str) -> None:
        return await self._subscribe(room)

    async def _subscribe(self, room: str) -> None:
        channel = self._channel(room)
        self._rooms[channel] = room
        state = self._tracks.get(room)
        if state is None:
            state = self._tracks[room] = _Room()
        pubsub = self._pubsub
        if self.state is not LinkState.UP or pubsub is None:
            return  # the next session subscribes to every room and positions it
        (fut,) = self._expect([channel])
        try:
            await pubsub.subscribe(channel)
            await asyncio.wait_for(asyncio.shield(fut), self.command_timeout)
        except _ERRORS as exc:
            logger.debug("subscribe to %r failed (%s); the reconnect will retry", room, exc)
            return
        if state.track.last is None:  # position it now: deliveries start from here
            self._want_sync(room, state)
            task = state.task
            if task is not None:
                await asyncio.wait([task], timeout=self.command_timeout)

    async def unsubscribe(self, room: str) -> None:
        return await self._unsubscribe(room)

    async def _unsubscribe(self, room: str) -> None:
        channel = self._channel(room)
        self._rooms.pop(channel, None)
        state = self._tracks.pop(room, None)
        if state is not None and state.task is not None:
            state.task.cancel()
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
        self._outbox.append((room, data, 0))
        self._bound_outbox()
        self._wake.set()

    async def publish_stream(self, room: str, data: bytes) -> None:
        """Queue ``data`` for ``room``'s stream: it gets its offset when it reaches Redis
        (while Redis is away it waits in the outbox), and reaches every subscribed process,
        this one too, from the room's channel."""
        if self._is_closed():
            self.dropped += 1
            return
        self._outbox.append((room, data, next(self._seq)))
        self._bound_outbox()
        self._wake.set()

    async def position(self, room: str) -> tuple[str | None, int]:
        """The room's epoch and head in Redis; while Redis is away, what this process
        delivered last (``(None, 0)`` if nothing)."""
        if self.state is LinkState.UP:
            try:
                return await self._position(room)
            except _ERRORS as exc:
                logger.debug("position of %r unreadable (%s); answering with what was delivered here", room, exc)
        state = self._tracks.get(room)
        if state is not None and state.track.last is not None:
            return state.track.epoch, state.track.last
        if state is not None:
            state.unknown = True  # it learns the epoch once the room is positioned
        return None, 0

    async def history(self, room: str, after: int, epoch: str | None, limit: int) -> tuple[list[tuple[int, bytes]], Gap | None]:
        """The stream after ``after`` (see :meth:`tether.proto.resume.RoomLog.read`). While
        Redis is away: what this process delivered since ``after`` is a ``lost`` gap; a room
        not positioned yet starts at ``after`` (the repair after the reconnect delivers what
        follows)."""
        if self.state is LinkState.UP:
            try:
                _, _, items, gap = await self._read_stream(room, after, epoch, limit)
                return items, gap
            except _ERRORS as exc:
                logger.debug("history of %r unreadable (%s)", room, exc)
        state = self._tracks.get(room)
        if state is None:  # not subscribed: nothing known, nothing will follow
            return [], Gap(after + 1, after, LOST, epoch)
        track = state.track
        if track.last is None:
            if epoch is not None:
                self._positioned(room, state, epoch, after)
            return [], None
        if track.epoch != epoch:
            return [], Gap(0, track.last, EPOCH, track.epoch)
        if after >= track.last:
            return [], None
        return [], Gap(after + 1, track.last, LOST, track.epoch)

    def configure(self, room: str, history: History) -> None:
        self._bounds[room] = history
        self._args.pop(room, None)

    # -- sessions (tether.sessions): state in a key, release requests on the node channels ----
    async def save_session(self, token: str, blob: bytes, ttl: float, version: int) -> bool:
        key = self._session_key(token)
        try:
            saved = await self._scripts["save_session"](keys=[key, key + ":v"], args=[blob, version, max(1, int(ttl * 1000))])
        except _ERRORS as exc:
            logger.warning("could not save a session in Redis (%s): it can resume in this process only", exc)
            return True  # Redis away: we are all there is
        return bool(saved)

    async def load_session(self, token: str) -> bytes | None:
        try:
            blob = await self._client.get(self._session_key(token))
        except _ERRORS as exc:
            logger.warning("could not read a session from Redis (%s)", exc)
            return None
        return bytes(blob) if blob is not None else None

    async def delete_session(self, token: str) -> None:
        try:
            key = self._session_key(token)
            await self._client.delete(key, key + ":v")
        except _ERRORS as exc:
            logger.debug("could not delete a session from Redis (%s); it expires by itself", exc)

    async def release_session(self, node: str, token: str, wait: float, stamp: int = 0) -> None:
        """Publish ``release <token> <our node> <request> <stamp>`` on ``node``'s channel and
        wait for ``released <request>`` on ours (at most ``wait`` seconds: a dead node never answers)."""
        request = secrets.token_hex(6).encode()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releases[request] = future
        try:
            message = b" ".join((b"release", token.encode(), self._node.encode(), request, b"%d" % stamp))
            await self._publish_now(self._node_channel(node), message)
            await asyncio.wait_for(future, wait)
        except (TimeoutError, *_ERRORS):
            logger.info("node %s did not release session in time; resuming from what it saved", node)
        finally:
            self._releases.pop(request, None)

    async def _publish_now(self, channel: bytes, message: bytes) -> None:
        if self.cluster:
            await self._client.spublish(channel, message)  # to the channel's shard only
        else:
            await self._client.publish(channel, message)

    def on_release(self, handler: Release) -> None:
        self._release_handlers.append(handler)

    def _on_node_message(self, data: bytes) -> None:
        parts = data.split(b" ")
        if parts[0] == b"release" and len(parts) in (4, 5):  # 4: from a process without stamps
            stamp = int(parts[4]) if len(parts) == 5 and parts[4].isdigit() and len(parts[4]) <= 18 else 0
            task = asyncio.get_running_loop().create_task(self._release(parts[1].decode(), parts[2].decode(), parts[3], stamp))
            self._release_tasks.add(task)
            task.add_done_callback(self._release_tasks.discard)
        elif parts[0] == b"released" and len(parts) == 2:
            future = self._releases.get(parts[1])
            if future is not None and not future.done():
                future.set_result(None)

    async def _release(self, token: str, requester: str, request: bytes, stamp: int) -> None:
        try:
            for handler in list(self._release_handlers):
                await handler(token, stamp)
        except Exception:
            logger.exception("releasing a session failed")
        try:
            await self._publish_now(self._node_channel(requester), b"released " + request)
        except _ERRORS as exc:
            logger.debug("could not answer a release request (%s)", exc)

    async def put_member(self, room: str, member: str, meta: bytes) -> None:
        return await self._put_member(room, member, meta)

    async def _put_member(self, room: str, member: str, meta: bytes) -> None:
        self._local.setdefault(room, {})[member] = meta
        if self.state is not LinkState.UP:
            # The next session rewrites it all; the heartbeat, if that session's snapshot was
            # taken before this join.
            self._dirty.add(room)
            return
        try:
            async with self._presence_lock:
                await self._scripts["put_member"](keys=[self._hash(room), self._nodes(room)], args=[member, meta, self._node, self._ttl_ms()])
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
                pipe.hgetall(self._hash(room, node.decode()))
            hashes = await pipe.execute()
        found: dict[str, bytes] = {}
        gone = []
        for node, members in zip(nodes, hashes, strict=True):  # one HGETALL reply per node
            if not members:
                gone.append(node)  # its hash expired: the process died
            for member, meta in members.items():
                found[member.decode()] = meta
        if gone:
            keys = [self._nodes(room), *(self._hash(room, node.decode()) for node in gone)]
            await self._drop_gone(keys=keys, args=gone)
        return found


# Keep a session's state only if it follows the copy kept (version - 1), or if none is kept
# (the first save, or Redis lost it, e.g. restarted empty: the saver's copy is the only one
# left): two processes cannot both take a session, and a late save of one that let it go
# changes nothing while the copy of the one that took it is kept.
_SAVE_SESSION = """
local kept = redis.call('GET', KEYS[2])
if kept and tonumber(kept) ~= tonumber(ARGV[2]) - 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""


def _redact(url: str) -> str:
    """``url`` without its password, for logs (any number of hosts)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{hosts}{slash}{tail}"
