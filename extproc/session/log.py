"""The session log: one streamed response as an append-only list of events plus its end state.

It is the only buffer and the one seam between writers and readers. Seqs start at 1 and are
dense. Readers are `Cursor`s that hold an index, never a copy; a log that the store drops
(evicted or expired) wakes every cursor, which then raises SessionGone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from extproc.errors import RelayError, SessionGone
from extproc.session.framing import framing_of
from extproc.vocabulary import EndState, Framing, WritePath

__all__ = ["Cursor", "EndState", "SessionLog", "WritePath"]

# A reader's write: at most this many events and about this many bytes.
DEFAULT_BATCH_EVENTS = 256
DEFAULT_BATCH_BYTES = 64 * 1024
_OPEN = EndState.OPEN  # per append: a global is ~8x cheaper than an Enum member lookup (3.11)
# Per-event bookkeeping that counts against the store's byte budget besides the payload.
EVENT_OVERHEAD_BYTES = 64
LOG_OVERHEAD_BYTES = 512


class SessionLog:
    """Events of one session. Appends are synchronous; waiting for more is async."""

    __slots__ = (
        "_changed",
        "_events",
        "content_type",
        "created_at",
        "ended_at",
        "framing",
        "gone_reason",
        "last_append_at",
        "last_seq",
        "nbytes",
        "owner",
        "peak_readers",
        "reason",
        "request_key",
        "session_id",
        "state",
        "write_path",
    )

    def __init__(
        self, session_id: str, *, content_type: str, write_path: WritePath, owner: str = ""
    ) -> None:
        self.session_id = session_id
        self.content_type = content_type
        framing = framing_of(content_type)
        if framing is None:
            raise ValueError(f"not a stream the relay frames: {content_type!r}")
        self.framing: Framing = framing  # derived once; every reader asks the log
        self.write_path = write_path
        self.owner = owner  # the identity that created it ("" when auth is off)
        # The request that created it (session/request_key.py), which a resume must repeat;
        # "" while unknown (a stream on a route that is not a generation route).
        self.request_key = ""
        self.created_at = time.monotonic()
        self.last_append_at = self.created_at
        self.peak_readers = 0  # most readers at once; kept by whoever counts readers
        self.ended_at: float | None = None
        self.state = EndState.OPEN
        self.reason = ""
        self.gone_reason = ""  # set when the store dropped the log: "evicted" or "expired"
        self.nbytes = LOG_OVERHEAD_BYTES
        self._events: list[bytes] = []
        self.last_seq = 0  # len(_events), kept as a field: read per event, a property costs 8x
        self._changed: asyncio.Future[None] | None = None

    def append(self, raw: bytes) -> int:
        """Append one event (the bytes exactly as clients receive them); returns its seq."""
        if self.state is not EndState.OPEN:
            raise RuntimeError(f"append to a {self.state} session")
        self._events.append(raw)
        self.last_seq += 1
        self.nbytes += len(raw) + EVENT_OVERHEAD_BYTES
        self._wake()
        return self.last_seq

    def extend(self, events: list[bytes], nbytes: int) -> None:
        """Append several events at once (`nbytes`: their total length); one wake-up."""
        if self.state is not _OPEN:
            raise RuntimeError(f"append to a {self.state} session")
        self._events += events
        self.last_seq += len(events)
        self.nbytes += nbytes + EVENT_OVERHEAD_BYTES * len(events)
        if self._changed is not None:  # a cursor waits (inline logs rarely have one)
            self._wake()

    def end(self, state: EndState, reason: str = "") -> None:
        """Record the end state once; later calls are ignored (the first cause wins)."""
        if self.state is not EndState.OPEN or state is EndState.OPEN:
            return
        self.state = state
        self.reason = reason
        self.ended_at = time.monotonic()
        self._wake()

    def drop(self, reason: str) -> None:
        """The store let go of this log: free the payload and tell every waiting cursor."""
        self.gone_reason = reason
        self._events = []
        self.last_seq = 0
        self._wake()

    def events_after(self, seq: int, limit: int) -> list[bytes]:
        if self.gone_reason:
            raise self._gone()
        return self._events[seq : seq + limit]

    async def wait_beyond(self, seq: int) -> None:
        """Return once there is an event after `seq` or the log has ended (or someone called
        wake()); raise SessionGone once the store has dropped it. A dropped log stays open
        forever, so returning would leave a caller that waits for the end spinning."""
        if seq >= len(self._events) and self.state is EndState.OPEN and not self.gone_reason:
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._changed)
        if self.gone_reason:
            raise self._gone()

    def wake(self) -> None:
        """Wake every cursor waiting on this log, e.g. so one of them sees it was closed."""
        self._wake()

    def _gone(self) -> SessionGone:
        return SessionGone(f"session {self.session_id} was {self.gone_reason}")

    def _wake(self) -> None:
        if self._changed is not None:
            if not self._changed.done():
                self._changed.set_result(None)
            self._changed = None


class Cursor:
    """A reader's position on a log. Yields batches of event bytes, history first, then live."""

    __slots__ = ("_closed", "_log", "batch_bytes", "batch_limit", "seq")

    def __init__(
        self,
        log: SessionLog,
        after: int,
        *,
        batch_limit: int = DEFAULT_BATCH_EVENTS,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        self._log = log
        self.seq = after
        self.batch_limit = batch_limit
        self.batch_bytes = batch_bytes
        self._closed: RelayError | None = None

    @property
    def log(self) -> SessionLog:
        return self._log

    def close(self, error: RelayError) -> None:
        """Stop this reader (e.g. its share token was revoked): its next step raises `error`."""
        self._closed = error
        self._log.wake()

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """Yield until the log ends; raises SessionGone if the store drops it meanwhile."""
        log = self._log
        while True:
            if self._closed is not None:
                raise self._closed
            batch = log.events_after(self.seq, self.batch_limit)
            if batch:
                batch = self._cap_bytes(batch)
                self.seq += len(batch)
                yield batch
                continue
            if log.state is not EndState.OPEN:
                return
            await log.wait_beyond(self.seq)

    def _cap_bytes(self, batch: list[bytes]) -> list[bytes]:
        """At most ~batch_bytes per write (at least one event), so a reader catching up
        copies a bounded amount at a time, whatever its lag."""
        size = 0
        for count, raw in enumerate(batch, 1):
            size += len(raw)
            if size >= self.batch_bytes:
                return batch[:count]
        return batch
