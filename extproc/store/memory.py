"""The embedded session store: logs in this process, bounded by total bytes and a TTL.

Eviction is least-recently-used by bytes (cachetools computes each log's size); a finished
session also expires `ended_ttl_s` after its end. A dropped session leaves a small
tombstone so that its readers get 410 Gone, not 404: lost history is said out loud.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from extproc.access.grants import MAX_SHARES_PER_SESSION, OPEN, Access, ShareRecord
from extproc.errors import ConfigError, LimitExceeded, SessionGone, SessionNotFound
from extproc.node.metrics import RelayMetrics
from extproc.session.ids import new_session_id
from extproc.session.log import EVENT_OVERHEAD_BYTES, EndState, SessionLog, WritePath

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_LOG_BYTES = 16 * 1024 * 1024
DEFAULT_ENDED_TTL_S = 900.0
DEFAULT_TOMBSTONES = 65_536


@dataclass(frozen=True, kw_only=True)
class StoreLimits:
    max_bytes: int = DEFAULT_MAX_BYTES  # all logs together, payload plus bookkeeping
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES  # one session; beyond it the session fails
    ended_ttl_s: float = DEFAULT_ENDED_TTL_S  # how long a finished session stays resumable
    tombstones: int = DEFAULT_TOMBSTONES  # dropped ids remembered to answer 410 instead of 404

    def __post_init__(self) -> None:
        if self.max_bytes < 1024 * 1024:
            raise ConfigError(f"store max bytes must be at least 1 MiB, got {self.max_bytes}")
        if self.max_log_bytes == DEFAULT_MAX_LOG_BYTES and self.max_bytes < DEFAULT_MAX_LOG_BYTES:
            # A small store with the default session bound: one session may fill the store.
            object.__setattr__(self, "max_log_bytes", self.max_bytes)
        if not 1024 <= self.max_log_bytes <= self.max_bytes:
            raise ConfigError(
                f"max log bytes must be between 1 KiB and the store size, got {self.max_log_bytes}"
            )
        if not 0 < self.ended_ttl_s < math.inf:  # NaN would never expire anything
            raise ConfigError(f"session TTL must be positive and finite, got {self.ended_ttl_s}")
        if self.tombstones < 0:
            raise ConfigError(f"tombstones must be >= 0, got {self.tombstones}")


class LogCache(LRUCache[str, SessionLog]):
    """An LRU cache by bytes that tells the store about every eviction."""

    def __init__(self, maxsize: int, on_evict: Callable[[SessionLog], None]) -> None:
        super().__init__(maxsize=maxsize, getsizeof=lambda log: log.nbytes)
        self._on_evict = on_evict

    def popitem(self) -> tuple[str, SessionLog]:
        key, log = super().popitem()
        self._on_evict(log)
        return key, log


class MemoryStore:
    """Session logs held in this process."""

    def __init__(
        self,
        limits: StoreLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self.limits = limits or StoreLimits()
        # Every session start, append, end and drop passes through here: the natural place
        # to observe them. Readers and writers reach the metrics through the store.
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.metrics.store_bytes.set_function(lambda: self.nbytes)
        self.metrics.store_sessions.set_function(lambda: len(self))
        self.metrics.store_capacity_bytes.set(self.limits.max_bytes)
        self._clock = clock
        self._logs = LogCache(self.limits.max_bytes, self._evicted)
        self._expiries: deque[tuple[float, SessionLog]] = deque()
        # Dropped sessions: (why, owner), so only whoever could read one hears it is gone.
        self._tombstones: LRUCache[str, tuple[str, str]] = LRUCache(
            maxsize=max(1, self.limits.tombstones)
        )
        self._shares: dict[str, dict[str, ShareRecord]] = {}
        self._open_by_owner: dict[str, int] = {}
        self.evictions = 0
        self.expirations = 0
        self.on_cancel: Callable[[str], bool] = lambda _: False
        self.reader_counts: Callable[[], dict[str, int]] = dict

    @property
    def nbytes(self) -> int:
        return int(self._logs.currsize)

    def __len__(self) -> int:
        return len(self._logs)

    def create(self, *, content_type: str, write_path: WritePath, owner: str = "") -> SessionLog:
        self._expire()
        log = SessionLog(
            new_session_id(), content_type=content_type, write_path=write_path, owner=owner
        )
        self._logs[log.session_id] = log
        if owner:
            self._open_by_owner[owner] = self._open_by_owner.get(owner, 0) + 1
        self.metrics.sessions_started.labels(write_path.value).inc()
        self.metrics.sessions_active.labels(write_path.value).inc()
        return log

    def get(self, session_id: str) -> SessionLog:
        self._expire()
        log = self._logs.get(session_id)
        if log is not None:
            return log
        gone = self._tombstones.get(session_id)
        if gone is not None:
            raise SessionGone(f"session {session_id} was {gone[0]}; its events are no longer kept")
        raise SessionNotFound(f"no session {session_id}")

    async def lookup(
        self, session_id: str, *, at_least: int = 0, access: Access = OPEN
    ) -> SessionLog:
        # One process: the log is complete, nothing to wait for.
        try:
            log = self.get(session_id)
        except SessionGone:
            if not access.admits(self._tombstones[session_id][1], None):
                raise SessionNotFound(f"no session {session_id}") from None
            raise
        share = self._shares.get(session_id, {}).get(access.token_id)
        if not access.admits(log.owner, share):
            raise SessionNotFound(f"no session {session_id}")  # exactly as if unknown
        return log

    def open_sessions(self, owner: str) -> int:
        return self._open_by_owner.get(owner, 0)

    async def add_share(self, session_id: str, token_id: str, record: ShareRecord) -> None:
        shares = self._shares.setdefault(session_id, {})
        if len(shares) >= MAX_SHARES_PER_SESSION:
            raise LimitExceeded(f"a session has at most {MAX_SHARES_PER_SESSION} share tokens")
        shares[token_id] = record

    async def revoke_share(self, session_id: str, token_id: str) -> bool:
        return self._shares.get(session_id, {}).pop(token_id, None) is not None

    def peek(self, session_id: str) -> SessionLog | None:
        """The log if this store holds it (None otherwise, no error and no tombstone)."""
        return self._logs.get(session_id)

    def readers_changed(self, session_id: str) -> None:
        pass

    async def request_cancel(self, session_id: str) -> bool:
        return False  # every generation of a memory store runs in this process

    async def remote_readers(self, session_id: str) -> int:
        return 0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def append(self, log: SessionLog, events: list[bytes]) -> bool:
        """Append a chunk's events; False once the log is no longer kept (dropped or failed).

        Exceeding the per-session bound fails the session rather than silently trimming it.
        """
        if log.gone_reason or log.state is not EndState.OPEN:
            return False
        payload = sum(len(raw) for raw in events)
        if log.nbytes + payload + EVENT_OVERHEAD_BYTES * len(events) > self.limits.max_log_bytes:
            self.end(log, EndState.FAILED, "log_limit_exceeded")
            return False
        self._observe_append(log, len(events), payload)
        for raw in events:
            log.append(raw)
        if self._logs.get(log.session_id) is log:  # a touch first: this append is its latest use
            self._logs[log.session_id] = log  # re-set so the cache re-counts its size
            if log.gone_reason:  # the cache made room by evicting this very log
                self._logs.pop(log.session_id, None)
        return not log.gone_reason

    def end(self, log: SessionLog, state: EndState, reason: str = "") -> None:
        if log.state is not EndState.OPEN:
            return
        log.end(state, reason)
        if log.owner:
            left = self._open_by_owner[log.owner] - 1
            if left:
                self._open_by_owner[log.owner] = left
            else:
                del self._open_by_owner[log.owner]
        path = log.write_path.value
        self.metrics.sessions_ended.labels(path, state.value).inc()
        self.metrics.sessions_active.labels(path).dec()
        self.metrics.session_readers.observe(log.peak_readers)
        self._expiries.append((self._clock() + self.limits.ended_ttl_s, log))
        self._expire()

    def _observe_append(self, log: SessionLog, count: int, nbytes: int) -> None:
        metrics = self.metrics.appends[log.write_path.value]
        now = time.monotonic()
        if log.last_seq == 0:
            metrics.first_event.observe(now - log.created_at)
        else:
            metrics.event_gap.observe(now - log.last_append_at)
        log.last_append_at = now
        metrics.events.inc(count)
        metrics.event_bytes.inc(nbytes)

    def _expire(self) -> None:
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, log = self._expiries.popleft()
            if self._logs.get(log.session_id) is log:
                del self._logs[log.session_id]
                self.expirations += 1
                self._drop(log, "expired")

    def _evicted(self, log: SessionLog) -> None:
        self.evictions += 1
        self._drop(log, "evicted")

    def _drop(self, log: SessionLog, reason: str) -> None:
        self.metrics.store_drops.labels(reason).inc()
        if self.limits.tombstones:
            self._tombstones[log.session_id] = (reason, log.owner)
        self._shares.pop(log.session_id, None)
        log.drop(reason)
