"""Session logs shared through Redis (or Valkey) Streams, so several relay nodes serve them.

The writing node keeps its own sessions in a MemoryStore, so the primary path (the first
client) never waits on Redis; the replicator copies them to Redis behind it. Readers on any
node look sessions up in Redis: a session written elsewhere is mirrored into a local
SessionLog, so every front and every cursor reads one kind of log.

One truth per session (fencing): a node shows new events of a session Redis holds only while
it holds its lease (`lease.py`), shows `done` only once Redis has stored it, and when Redis
says another node ended the session, or its lease broke, it ends its own copy `failed`, stops
the generation, and from then on serves Redis's version. The key layout is in `schema.py`,
the scripts in `scripts.py`; the work is split by job: `replicator.py` (own sessions out),
`mirrors.py` (others' sessions in), `presence.py` (leases, reader counts, cancels),
`client.py` (errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from extproc.access.grants import MAX_SHARES_PER_SESSION, OPEN, Access, ShareRecord
from extproc.errors import (
    AccessDenied,
    LimitExceeded,
    SessionGone,
    SessionNotFound,
    StoreUnavailable,
)
from extproc.node.metrics import RelayMetrics
from extproc.session.log import EndState, SessionLog, WritePath
from extproc.store.memory import MemoryStore, StoreLimits
from extproc.store.redis.client import RedisCalls
from extproc.store.redis.lease import Lease
from extproc.store.redis.mirrors import POLL_S, Mirrors
from extproc.store.redis.presence import Presence
from extproc.store.redis.replicator import Copy, Replicator
from extproc.store.redis.schema import Keys, RedisSettings, share_record, share_value
from extproc.store.redis.scripts import ADD_SHARE
from extproc.vocabulary import FenceReason, StoreOp

log = logging.getLogger("stream_relay.store")

CATCH_UP_S = 2.0  # how long a lookup waits for a mirror to reach an id its client has seen
# An id no node has copied to Redis yet may belong to a session created an instant ago on
# another node (its client got the id with the response headers): look once more before 404.
# Refusals of existing sessions wait as long, so the answer's timing tells nothing.
NOT_FOUND_RECHECK_S = 0.05
LOST_REMEMBERED = 4096  # sessions this node was fenced from, served from Redis from then on


class RedisStore:
    """This node's sessions in memory, everyone's sessions in Redis."""

    def __init__(
        self,
        settings: RedisSettings,
        limits: StoreLimits | None = None,
        *,
        metrics: RelayMetrics,
    ) -> None:
        self.settings = settings
        self._local = MemoryStore(limits, metrics=metrics)
        self.limits = self._local.limits
        self.node_id = secrets.token_urlsafe(8)
        self._metrics = metrics
        self._calls = RedisCalls(settings, metrics)
        self._closing = asyncio.Event()
        self._lease = Lease(settings.node_lease)
        self._replicator = Replicator(self._calls, settings, self.limits, self.node_id, self._lease)
        self._replicator.release_end = self._release_end
        self._replicator.on_fenced = self._fenced_by_redis
        self._mirrors = Mirrors(self._calls, settings, self.limits, metrics, self._closing)
        self._presence = Presence(self._calls, settings, self.node_id, self._lease, self._closing)
        self._replicator.on_no_lease = self._presence.beat_now
        self._add_share = self._calls.redis.register_script(ADD_SHARE)
        self._tasks: list[asyncio.Task[None]] = []
        self._lost: OrderedDict[str, None] = OrderedDict()
        self._on_cancel: Callable[[str], bool] = lambda session_id: False
        metrics.replication_pending = lambda: self._replicator.pending

    # The writer side: this node's sessions, in memory first, copied to Redis behind.

    def create(self, *, content_type: str, write_path: WritePath, owner: str = "") -> SessionLog:
        session = self._local.create(content_type=content_type, write_path=write_path, owner=owner)
        self._replicator.created(session)
        return session

    def append(self, session: SessionLog, events: list[bytes]) -> bool:
        copy = self._replicator.copy_of(session.session_id)
        if copy is None:  # not this node's to write (or its end is already in Redis)
            return self._local.append(session, events)
        if copy.held_end is not None or (copy.sent and self.fenced(session)):
            return False  # ended (the end waits for Redis), or cut: never logged, never shown
        kept = self._local.append(session, events)
        self._replicator.dirty(copy)  # also when not kept: the session may just have failed
        return kept

    def end(self, session: SessionLog, state: EndState, reason: str = "") -> None:
        copy = self._replicator.copy_of(session.session_id)
        if session.state is not EndState.OPEN or (copy is not None and copy.held_end):
            return  # the first end wins
        if state is EndState.DONE and copy is not None and copy.sent:
            # Redis may know this session, so another node may end it `failed` if this one
            # stalls: clients here see `done` only once Redis holds it (the next round).
            copy.held_end = (state, reason)
            self._replicator.changed(session)
            return
        self._local.end(session, state, reason)
        self._replicator.changed(session)

    def fenced(self, session: SessionLog) -> bool:
        """Whether this node must stop writing `session` and cut its clients: Redis holds it
        and this node's lease is not known to hold (then it is ended `failed` here at once), or
        another node already ended it."""
        if session.state is not EndState.OPEN:
            return session.session_id in self._lost
        copy = self._replicator.copy_of(session.session_id)
        if copy is None or not copy.sent or self._lease.holds():
            return False
        self._presence.beat_now()
        log.warning("session %s: this node's lease lapsed; cutting it here", session.session_id)
        self._lose(
            copy,
            f"relay node {self.node_id} lost its lease (paused or cut off from Redis)",
            FenceReason.LEASE_LAPSED,
        )
        self._replicator.changed(session, urgent=True)  # Redis gets the end once the lease is back
        return True

    def _release_end(self, copy: Copy) -> None:
        state, reason = copy.held_end or (EndState.DONE, "")
        copy.held_end = None
        self._local.end(copy.log, state, reason)

    def _fenced_by_redis(self, copy: Copy, reason: str) -> None:
        log.warning(
            "session %s: another node ended it (%s); cutting it here", copy.log.session_id, reason
        )
        self._lose(copy, reason, FenceReason.ENDED_ELSEWHERE)

    def _lose(self, copy: Copy, reason: str, why: FenceReason) -> None:
        """This node no longer writes the session: its copy ends `failed` (readers here are cut,
        never told `done`), a generation here stops, and lookups here go to Redis."""
        session_id = copy.log.session_id
        self._lost[session_id] = None
        while len(self._lost) > LOST_REMEMBERED:
            self._lost.popitem(last=False)
        copy.held_end = None
        self._local.end(copy.log, EndState.FAILED, reason)
        self._metrics.writer_fenced(why)
        self._on_cancel(session_id)

    # The reader side.

    async def lookup(
        self, session_id: str, *, at_least: int = 0, access: Access = OPEN
    ) -> SessionLog:
        own = None if session_id in self._lost else self._local.peek(session_id)
        if (
            own is not None
            and self._replicator.holds_more_than_redis(session_id)
            and access.admits(own.owner, None)
        ):
            return own  # Redis does not hold all of it yet; this node does
        meta, gone, share = await self._fetch(session_id, access)
        if not meta and gone is None:
            await asyncio.sleep(NOT_FOUND_RECHECK_S)
            meta, gone, share = await self._fetch(session_id, access)
            if not meta and gone is None and await self._presence.recovering():
                raise StoreUnavailable(
                    "the session store (Redis) started empty moments ago and its writers are "
                    "copying their live sessions back: try again"
                )
        if not meta:
            if gone is not None and access.admits(gone.decode(), None):
                raise SessionGone(f"session {session_id} expired; its events are no longer kept")
            if gone is not None:
                await asyncio.sleep(NOT_FOUND_RECHECK_S)  # as long as an unknown id takes
                raise AccessDenied(f"no session {session_id}")
            raise SessionNotFound(f"no session {session_id}")
        if not access.admits(meta.get(b"owner", b"").decode(), share_record(share)):
            await asyncio.sleep(NOT_FOUND_RECHECK_S)  # as long as an unknown id takes
            raise AccessDenied(f"no session {session_id}")  # exactly as if unknown
        session = (
            own or self._mirrors.get(session_id) or await self._mirrors.mirror(session_id, meta)
        )
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
        keys = Keys(self.settings.prefix, session_id)
        with self._calls.call(StoreOp.LOOKUP):
            async with self._calls.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(keys.meta)
                pipe.get(keys.gone)
                pipe.hget(keys.shares, access.token_id or "-")
                meta, gone, share = await pipe.execute()
        return meta, gone, share

    async def add_share(self, session_id: str, token_id: str, record: ShareRecord) -> None:
        keys = Keys(self.settings.prefix, session_id)
        now = time.time()
        ttl_ms = int((record.expires_at - now + self.limits.session_ttl) * 1000)
        with self._calls.call(StoreOp.SHARE):
            added = await self._add_share(
                keys=[keys.shares],
                args=[token_id, share_value(record), MAX_SHARES_PER_SESSION, now, ttl_ms],
            )
        if not added:
            raise LimitExceeded(f"a session has at most {MAX_SHARES_PER_SESSION} share tokens")

    async def revoke_share(self, session_id: str, token_id: str) -> bool:
        with self._calls.call(StoreOp.SHARE):
            shares = Keys(self.settings.prefix, session_id).shares
            return bool(await self._calls.redis.hdel(shares, token_id))

    async def valid_shares(self, shares: set[tuple[str, str]]) -> set[tuple[str, str]]:
        pairs = sorted(shares)
        with self._calls.call(StoreOp.SHARE):
            async with self._calls.redis.pipeline(transaction=False) as pipe:
                for session_id, token_id in pairs:
                    pipe.hget(Keys(self.settings.prefix, session_id).shares, token_id)
                values = await pipe.execute()
        now = time.time()
        return {
            pair
            for pair, value in zip(pairs, values, strict=True)
            if (record := share_record(value)) is not None and record.expires_at > now
        }

    def readers_changed(self, session_id: str) -> None:
        self._presence.readers_changed()

    async def request_cancel(self, session_id: str) -> bool:
        return await self._presence.request_cancel(session_id)

    async def remote_readers(self, session_id: str) -> int:
        return await self._presence.remote_readers(session_id)

    # Background work: replication, the lease and reader heartbeat, cancel requests.

    async def start(
        self,
        *,
        on_cancel: Callable[[str], bool] = lambda session_id: False,
        reader_counts: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self._on_cancel = on_cancel
        try:
            sent_at, continuous = await self._presence.beat({})
            self._lease.renewed(sent_at, continuous=continuous)
        except StoreUnavailable:
            # The primary path works without Redis; the node starts and catches up later.
            log.warning("redis at %s unreachable at start", self.settings.display_url)
        self._tasks = [
            asyncio.create_task(self._replicator.run(self._closing)),
            asyncio.create_task(self._presence.heartbeat(reader_counts, self._replicator.recheck)),
            asyncio.create_task(self._presence.listen_for_cancels(on_cancel)),
        ]

    async def close(self) -> None:
        """Copy what is still pending (bounded wait), then stop."""
        await self._replicator.flush()
        self._closing.set()
        tasks = [*self._tasks, *self._mirrors.followers]
        for task in tasks:
            task.cancel()
        if tasks:  # each loop also checks the closing flag at least every POLL_S
            await asyncio.wait(tasks, timeout=2 * POLL_S)
        await self._presence.leave()
        await self._calls.close()
