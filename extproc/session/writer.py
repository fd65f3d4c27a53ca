"""SessionWriter: turns upstream bytes into logged, tagged events; shared by both write paths.

Inline (ext_proc) forwards what `feed` returns to the client; detached ignores it and lets the
client read the log like every other reader. Either way the log holds each event exactly as
clients receive it, so replayed bytes equal live bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from extproc.session.framing import (
    Frame,
    FrameTooLarge,
    NdjsonFramer,
    SseFramer,
    sse_data,
    tag_sse_id,
)
from extproc.session.ids import event_id_prefix
from extproc.session.log import EndState, SessionLog
from extproc.session.usage import Usage, UsageTally, may_report_usage, parse_usage

_OPEN = EndState.OPEN  # per chunk: a global is ~8x cheaper than an Enum member lookup (3.11)


class LogSink(Protocol):
    """Where a writer's events and end go: the session store's writer side."""

    def append(self, log: SessionLog, events: list[bytes]) -> bool: ...

    def end(self, log: SessionLog, state: EndState, reason: str = "") -> None: ...


class SessionWriter:
    __slots__ = ("_framer", "_id_prefix", "_on_usage", "_store", "_tag", "_usage", "log")

    def __init__(
        self,
        store: LogSink,
        log: SessionLog,
        framer: SseFramer | NdjsonFramer,
        *,
        on_usage: Callable[[Usage], None],
    ) -> None:
        self._store = store
        self.log = log
        self._framer: SseFramer | NdjsonFramer | None = framer
        self._tag = isinstance(framer, SseFramer)  # NDJSON lines cannot carry an id in-band
        self._id_prefix = event_id_prefix(log.session_id) if self._tag else b""
        self._on_usage = on_usage  # the tokens each of the upstream's usage reports adds
        self._usage = UsageTally()

    def feed(self, data: bytes) -> bytes:
        """Frame a chunk; return the bytes the client should get for it (events tagged)."""
        framer = self._framer
        if framer is None:
            return data
        try:
            frames = framer.feed(data)
        except FrameTooLarge as exc:
            # Fail this session loudly; the client still gets every byte, the rest untagged.
            self._framer = None
            out = self._emit(exc.frames) + exc.rest
            self._store.end(self.log, EndState.FAILED, f"event larger than {exc.limit} bytes")
            return out
        return self._emit(frames)

    def close(self) -> bytes:
        """The upstream ended: flush what is left and end the session done (or failed if torn)."""
        framer, self._framer = self._framer, None
        tail = framer.close() if framer is not None else None
        if tail is None:
            self._store.end(self.log, EndState.DONE)
            return b""
        out = self._emit([tail])
        if not tail.complete and tail.is_event:
            self._store.end(self.log, EndState.FAILED, "upstream ended mid-event")
        else:
            self._store.end(self.log, EndState.DONE)
        return out

    def _emit(self, frames: list[Frame]) -> bytes:
        log = self.log
        if log.state is not _OPEN or log.gone_reason:
            return b"".join(frame.raw for frame in frames)
        seq = log.last_seq
        kept: list[bytes] = []
        for frame in frames:
            if frame.is_event and frame.complete:  # comments, retry-only blocks, a torn tail:
                seq += 1  # not events, passed on untouched
                kept.append(self._event(frame.raw, seq))
        if not kept:
            return b"".join(frame.raw for frame in frames)
        if not self._store.append(log, kept):
            # The log stopped keeping events (its byte limit): ids would not resume, so the
            # client gets the upstream's bytes untagged from here on.
            return b"".join(frame.raw for frame in frames)
        if len(kept) == len(frames):  # all events; usually one, the chunk's own
            return kept[0] if len(kept) == 1 else b"".join(kept)
        events = iter(kept)
        return b"".join(
            next(events) if frame.is_event and frame.complete else frame.raw for frame in frames
        )

    def _event(self, raw: bytes, seq: int) -> bytes:
        """The event as logged and sent: tagged with its id (SSE); its usage report counted."""
        if may_report_usage(raw):
            usage = parse_usage((sse_data(raw) or b"") if self._tag else raw)
            added = self._usage.add(usage) if usage is not None else None
            if added is not None:
                self._on_usage(added)
        return tag_sse_id(raw, b"%s%d" % (self._id_prefix, seq)) if self._tag else raw
