"""The readers attached on this node: how many per session and per identity (and their limits),
who reads with a share token (cut when it is revoked or expires), and the one loop that turns a
cursor into counted batches for every front.

The registry knows nothing of write paths: it tells whoever the node wires in (`on_change`)
when a session's reader count changes, which is how a detached generation learns that its
last reader left and how a shared store announces counts to other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from extproc.access.grants import Access
from extproc.errors import ConfigError, LimitExceeded, SessionNotFound, StoreUnavailable
from extproc.node.metrics import RelayMetrics
from extproc.session.log import Cursor, EndState
from extproc.vocabulary import ReaderProtocol

log = logging.getLogger("stream_relay.readers")

DEFAULT_MAX_READERS_PER_SESSION = 1000
DEFAULT_MAX_READERS_PER_IDENTITY = 256  # attached at once, per relay node
SHARE_CHECK_S = 0.5  # how often readers on a share token look whether it still holds

# (session id, share token id) pairs -> those still valid (not revoked, not expired).
ShareCheck = Callable[[set[tuple[str, str]]], Awaitable[set[tuple[str, str]]]]


@dataclass(frozen=True, kw_only=True)
class ReaderLimits:
    max_readers_per_session: int = DEFAULT_MAX_READERS_PER_SESSION
    max_readers_per_identity: int = DEFAULT_MAX_READERS_PER_IDENTITY

    def __post_init__(self) -> None:
        for name in ("max_readers_per_session", "max_readers_per_identity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


class Reader:
    """One attached reader: its cursor, its protocol and, if it reads by one, its share token."""

    __slots__ = ("_metrics", "cursor", "protocol", "share")

    def __init__(
        self,
        cursor: Cursor,
        protocol: ReaderProtocol,
        share: tuple[str, str] | None,
        metrics: RelayMetrics,
    ) -> None:
        self.cursor = cursor
        self.protocol = protocol
        self.share = share  # (session id, token id) when it reads by a share token
        self._metrics = metrics

    async def batches(self) -> AsyncIterator[tuple[int, list[bytes]]]:
        """(seq of the first event, events) until the log ends; each batch is counted once the
        front has written it (the generator resumes only then)."""
        cursor = self.cursor
        log = cursor.log
        async for batch in cursor.batches():
            yield cursor.seq - len(batch) + 1, batch
            self._metrics.reader_wrote(self.protocol, len(batch), log.last_seq - cursor.seq)


class ReaderRegistry:
    def __init__(
        self,
        limits: ReaderLimits,
        metrics: RelayMetrics,
        *,
        on_change: Callable[[str, int], None] = lambda session_id, readers: None,
    ) -> None:
        self.limits = limits
        self._metrics = metrics
        self._on_change = on_change  # (session id, readers now on this node)
        self._per_session: dict[str, int] = {}
        self._per_identity: dict[str, int] = {}
        self._readers: set[Reader] = set()
        metrics.reader_lag_max = self._max_lag

    def readers(self, session_id: str) -> int:
        return self._per_session.get(session_id, 0)

    @property
    def attached(self) -> int:
        """Readers attached on this node, all sessions together."""
        return len(self._readers)

    def counts(self) -> dict[str, int]:
        """Readers per session on this node (what a shared store announces to the others)."""
        return self._per_session.copy()

    @contextlib.contextmanager
    def identity_slot(self, identity: str) -> Iterator[None]:
        """Count one reader for `identity` (the per-identity limit) while the block runs."""
        if not identity:
            yield
            return
        count = self._per_identity.get(identity, 0)
        limit = self.limits.max_readers_per_identity
        if count >= limit:
            raise LimitExceeded(f"{count} readers attached for this identity (limit {limit})")
        self._per_identity[identity] = count + 1
        try:
            yield
        finally:
            left = self._per_identity[identity] - 1
            if left:
                self._per_identity[identity] = left
            else:
                del self._per_identity[identity]

    @contextlib.contextmanager
    def attach(
        self,
        cursor: Cursor,
        protocol: ReaderProtocol,
        access: Access,
        *,
        identity_counted: bool = False,
    ) -> Iterator[Reader]:
        """A reader on `cursor` for as long as the block runs, within the limits per session
        and (unless the caller holds an identity_slot already) per identity."""
        with contextlib.ExitStack() as stack:
            if not identity_counted:
                stack.enter_context(self.identity_slot(access.identity))
            yield stack.enter_context(self._session_reader(cursor, protocol, access))

    @contextlib.contextmanager
    def _session_reader(
        self, cursor: Cursor, protocol: ReaderProtocol, access: Access
    ) -> Iterator[Reader]:
        session = cursor.log
        session_id = session.session_id
        count = self._per_session.get(session_id, 0)
        limit = self.limits.max_readers_per_session
        if count >= limit:
            raise LimitExceeded(f"session already has {count} readers (limit {limit})")
        by_share = access.reads_by_share(session.owner)
        reader = Reader(
            cursor, protocol, (session_id, access.token_id) if by_share else None, self._metrics
        )
        self._per_session[session_id] = count + 1
        self._readers.add(reader)
        session.peak_readers = max(session.peak_readers, count + 1)
        metrics = self._metrics
        metrics.reader_attached(protocol, replayed=max(0, session.last_seq - cursor.seq))
        self._on_change(session_id, count + 1)
        try:
            yield reader
        finally:
            self._readers.discard(reader)
            metrics.reader_detached(
                protocol, cut_short=session.state is EndState.OPEN and not session.gone_reason
            )
            left = self._per_session[session_id] - 1
            if left:
                self._per_session[session_id] = left
            else:
                del self._per_session[session_id]
            self._on_change(session_id, left)

    def revoke(self, session_id: str, token_id: str) -> int:
        """Cut the readers of `session_id` that read by this share token; how many."""
        return self._cut({(session_id, token_id)})

    def _cut(self, shares: set[tuple[str, str]]) -> int:
        cut = [r for r in self._readers if r.share in shares]
        for reader in cut:
            # Exactly what a stranger would have got: the token no longer admits anyone.
            session_id = reader.cursor.log.session_id
            reader.cursor.close(SessionNotFound(f"no session {session_id}"))
        return len(cut)

    async def watch_shares(self, still_valid: ShareCheck) -> None:
        """Every SHARE_CHECK_S, cut readers whose share token was revoked (on any node) or has
        expired; runs until cancelled. A check that fails (a store that cannot answer) cuts no
        one; the next one asks again."""
        while True:
            await asyncio.sleep(SHARE_CHECK_S)
            shares = {r.share for r in self._readers if r.share is not None}
            if not shares:
                continue
            try:
                valid = await still_valid(shares)
            except StoreUnavailable:  # the store's own error metrics say what failed
                continue
            except Exception:  # a bug must not end the watch: no token would be cut any more
                log.exception("share token check failed")
                continue
            self._cut(shares - valid)

    def _max_lag(self) -> int:
        return max((r.cursor.log.last_seq - r.cursor.seq for r in self._readers), default=0)
