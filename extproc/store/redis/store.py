"""Session logs shared through Redis (or Valkey) Streams, so several relay nodes serve them.

The writing node keeps its own sessions in a MemoryStore, so the primary path (the first
client) never waits on Redis; a replicator copies them to Redis in batches, one pipelined
script call per session per round. Readers on any node look sessions up in Redis: a session
written elsewhere is mirrored into a local SessionLog that a follower task keeps filling with
blocking reads, so every front and every cursor reads one kind of log.

Keys of one session share a hash tag, so one script can touch them all (Redis Cluster too):
  {prefix}:{<id>}:events   stream; entry `0-<seq>` holds event <seq> in field `d`; the end
                           marker `0-<last_seq+1>` (fields `end`, `reason`) comes with the end
  {prefix}:{<id>}:meta     hash: state, reason, last_seq, content_type, write_path, node, owner
  {prefix}:{<id>}:gone     the owner, written at the end and kept a day longer: 410, not 404
  {prefix}:{<id>}:shares   hash: share token id -> "<expiry> <sha256 of its secret>"
  {prefix}:{<id>}:readers  hash: node -> "<readers> <expiry ms>", who reads the session where
  {prefix}:node:<node>     a writing node's lease; when it lapses, its open sessions fail
  {prefix}:cancel          pub/sub channel of session ids whose generation should stop
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError

from extproc.access.grants import MAX_SHARES_PER_SESSION, OPEN, Access, ShareRecord
from extproc.errors import (
    ConfigError,
    LimitExceeded,
    SessionGone,
    SessionNotFound,
    StoreUnavailable,
)
from extproc.node.metrics import RelayMetrics
from extproc.session.log import EndState, SessionLog, WritePath
from extproc.store.memory import LogCache, MemoryStore, StoreLimits

log = logging.getLogger("stream_relay.store")

DEFAULT_LEASE_S = 5.0
DEFAULT_PREFIX = "stream-relay"
OPEN_TTL_S = 3600.0  # an open session nobody writes to any more is dropped after this long
GONE_TTL_S = 86400.0  # how long an ended session's id still answers 410 after its TTL
CATCH_UP_S = 2.0  # how long a lookup waits for a mirror to reach an id its client has seen
SYNC_MAX_EVENTS = 2048  # per session per round: one round stays a bounded Redis call
SYNC_MAX_BYTES = 1024 * 1024
FOLLOW_BATCH = 512
POLL_S = 1.0  # longest blocking wait on Redis: followers and listeners look up this often
# A round copies what accumulated for this long, so one script call carries several events of
# a session (bench/redis_ab.py at 1k events/s, Redis cost per event in relay + redis-server
# CPU: one round per append ~290 us, a 5 ms window ~160 us, 25 ms ~73 us). Readers on other
# nodes lag by this much; a new session's first round goes at once, so they know it at once.
BATCH_WINDOW_S = 0.02
# An id no node has copied to Redis yet may belong to a session created an instant ago on
# another node (its client got the id with the response headers): look once more before 404.
# Refusals of existing sessions wait as long, so the answer's timing tells nothing.
NOT_FOUND_RECHECK_S = 0.05
_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)

# Append events at their seqs and record the state, atomically, so a reader never sees an
# end before the last event. Idempotent: events already stored are skipped (a retried round);
# a gap (Redis lost data, e.g. restarted empty) returns what Redis has so the writer resends.
# Returns the last stored seq, or -1 if someone else ended the session (its lease lapsed).
_SYNC = """
local n = redis.call('XLEN', KEYS[1])
local current = redis.call('HGET', KEYS[2], 'state')
if current and current ~= 'open' then return -1 end
local first = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
if first > n + 1 then return n end
for i = 1, count do
  local seq = first + i - 1
  if seq > n then redis.call('XADD', KEYS[1], '0-' .. seq, 'd', ARGV[2 + i]) end
end
local last = n
if count > 0 and first + count - 1 > n then last = first + count - 1 end
local b = 2 + count
local state = ARGV[b + 1]
redis.call('HSET', KEYS[2], 'state', state, 'reason', ARGV[b + 2], 'last_seq', last,
  'content_type', ARGV[b + 5], 'write_path', ARGV[b + 6], 'node', ARGV[b + 7],
  'owner', ARGV[b + 8])
if state ~= 'open' then
  redis.call('XADD', KEYS[1], '0-' .. (last + 1), 'end', state, 'reason', ARGV[b + 2])
  redis.call('SET', KEYS[3], ARGV[b + 8], 'PX', ARGV[b + 4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[b + 3])
redis.call('PEXPIRE', KEYS[2], ARGV[b + 3])
return last
"""

# The writing node's lease lapsed while its session was open: end the session failed, once.
_FAIL_IF_ORPHANED = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'open' then return 0 end
local n = redis.call('XLEN', KEYS[1])
redis.call('XADD', KEYS[1], '0-' .. (n + 1), 'end', 'failed', 'reason', ARGV[1])
redis.call('HSET', KEYS[2], 'state', 'failed', 'reason', ARGV[1], 'last_seq', n)
redis.call('SET', KEYS[3], redis.call('HGET', KEYS[2], 'owner') or '', 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    url: str  # redis://host:port/db, rediss:// for TLS, unix:///path
    lease_s: float = DEFAULT_LEASE_S  # a node that stops renewing for this long is dead
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"--store must be 'memory' or a redis://host:port/db URL, got {self.url!r}"
            )
        if not 0.3 <= self.lease_s <= 600:
            raise ConfigError(f"node lease must be 0.3..600 seconds, got {self.lease_s}")

    @property
    def display_url(self) -> str:
        """The URL without a password, for logs."""
        head, _, tail = self.url.rpartition("@")
        return f"{self.url.split('://')[0]}://***@{tail}" if head else self.url


class _Keys:
    def __init__(self, prefix: str, session_id: str) -> None:
        base = f"{prefix}:{{{session_id}}}"
        self.events = f"{base}:events"
        self.meta = f"{base}:meta"
        self.gone = f"{base}:gone"
        self.readers = f"{base}:readers"
        self.shares = f"{base}:shares"


_Entry = tuple[bytes, dict[bytes, bytes]]


def _entries(reply: object) -> list[_Entry]:
    """Stream entries as this client returns them (bytes, RESP2); redis-py types them loosely."""
    return cast(list[_Entry], reply or [])


def _share_record(value: bytes | None) -> ShareRecord | None:
    if value is None:
        return None
    expires_at, _, digest = value.decode().partition(" ")
    return ShareRecord(digest, float(expires_at))


def _seq(entry_id: bytes) -> int:
    return int(entry_id.rpartition(b"-")[2])


class RedisStore:
    """This node's sessions in memory, everyone's sessions in Redis."""

    def __init__(
        self,
        settings: RedisSettings,
        limits: StoreLimits | None = None,
        *,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self.settings = settings
        self._local = MemoryStore(limits, metrics=metrics)
        self.limits = self._local.limits
        self.metrics = self._local.metrics
        self.node_id = secrets.token_urlsafe(8)
        self.on_cancel: Callable[[str], bool] = lambda _: False
        self.reader_counts: Callable[[], dict[str, int]] = dict
        common: dict[str, object] = {"socket_connect_timeout": 1.0, "health_check_interval": 10}
        # Lookups fail fast (a client gets 503 at once); the replicator retries on its own.
        self._redis = aioredis.from_url(
            settings.url, socket_timeout=2.0, retry=Retry(NoBackoff(), 1), **common
        )
        # Blocking reads and pub/sub wait longer than any command timeout.
        self._blocking = aioredis.from_url(
            settings.url, socket_timeout=None, retry=Retry(ExponentialBackoff(), 1), **common
        )
        self._sync_script = self._redis.register_script(_SYNC)
        self._fail_script = self._redis.register_script(_FAIL_IF_ORPHANED)
        self._lease_key = f"{settings.prefix}:node:{self.node_id}"
        self._mirrors = LogCache(self.limits.max_bytes, lambda mirror: mirror.drop("evicted"))
        self._followers: dict[str, asyncio.Task[None]] = {}
        # Own sessions whose end Redis does not have yet -> the last seq stored there.
        self._flushed: dict[str, int] = {}
        self._dirty: dict[str, SessionLog] = {}
        self._wake = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        self._closing = False
        self._urgent = False  # a new session waits in the next round: skip the batch window
        self.metrics.replication_pending.set_function(lambda: len(self._flushed))

    # The writer side: this node's sessions, in memory first, copied to Redis behind.

    def create(self, *, content_type: str, write_path: WritePath, owner: str = "") -> SessionLog:
        session = self._local.create(content_type=content_type, write_path=write_path, owner=owner)
        self._flushed[session.session_id] = 0
        self._urgent = True
        self._mark(session)
        return session

    def append(self, session: SessionLog, events: list[bytes]) -> bool:
        kept = self._local.append(session, events)
        self._mark(session)  # also when not kept: the session may just have failed
        return kept

    def end(self, session: SessionLog, state: EndState, reason: str = "") -> None:
        self._local.end(session, state, reason)
        self._mark(session)

    def _mark(self, session: SessionLog) -> None:
        if session.session_id in self._flushed:
            self._dirty[session.session_id] = session
            self._wake.set()

    # The reader side.

    async def lookup(
        self, session_id: str, *, at_least: int = 0, access: Access = OPEN
    ) -> SessionLog:
        own = self._local.peek(session_id)
        if own is not None and session_id in self._flushed and access.admits(own.owner, None):
            return own  # Redis does not hold all of it yet; this node does
        meta, gone, share = await self._fetch(session_id, access)
        if not meta and gone is None:
            await asyncio.sleep(NOT_FOUND_RECHECK_S)
            meta, gone, share = await self._fetch(session_id, access)
        if not meta:
            if gone is not None and access.admits(gone.decode(), None):
                raise SessionGone(f"session {session_id} expired; its events are no longer kept")
            if gone is not None:
                await asyncio.sleep(NOT_FOUND_RECHECK_S)  # as long as an unknown id takes
            raise SessionNotFound(f"no session {session_id}")
        if not access.admits(meta.get(b"owner", b"").decode(), _share_record(share)):
            await asyncio.sleep(NOT_FOUND_RECHECK_S)  # as long as an unknown id takes
            raise SessionNotFound(f"no session {session_id}")  # exactly as if unknown
        session = own or self._mirrors.get(session_id) or await self._mirror(session_id, meta)
        if at_least > session.last_seq and session.state is EndState.OPEN:
            # The writer has sent this id to its client; the copy here may lag a little.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CATCH_UP_S):
                    while at_least > session.last_seq and session.state is EndState.OPEN:
                        await session.wait_beyond(session.last_seq)
        return session

    async def _fetch(
        self, session_id: str, access: Access
    ) -> tuple[dict[bytes, bytes], bytes | None, bytes | None]:
        """Metadata, tombstone and the presented share token's record, in one round trip
        whether the session exists, is gone or is someone else's."""
        keys = _Keys(self.settings.prefix, session_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.meta)
                pipe.get(keys.gone)
                pipe.hget(keys.shares, access.token_id or "-")
                meta, gone, share = await pipe.execute()
        except RedisError as exc:
            self._failed("lookup", exc)
            raise StoreUnavailable("the session store (Redis) cannot be reached") from exc
        return meta, gone, share

    async def _mirror(self, session_id: str, meta: dict[bytes, bytes]) -> SessionLog:
        """A local copy of a session written elsewhere; followed while it is open."""
        keys = _Keys(self.settings.prefix, session_id)
        try:
            entries = await self._redis.xrange(keys.events)
        except RedisError as exc:
            self._failed("lookup", exc)
            raise StoreUnavailable("the session store (Redis) cannot be reached") from exc
        mirror = SessionLog(
            session_id,
            content_type=meta.get(b"content_type", b"").decode(),
            write_path=WritePath(meta.get(b"write_path", b"inline").decode()),
            owner=meta.get(b"owner", b"").decode(),
        )
        for entry_id, fields in _entries(entries):
            if _seq(entry_id) != mirror.last_seq + 1:
                raise SessionGone(f"session {session_id} was evicted from the store")
            if b"end" in fields:
                mirror.end(EndState(fields[b"end"].decode()), fields[b"reason"].decode())
                break
            mirror.append(fields[b"d"])
        if mirror.state is EndState.OPEN and meta.get(b"state", b"open") != b"open":
            raise SessionGone(f"session {session_id} was evicted from the store")
        existing = self._mirrors.get(session_id)  # another lookup may have won the race
        if existing is not None:
            return existing
        self._mirrors[session_id] = mirror
        if mirror.state is EndState.OPEN:
            node = meta.get(b"node", b"").decode()
            task = asyncio.create_task(self._follow(mirror, node))
            self._followers[session_id] = task
            task.add_done_callback(lambda _: self._followers.pop(session_id, None))
        return mirror

    async def _follow(self, mirror: SessionLog, node: str) -> None:
        """Tail a session written by `node` until it ends; fail it if that node dies."""
        keys = _Keys(self.settings.prefix, mirror.session_id)
        block_ms = int(min(POLL_S, self.settings.lease_s / 2) * 1000)
        while mirror.state is EndState.OPEN and not mirror.gone_reason and not self._closing:
            try:
                reply = await self._blocking.xread(
                    {keys.events: f"0-{mirror.last_seq}"}, count=FOLLOW_BATCH, block=block_ms
                )
                if not reply:
                    await self._fail_if_orphaned(keys, node)
                    continue
            except RedisError as exc:
                self._failed("follow", exc)
                await asyncio.sleep(self._backoff())
                continue
            self._succeeded()
            for entry_id, fields in _entries(cast(list[Any], reply)[0][1]):
                if _seq(entry_id) != mirror.last_seq + 1:
                    mirror.drop("evicted")  # Redis lost part of it: say so, never skip
                    return
                if b"end" in fields:
                    mirror.end(EndState(fields[b"end"].decode()), fields[b"reason"].decode())
                    break
                mirror.append(fields[b"d"])
            if self._mirrors.get(mirror.session_id) is mirror:
                self._mirrors[mirror.session_id] = mirror  # re-set: the cache re-counts bytes

    async def _fail_if_orphaned(self, keys: _Keys, node: str) -> None:
        ended = await self._fail_script(
            keys=[keys.events, keys.meta, keys.gone, f"{self.settings.prefix}:node:{node}"],
            args=[
                f"relay node {node} stopped (no lease for {self.settings.lease_s:g}s)",
                int(self.limits.ended_ttl_s * 1000),
                int((self.limits.ended_ttl_s + GONE_TTL_S) * 1000),
            ],
        )
        if ended:
            self.metrics.producers_lost.inc()
            log.warning("session %s failed: its node %s lost its lease", keys.meta, node)

    def open_sessions(self, owner: str) -> int:
        return self._local.open_sessions(owner)

    async def add_share(self, session_id: str, token_id: str, record: ShareRecord) -> None:
        keys = _Keys(self.settings.prefix, session_id)
        ttl_ms = int((record.expires_at - time.time() + self.limits.ended_ttl_s) * 1000)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hlen(keys.shares)
                pipe.hset(keys.shares, token_id, f"{record.expires_at} {record.digest}")
                pipe.pexpire(keys.shares, ttl_ms, gt=True)
                pipe.pexpire(keys.shares, ttl_ms, nx=True)
                count = (await pipe.execute())[0]
        except RedisError as exc:
            self._failed("lookup", exc)
            raise StoreUnavailable("the session store (Redis) cannot be reached") from exc
        if count >= MAX_SHARES_PER_SESSION:
            await self.revoke_share(session_id, token_id)
            raise LimitExceeded(f"a session has at most {MAX_SHARES_PER_SESSION} share tokens")

    async def revoke_share(self, session_id: str, token_id: str) -> bool:
        try:
            return bool(
                await self._redis.hdel(_Keys(self.settings.prefix, session_id).shares, token_id)
            )
        except RedisError as exc:
            self._failed("lookup", exc)
            raise StoreUnavailable("the session store (Redis) cannot be reached") from exc

    def readers_changed(self, session_id: str) -> None:
        self._beat_now.set()  # tell the other nodes at once, not at the next beat

    async def request_cancel(self, session_id: str) -> bool:
        try:
            receivers = await self._redis.publish(f"{self.settings.prefix}:cancel", session_id)
        except RedisError as exc:
            self._failed("cancel", exc)
            raise StoreUnavailable("the session store (Redis) cannot be reached") from exc
        return bool(receivers)

    async def remote_readers(self, session_id: str) -> int:
        keys = _Keys(self.settings.prefix, session_id)
        try:
            announced = cast(dict[bytes, bytes], await self._redis.hgetall(keys.readers))
        except RedisError as exc:
            self._failed("heartbeat", exc)
            raise StoreUnavailable("the session store (Redis) cannot be reached") from exc
        now = _now_ms()
        total = 0
        for node, value in announced.items():
            count, _, expiry = value.partition(b" ")
            if node != self.node_id.encode() and int(expiry) > now:
                total += int(count)
        return total

    # Background work: replication, the lease and reader heartbeat, cancel requests.

    async def start(self) -> None:
        try:
            await self._redis.ping()
            self._succeeded()
        except RedisError as exc:
            # The primary path works without Redis; the node starts and catches up later.
            self._failed("sync", exc)
            log.warning("redis at %s unreachable at start: %r", self.settings.display_url, exc)
        self._tasks = [
            asyncio.create_task(self._replicate()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._listen_for_cancels()),
        ]

    async def close(self) -> None:
        """Copy what is still pending (bounded wait), then stop."""
        with contextlib.suppress(TimeoutError, RedisError):
            async with asyncio.timeout(2.0):
                while self._dirty:
                    await self._sync_round()
        self._closing = True
        tasks = [*self._tasks, *self._followers.values()]
        for task in tasks:
            task.cancel()
        if tasks:  # each loop also checks the flag at least every POLL_S
            await asyncio.wait(tasks, timeout=2 * POLL_S)
        with contextlib.suppress(RedisError):
            await self._redis.delete(self._lease_key)  # a clean stop: no one waits a lease out
        await self._redis.aclose()
        await self._blocking.aclose()

    async def _replicate(self) -> None:
        while not self._closing:
            await self._wake.wait()
            if not self._urgent:
                await asyncio.sleep(BATCH_WINDOW_S)  # gather what arrives meanwhile
            self._wake.clear()
            self._urgent = False
            try:
                await self._sync_round()
                self._succeeded()
            except RedisError as exc:
                self._failed("sync", exc)
                await asyncio.sleep(self._backoff())
                self._wake.set()

    async def _sync_round(self) -> None:
        batch, self._dirty = self._dirty, {}
        sent: list[tuple[SessionLog, int, EndState]] = []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for session in batch.values():
                    plan = self._plan(session)
                    if plan is None:
                        continue
                    first, events, state, reason = plan
                    await self._sync_script(
                        keys=[*self._session_keys(session.session_id)],
                        args=[
                            first,
                            len(events),
                            *events,
                            state.value,
                            reason,
                            int(self._ttl_s(state) * 1000),
                            int((self.limits.ended_ttl_s + GONE_TTL_S) * 1000),
                            session.content_type,
                            session.write_path.value,
                            self.node_id,
                            session.owner,
                        ],
                        client=pipe,
                    )
                    sent.append((session, first + len(events) - 1, state))
                results = await pipe.execute() if sent else []
        except RedisError:
            for session_id, session in batch.items():  # try these again next round
                self._dirty.setdefault(session_id, session)
            raise
        for (session, upto, state), stored in zip(sent, results, strict=True):
            session_id = session.session_id
            if stored == -1 or (state is not EndState.OPEN and stored >= upto):
                self._flushed.pop(session_id, None)  # all in Redis, or ended by another node
                continue
            self._flushed[session_id] = min(int(stored), upto)
            if stored < session.last_seq or session.state is not EndState.OPEN:
                self._dirty[session_id] = session  # more to copy (or a gap to fill)
                self._wake.set()

    def _plan(self, session: SessionLog) -> tuple[int, list[bytes], EndState, str] | None:
        """What to send for one session: (first seq, events, state to record, reason)."""
        done = self._flushed.get(session.session_id)
        if done is None:
            return None
        if session.gone_reason:  # dropped here before Redis had all of it: lost, said so
            reason = f"{session.gone_reason} on its node before it reached the shared store"
            return done + 1, [], EndState.FAILED, reason
        events: list[bytes] = []
        size = 0
        for raw in session.events_after(done, SYNC_MAX_EVENTS):
            if events and size + len(raw) > SYNC_MAX_BYTES:
                break
            events.append(raw)
            size += len(raw)
        complete = done + len(events) == session.last_seq
        if complete and session.state is not EndState.OPEN:
            return done + 1, events, session.state, session.reason
        return done + 1, events, EndState.OPEN, ""

    def _session_keys(self, session_id: str) -> tuple[str, str, str]:
        keys = _Keys(self.settings.prefix, session_id)
        return keys.events, keys.meta, keys.gone

    def _ttl_s(self, state: EndState) -> float:
        return OPEN_TTL_S if state is EndState.OPEN else self.limits.ended_ttl_s

    async def _heartbeat(self) -> None:
        """Renew this node's lease and announce how many readers each session has here,
        every lease/3 and whenever a count changes."""
        lease_ms = int(self.settings.lease_s * 1000)
        announced: set[str] = set()
        while not self._closing:
            try:
                counts = self.reader_counts()
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(self._lease_key, b"1", px=lease_ms)
                    value = f" {_now_ms() + lease_ms}"
                    for session_id, count in counts.items():
                        readers = _Keys(self.settings.prefix, session_id).readers
                        pipe.hset(readers, self.node_id, f"{count}{value}")
                        pipe.pexpire(readers, 2 * lease_ms)
                    for session_id in announced - counts.keys():  # their last reader left
                        pipe.hdel(_Keys(self.settings.prefix, session_id).readers, self.node_id)
                    await pipe.execute()
                announced = set(counts)
                self._succeeded()
            except RedisError as exc:
                self._failed("heartbeat", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.lease_s / 3):
                    await self._beat_now.wait()
            self._beat_now.clear()

    async def _listen_for_cancels(self) -> None:
        channel = f"{self.settings.prefix}:cancel"
        while not self._closing:
            try:
                async with self._blocking.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    # Short waits, not listen(): redis-py can swallow a cancel mid-reconnect,
                    # so the loop also ends on the closing flag.
                    while not self._closing:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=POLL_S
                        )
                        if message is not None and message.get("type") == "message":
                            self.on_cancel(bytes(message["data"]).decode())
            except RedisError as exc:
                self._failed("cancel", exc)
                await asyncio.sleep(self._backoff())

    def _failed(self, op: str, exc: Exception) -> None:
        if self._failures == 0:
            log.warning("redis %s failed: %r", op, exc)
        self._failures += 1
        self.metrics.store_errors.labels(op).inc()
        self.metrics.store_up.set(0)

    def _succeeded(self) -> None:
        if self._failures:
            log.info("redis reachable again after %d failed calls", self._failures)
        self._failures = 0
        self.metrics.store_up.set(1)

    def _backoff(self) -> float:
        return _BACKOFF_S[min(self._failures, len(_BACKOFF_S) - 1)]


def _now_ms() -> int:
    return int(time.time() * 1000)
