"""Sessions written by other nodes, mirrored into local logs so every front reads one kind of log.

A lookup copies what Redis holds into a SessionLog; while the session is open a follower task
tails it with blocking XREAD. A follower that hears nothing for a while checks the writer's
lease: a lapsed lease ends the session `failed` in Redis, once, for everyone. A hole in a
stream (Redis evicted part of it), an entry no relay writes, or a follower's unexpected error
is said out loud: the mirror is dropped (410), never served with a gap or left open with
no follower. Mirrors are bounded by bytes like the node's own logs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from extproc.errors import SessionGone, StoreUnavailable
from extproc.node.metrics import RelayMetrics
from extproc.session.log import EndState, SessionLog, WritePath
from extproc.store.memory import LogCache, StoreLimits
from extproc.store.redis.client import RedisCalls
from extproc.store.redis.schema import GONE_TTL_S, Entry, Keys, RedisSettings, entries, seq_of
from extproc.store.redis.scripts import FAIL_IF_ORPHANED
from extproc.vocabulary import DropReason, StoreOp

log = logging.getLogger("stream_relay.store")

FOLLOW_BATCH = 512
POLL_S = 1.0  # longest blocking wait on Redis: followers look up the lease this often


class Mirrors:
    def __init__(
        self,
        calls: RedisCalls,
        settings: RedisSettings,
        limits: StoreLimits,
        metrics: RelayMetrics,
        closing: asyncio.Event,
    ) -> None:
        self._calls = calls
        self._settings = settings
        self._limits = limits
        self._metrics = metrics
        self._closing = closing
        self._fail_script = calls.redis.register_script(FAIL_IF_ORPHANED)
        self._logs = LogCache(limits.store_max_bytes, lambda m: m.drop(DropReason.EVICTED))
        # Every follower still running; a session may have two for a moment (an evicted
        # mirror's, not yet back from its read, and a newer mirror's).
        self._followers: set[asyncio.Task[None]] = set()

    @property
    def followers(self) -> list[asyncio.Task[None]]:
        return list(self._followers)

    def get(self, session_id: str) -> SessionLog | None:
        return self._logs.get(session_id)

    async def mirror(self, session_id: str, meta: dict[bytes, bytes]) -> SessionLog:
        """A local copy of a session written elsewhere; followed while it is open."""
        keys = Keys(self._settings.prefix, session_id)
        with self._calls.call(StoreOp.LOOKUP):
            stored = await self._calls.redis.xrange(keys.events)
        mirror = SessionLog(
            session_id,
            content_type=meta.get(b"content_type", b"").decode(),
            write_path=WritePath(meta.get(b"write_path", b"inline").decode()),
            owner=meta.get(b"owner", b"").decode(),
        )
        mirror.request_key = meta.get(b"request", b"").decode()
        if not _copy(entries(stored), mirror):
            raise SessionGone(f"session {session_id} was evicted from the store")
        if mirror.state is EndState.OPEN and meta.get(b"state", b"open") != b"open":
            raise SessionGone(f"session {session_id} was evicted from the store")
        existing = self._logs.get(session_id)  # another lookup may have won the race
        if existing is not None:
            return existing
        self._logs[session_id] = mirror
        if mirror.state is EndState.OPEN:
            node = meta.get(b"node", b"").decode()
            task = asyncio.create_task(self._follow(mirror, node))
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)
        return mirror

    async def _follow(self, mirror: SessionLog, node: str) -> None:
        try:
            await self._tail(mirror, node)
        except Exception:  # a bug must not leave an open mirror that nothing follows
            log.exception("following session %s failed: its mirror is dropped", mirror.session_id)
            self._drop(mirror)

    def _drop(self, mirror: SessionLog) -> None:
        """Readers of the mirror get 410; out of the cache too, so a later lookup reads Redis
        again (and finds the fault) instead of this empty copy."""
        if self._logs.get(mirror.session_id) is mirror:
            self._logs.pop(mirror.session_id)
        mirror.drop(DropReason.EVICTED)

    async def _tail(self, mirror: SessionLog, node: str) -> None:
        """Tail a session written by `node` until it ends; fail it if that node dies."""
        keys = Keys(self._settings.prefix, mirror.session_id)
        block_ms = int(min(POLL_S, self._settings.node_lease / 2) * 1000)
        while mirror.state is EndState.OPEN and not mirror.gone_reason:
            if self._closing.is_set():
                return
            try:
                with self._calls.call(StoreOp.FOLLOW):
                    reply = await self._calls.blocking.xread(
                        {keys.events: f"0-{mirror.last_seq}"}, count=FOLLOW_BATCH, block=block_ms
                    )
                    if not reply:
                        await self._fail_if_orphaned(keys, node)
                        continue
            except StoreUnavailable:
                await asyncio.sleep(self._calls.backoff())
                continue
            if mirror.gone_reason:  # evicted while the read waited: no longer followed
                return
            if not _copy(entries(cast(list[Any], reply)[0][1]), mirror):
                self._drop(mirror)  # Redis lost part of it: say so, never skip
                return
            if self._logs.get(mirror.session_id) is mirror:
                self._logs[mirror.session_id] = mirror  # re-set: the cache re-counts bytes

    async def _fail_if_orphaned(self, keys: Keys, node: str) -> None:
        ended = await self._fail_script(
            keys=[keys.events, keys.meta, keys.gone, self._settings.lease_key(node)],
            args=[
                f"relay node {node} stopped (no lease for {self._settings.node_lease:g}s)",
                int(self._limits.session_ttl * 1000),
                int((self._limits.session_ttl + GONE_TTL_S) * 1000),
            ],
        )
        if ended:
            self._metrics.producer_lost()
            log.warning("session %s failed: its node %s lost its lease", keys.meta, node)


def _copy(stored: list[Entry], mirror: SessionLog) -> bool:
    """Append stored entries (events, then maybe the end marker) to a mirror; False on a gap
    or an entry no relay writes (an unknown end state, a missing field): unreadable is lost."""
    for entry_id, fields in stored:
        if seq_of(entry_id) != mirror.last_seq + 1:
            return False
        try:
            if b"end" in fields:
                mirror.end(EndState(fields[b"end"].decode()), fields[b"reason"].decode())
                break
            mirror.append(fields[b"d"])
        except (KeyError, ValueError):  # UnicodeDecodeError is a ValueError
            log.warning("session %s: unreadable entry %r in Redis", mirror.session_id, entry_id)
            return False
    return True
