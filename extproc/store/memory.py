"""The embedded session store: logs in this process, bounded by total bytes and a TTL.

Eviction is least-recently-used by bytes (cachetools computes each log's size); a finished
session also expires `session_ttl` after its end. A dropped session leaves a small tombstone
(at most `max_tombstones`, by default as many as fit in 1/16 of the store's bytes) so that its
readers get 410 Gone, not 404: lost history is said out loud. Nothing else is kept per session
once it is dropped, so memory stays within the caps: logs within --store-max-bytes, tombstones
within a sixteenth more.
"""

from __future__ import annotations

import asyncio
import math
import operator
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from extproc.access.grants import MAX_SHARES_PER_SESSION, OPEN, Access, ShareRecord
from extproc.errors import AccessDenied, ConfigError, LimitExceeded, SessionGone, SessionNotFound
from extproc.node.metrics import RelayMetrics
from extproc.session.ids import new_session_id
from extproc.session.log import EVENT_OVERHEAD_BYTES, EndState, SessionLog, WritePath
from extproc.store.tombstones import BYTES_PER_TOMBSTONE, Tombstones
from extproc.vocabulary import DropReason

_OPEN = EndState.OPEN  # per append: a global is ~8x cheaper than an Enum member lookup (3.11)
DEFAULT_STORE_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_SESSION_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_SESSION_TTL_S = 900.0
TOMBSTONE_SHARE = 16  # by default tombstones may take 1/16 of --store-max-bytes besides it
MAX_TOMBSTONES = 65_536  # ... but never more than this many (2.6 MiB, allocated at start)
SWEEP_MIN_S = 1.0  # expiry runs on its own at most this often (and at every store call)


@dataclass(frozen=True, kw_only=True)
class StoreLimits:
    """Named as their flags: --store-max-bytes, --session-max-bytes, --session-ttl."""

    store_max_bytes: int = DEFAULT_STORE_MAX_BYTES  # all logs together, payload and bookkeeping
    session_max_bytes: int = DEFAULT_SESSION_MAX_BYTES  # one session; beyond it, it fails
    session_ttl: float = DEFAULT_SESSION_TTL_S  # how long a finished session stays resumable
    # Dropped ids remembered (410 instead of 404); None: as many as fit in 1/16 of the store.
    max_tombstones: int | None = None

    def __post_init__(self) -> None:
        if self.store_max_bytes < 1024 * 1024:
            raise ConfigError(
                f"--store-max-bytes must be at least 1 MiB, got {self.store_max_bytes}"
            )
        if (
            self.session_max_bytes == DEFAULT_SESSION_MAX_BYTES
            and self.store_max_bytes < DEFAULT_SESSION_MAX_BYTES
        ):
            # A small store with the default session bound: one session may fill the store.
            object.__setattr__(self, "session_max_bytes", self.store_max_bytes)
        if not 1024 <= self.session_max_bytes <= self.store_max_bytes:
            raise ConfigError(
                "--session-max-bytes must be between 1 KiB and --store-max-bytes, "
                f"got {self.session_max_bytes}"
            )
        if not 0 < self.session_ttl < math.inf:  # NaN would never expire anything
            raise ConfigError(f"--session-ttl must be positive and finite, got {self.session_ttl}")
        if self.max_tombstones is None:
            fit = self.store_max_bytes // TOMBSTONE_SHARE // BYTES_PER_TOMBSTONE
            object.__setattr__(self, "max_tombstones", min(MAX_TOMBSTONES, fit))
        elif self.max_tombstones < 0:
            raise ConfigError(f"max tombstones must be >= 0, got {self.max_tombstones}")

    @property
    def tombstones(self) -> int:
        """The bound on tombstones (max_tombstones, resolved)."""
        assert self.max_tombstones is not None  # resolved in __post_init__
        return self.max_tombstones


_NBYTES = operator.attrgetter("nbytes")  # a C callable: a lambda costs ~1,000 instructions


class LogCache(LRUCache[str, SessionLog]):
    """An LRU cache by bytes that tells the store about every eviction."""

    def __init__(self, maxsize: int, on_evict: Callable[[SessionLog], None]) -> None:
        super().__init__(maxsize=maxsize, getsizeof=_NBYTES)  # called on every append
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
        metrics: RelayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or StoreLimits()
        # Every session start, append, end and drop passes through here: the natural place
        # to count them.
        self._metrics = metrics
        metrics.store_bytes = lambda: self.nbytes
        metrics.store_sessions = lambda: len(self)
        metrics.store_capacity_bytes = self.limits.store_max_bytes
        metrics.store_tombstones = lambda: len(self._tombstones)
        self._clock = clock
        self._logs = LogCache(self.limits.store_max_bytes, self._evicted)
        # Ended sessions by id -> when they expire. The TTL is one constant, so insertion order
        # is expiry order: the front is always the next to expire, and an evicted session
        # leaves at once (no per-session bookkeeping outlives its log).
        self._expiries: OrderedDict[str, float] = OrderedDict()  # O(1) at both ends
        # Dropped sessions: why and whose, so only whoever could read one hears it is gone.
        self._tombstones = Tombstones(self.limits.tombstones)
        self._shares: dict[str, dict[str, ShareRecord]] = {}
        # Expiry also runs on a timer while sessions wait to expire, so an idle node lets go of
        # them too (not only at its next store call).
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def nbytes(self) -> int:
        return int(self._logs.currsize)

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    def __len__(self) -> int:
        return len(self._logs)

    def create(self, *, content_type: str, write_path: WritePath, owner: str = "") -> SessionLog:
        self._expire()
        log = SessionLog(
            new_session_id(), content_type=content_type, write_path=write_path, owner=owner
        )
        self._logs[log.session_id] = log
        self._metrics.session_started(write_path)
        return log

    def get(self, session_id: str) -> SessionLog:
        self._expire()
        log = self._logs.get(session_id)
        if log is not None:
            return log
        gone = self._tombstones.reason(session_id)
        if gone is not None:
            raise SessionGone(f"session {session_id} was {gone}; its events are no longer kept")
        raise SessionNotFound(f"no session {session_id}")

    async def lookup(
        self, session_id: str, *, at_least: int = 0, access: Access = OPEN
    ) -> SessionLog:
        # One process: the log is complete, nothing to wait for.
        try:
            log = self.get(session_id)
        except SessionGone:
            owner = self._tombstones.owner_seen_by(session_id, access.identity)
            if not access.admits(owner, None):
                raise AccessDenied(f"no session {session_id}") from None
            raise
        if not access.admits(log.owner, self._share(session_id, access.token_id)):
            raise AccessDenied(f"no session {session_id}")  # exactly as if unknown
        return log

    def _share(self, session_id: str, token_id: str) -> ShareRecord | None:
        return self._shares.get(session_id, {}).get(token_id)

    async def add_share(self, session_id: str, token_id: str, record: ShareRecord) -> None:
        shares = self._shares.setdefault(session_id, {})
        now = time.time()
        for expired in [t for t, r in shares.items() if r.expires_at <= now]:
            del shares[expired]  # an expired token gives its slot back
        if len(shares) >= MAX_SHARES_PER_SESSION:
            raise LimitExceeded(f"a session has at most {MAX_SHARES_PER_SESSION} share tokens")
        shares[token_id] = record

    async def revoke_share(self, session_id: str, token_id: str) -> bool:
        return self._shares.get(session_id, {}).pop(token_id, None) is not None

    async def valid_shares(self, shares: set[tuple[str, str]]) -> set[tuple[str, str]]:
        now = time.time()
        return {
            (session_id, token_id)
            for session_id, token_id in shares
            if (record := self._share(session_id, token_id)) is not None and record.expires_at > now
        }

    def fenced(self, log: SessionLog) -> bool:
        return False  # one process: no other node can take a session over

    def peek(self, session_id: str) -> SessionLog | None:
        """The log if this store holds it (None otherwise, no error and no tombstone)."""
        return self._logs.get(session_id)

    def readers_changed(self, session_id: str) -> None:
        pass

    async def request_cancel(self, session_id: str) -> bool:
        return False  # every generation of a memory store runs in this process

    async def remote_readers(self, session_id: str) -> int:
        return 0

    async def start(
        self,
        *,
        on_cancel: Callable[[str], bool] = lambda session_id: False,
        reader_counts: Callable[[], dict[str, int]] = dict,
    ) -> None:
        pass  # one process: cancels and reader counts never arrive from elsewhere

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def append(self, log: SessionLog, events: list[bytes]) -> bool:
        """Append a chunk's events; False once the log is no longer kept (dropped or failed).

        Exceeding the per-session bound fails the session rather than silently trimming it.
        """
        if log.gone_reason or log.state is not _OPEN:
            return False
        count = len(events)
        payload = len(events[0]) if count == 1 else sum(map(len, events))
        if log.nbytes + payload + EVENT_OVERHEAD_BYTES * count > self.limits.session_max_bytes:
            self.end(log, EndState.FAILED, "log_limit_exceeded")
            return False
        self._observe_append(log, count, payload)
        log.extend(events, payload)
        logs, session_id = self._logs, log.session_id
        try:
            held = logs[session_id]  # a touch first: this append is its latest use
        except KeyError:
            held = None
        if held is log:
            logs[session_id] = log  # re-set so the cache re-counts its size
            if log.gone_reason:  # the cache made room by evicting this very log
                logs.pop(session_id, None)
        return not log.gone_reason

    def end(self, log: SessionLog, state: EndState, reason: str = "") -> None:
        if log.state is not EndState.OPEN:
            return
        log.end(state, reason)
        self._metrics.session_ended(log.write_path, state, log.peak_readers)
        if not log.gone_reason:
            self._expiries[log.session_id] = self._clock() + self.limits.session_ttl
        self._expire()

    def _observe_append(self, log: SessionLog, count: int, nbytes: int) -> None:
        stats = self._metrics.appends[log.write_path]
        now = time.monotonic()
        if log.last_seq == 0:
            stats.first_event.observe(now - log.created_at)
        else:
            stats.event_gap.observe(now - log.last_append_at)
        log.last_append_at = now
        stats.events += count
        stats.event_bytes += nbytes

    def _expire(self) -> None:
        expiries = self._expiries
        now = self._clock()
        while expiries:
            session_id, expires_at = next(iter(expiries.items()))  # the next one to expire
            if expires_at > now:
                self._arm_sweep(expires_at - now)
                return
            del expiries[session_id]
            log = self._logs.pop(session_id, None)
            if log is not None:
                self._drop(log, DropReason.EXPIRED)

    def _arm_sweep(self, delay: float) -> None:
        """Run expiry again when the next session is due (outside an event loop, as in unit
        tests driving a fake clock, only store calls expire sessions)."""
        if self._sweep is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweep = loop.call_later(max(SWEEP_MIN_S, delay), self._swept)

    def _swept(self) -> None:
        self._sweep = None
        self._expire()

    def _evicted(self, log: SessionLog) -> None:
        self._expiries.pop(log.session_id, None)
        self._drop(log, DropReason.EVICTED)

    def _drop(self, log: SessionLog, reason: DropReason) -> None:
        self._metrics.store_dropped(reason)
        self._tombstones.add(log.session_id, reason, log.owner)
        self._shares.pop(log.session_id, None)
        log.drop(reason.value)
