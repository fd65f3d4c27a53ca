# Sans-IO framing of streamed LLM responses into frames: SSE blocks (WHATWG event-stream rules)
# and NDJSON lines, plus helpers to tag and read one SSE block. Invariants: the frames never depend
# on how the input was chunked, and the raw bytes of all frames, in order, are exactly the input.
from __future__ import annotations

import re
from typing import NamedTuple

from extproc.vocabulary import Framing

DEFAULT_MAX_FRAME_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_FRAMINGS = {
    "text/event-stream": Framing.SSE,
    "application/x-ndjson": Framing.NDJSON,
    "application/jsonl": Framing.NDJSON,
}
# A blank line starts where one line end is directly followed by another: LF LF, LF CR or CR CR
# (a CR followed by LF is one CRLF). The search helpers find that two-byte marker.
_BLANK = re.compile(rb"\n[\r\n]|\r\r")
_CR_STEPS = 4  # CR-ended lines checked by hand (memchr) before one regex pass (~5 ns/byte)


class Frame(NamedTuple):  # a tuple: immutable, and made once per event on the hot path
    raw: bytes  # exact input bytes, terminator included
    is_event: bool  # SSE: has a data field (WHATWG would dispatch it); NDJSON: non-blank line
    complete: bool = True  # False only for an unterminated remainder returned by close()


# Frame's own __new__ is Python code; the tuple constructor is not (a third of a frame's cost).
_frame = tuple.__new__


class FrameTooLarge(Exception):
    """One frame outgrew max_frame_bytes. `frames` holds the frames completed before it in the
    same feed() call and `rest` every byte fed but not in them, so nothing is lost. The framer
    is unusable afterwards: fail the stream and drop the framer."""

    def __init__(self, limit: int, frames: list[Frame], rest: bytes = b"") -> None:
        super().__init__(f"frame exceeds max_frame_bytes={limit}")
        self.limit = limit
        self.frames = frames
        self.rest = rest


class _Framer:
    __slots__ = ("_buf", "_limit", "_scan")

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self._limit = max_frame_bytes
        self._buf = bytearray()  # the pending, not yet terminated frame
        self._scan = 0  # offset in _buf where the terminator search resumes

    def feed(self, data: bytes) -> list[Frame]:
        """Buffer `data`; return every frame it completes, in order."""
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data  # common case: whole frames are sliced straight out of the chunk
        frames: list[Frame] = []
        start, scan = self._cut(buf, self._scan, frames)
        if len(buf) - start > self._limit:  # bounds memory: at most the limit plus one chunk
            raise FrameTooLarge(self._limit, frames, bytes(buf[start:]))
        if buf is self._buf:
            del self._buf[:start]  # cheap: bytearray trims its head in place
        elif start < len(buf):
            self._buf += memoryview(buf)[start:]
        self._scan = scan - start
        return frames

    def _take(self) -> bytes:
        raw = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return raw

    def _cut(
        self, buf: bytes | bytearray, scan: int, frames: list[Frame]
    ) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError


class SseFramer(_Framer):
    """Splits an event stream into blocks, each ending with (and including) its blank line."""

    __slots__ = ("_first",)

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        super().__init__(max_frame_bytes=max_frame_bytes)
        self._first = True  # no block emitted yet: a leading BOM is not part of the first line

    def feed(self, data: bytes) -> list[Frame]:
        # The common case, one whole LF-only block per chunk (LLM servers write each event at
        # once) and nothing pending: the chunk is the frame, found with two memchr-speed scans
        # (find, not `in`: bytes `in` first tries the needle as an int and raises inside). A
        # chunk opening with a line end holds a lone blank line first: the full path.
        if (
            data.endswith(b"\n\n")
            and not self._buf
            and not self._first
            and data.find(b"\n\n") == len(data) - 2
            and data.find(b"\r") < 0
            and data[0] != 10
            and len(data) <= self._limit
        ):
            return [_frame(Frame, (data, data.startswith(b"data:") or _has_data(data), True))]
        return super().feed(data)

    def _cut(self, buf: bytes | bytearray, scan: int, frames: list[Frame]) -> tuple[int, int]:
        n, start, limit = len(buf), 0, self._limit
        cr = buf.find(b"\r", scan)  # first CR at or after scan; -1: no CR left, LF-only fast path
        while start < n:
            lead = 3 if self._first and buf.startswith(_BOM) else start
            if lead < n and buf[lead] in b"\r\n":
                b = lead  # the block is a lone blank line
            else:
                if 0 <= cr < scan:
                    cr = buf.find(b"\r", scan)
                p = _lf_lf(buf, scan, n if cr < 0 else cr)
                if p < 0 <= cr:
                    p = _blank_from_cr(buf, scan, cr)
                if p < 0:
                    return start, max(n - 1, start)  # the last byte may pair with the next one
                b = p + 1
            # b is where the blank line's terminator starts; a CR there may be half a CRLF.
            if buf[b] == 10:
                end = b + 1
            elif b + 1 < n:
                end = b + 2 if buf[b + 1] == 10 else b + 1
            else:
                return start, max(b - 1, start)  # wait for the next byte (or close())
            if end - start > limit:
                raise FrameTooLarge(limit, frames, bytes(buf[start:]))
            raw = bytes(buf[start:end])
            frames.append(Frame(raw, _has_data(_skip_bom(raw) if self._first else raw)))
            self._first = False
            start = scan = end
        return start, start

    def close(self) -> Frame | None:
        """End of stream: the pending bytes as a frame, or None. A final CR is a line end now, so
        they may form a complete block; otherwise complete=False (WHATWG discards such a tail)."""
        raw = self._take()
        if not raw:
            return None
        body = _skip_bom(raw) if self._first else raw
        complete = body == b"\r" or body.endswith((b"\n\r", b"\r\r"))
        return Frame(raw, _has_data(body), complete)


class NdjsonFramer(_Framer):
    """Splits NDJSON into lines ending with LF (a CR before it stays in the line's raw)."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[Frame]:
        # The common case, one whole line per chunk and nothing pending: the chunk is the frame.
        if data and not self._buf and data.find(b"\n") == len(data) - 1 <= self._limit - 1:
            return [_frame(Frame, (data, not data.isspace(), True))]
        return super().feed(data)

    def _cut(self, buf: bytes | bytearray, scan: int, frames: list[Frame]) -> tuple[int, int]:
        start, limit = 0, self._limit
        while (i := buf.find(b"\n", scan)) >= 0:
            if i + 1 - start > limit:
                raise FrameTooLarge(limit, frames, bytes(buf[start:]))
            raw = bytes(buf[start : i + 1])
            frames.append(Frame(raw, not raw.isspace()))
            start = scan = i + 1
        return start, len(buf)

    def close(self) -> Frame | None:
        """End of stream: NDJSON allows a last line without LF, so it is a complete frame (an
        event unless blank; a whitespace-only tail is returned as a non-event to keep the bytes)."""
        raw = self._take()
        return Frame(raw, not raw.isspace()) if raw else None


def framing_of(content_type: str) -> Framing | None:
    """How a response with this Content-Type is framed, or None when it is not a stream the
    relay frames. Media types are case-insensitive (RFC 9110 §8.3.1)."""
    return _FRAMINGS.get(content_type.partition(";")[0].strip().lower())


def identity_coded(content_encoding: str | None) -> bool:
    """Whether a body with this Content-Encoding is the bytes as written, so it can be framed
    (a gzipped stream is passed through untouched, as no session)."""
    return content_encoding is None or content_encoding.strip().lower() in ("", "identity")


def new_framer(
    framing: Framing, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> SseFramer | NdjsonFramer:
    if framing is Framing.SSE:
        return SseFramer(max_frame_bytes=max_frame_bytes)
    return NdjsonFramer(max_frame_bytes=max_frame_bytes)


def _lf_lf(buf: bytes | bytearray, pos: int, end: int) -> int:
    """First LF LF within buf[pos:end], or -1."""
    i = buf.find(b"\n", pos, end)  # memchr; usually this LF is already the blank line's
    if i < 0 or (i + 1 < end and buf[i + 1] == 10):
        return i
    return buf.find(b"\n\n", i + 1, end)


def _blank_from_cr(buf: bytes | bytearray, scan: int, cr: int) -> int:
    """First blank-line marker at or after scan, knowing there is no LF LF before cr, the first CR
    at or after scan; -1 if there is none yet."""
    n = len(buf)
    for _ in range(_CR_STEPS):  # cheap per line, so only for a few (short lines go to the regex)
        if cr > scan and buf[cr - 1] == 10:
            return cr - 1  # LF CR
        after = buf[cr + 1 : cr + 3]
        if after[:1] == b"\r":
            return cr  # CR CR
        if after[:1] == b"\n" and after[1:] in (b"\r", b"\n"):
            return cr + 1  # CRLF, then another line end
        scan = cr + 1
        cr = buf.find(b"\r", scan)
        p = _lf_lf(buf, scan, n if cr < 0 else cr)
        if p >= 0 or cr < 0:
            return p
    m = _BLANK.search(buf, scan)
    return m.start() if m else -1


def _skip_bom(raw: bytes) -> bytes:
    return raw[3:] if raw.startswith(_BOM) else raw


def _has_data(block: bytes) -> bool:
    if block.startswith(b"data:"):
        return True
    if b"data" not in block:
        return False
    return any(line == b"data" or line.startswith(b"data:") for line in block.splitlines())


def sse_data(raw: bytes) -> bytes | None:
    """The block's data as the WHATWG algorithm builds it (data lines joined with LF, one leading
    space after the colon stripped), or None when there is no data field. A leading BOM (the
    stream's, on its first block) is skipped."""
    parts: list[bytes] = []
    for line in _skip_bom(raw).splitlines():  # bytes.splitlines splits on CRLF, LF and CR only
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line == b"data":
            parts.append(b"")
    return b"\n".join(parts) if parts else None


def sse_event_name(raw: bytes) -> str | None:
    """The block's event type as the WHATWG algorithm sets it (the last `event` field wins, one
    leading space after the colon stripped), or None when it has none or an empty one: such an
    event dispatches as "message"."""
    if b"event" not in raw:
        return None
    name = b""
    for line in _skip_bom(raw).splitlines():
        if line.startswith(b"event:"):
            name = line[7:] if line[6:7] == b" " else line[6:]
        elif line == b"event":
            name = b""
    return name.decode("utf-8", "replace") or None


def _line_end(block: bytes) -> bytes:
    lf, cr = block.find(b"\n"), block.find(b"\r")
    if cr < 0 or 0 <= lf < cr:
        return b"\n"  # also the default for a block without any line end
    return b"\r\n" if block[cr + 1 : cr + 2] == b"\n" else b"\r"


def _is_id_line(line: bytes) -> bool:
    line = line.rstrip(b"\r\n")  # keepends lines carry exactly one terminator
    return line == b"id" or line.startswith(b"id:")


def tag_sse(raw: bytes, event_id: str) -> bytes:
    """Return the SSE block with `id: <event_id>` as its first line, using the block's own line
    ending (LF, CRLF or CR), with any upstream `id` field lines removed; every other byte unchanged
    (field order, `event:` names, comments, data lines, the terminating blank line). A leading BOM
    stays in front so that it still opens the stream."""
    if "\n" in event_id or "\r" in event_id or "\0" in event_id:
        raise ValueError(f"invalid SSE event id: {event_id!r}")
    return tag_sse_id(raw, event_id.encode())


def tag_sse_id(raw: bytes, event_id: bytes) -> bytes:
    """`tag_sse` for an id known to be valid: the writer's hot path (once per event), whose ids
    are its session's, checked once (ids.event_id_prefix)."""
    if raw.startswith(b"data:") and raw.find(b"\r") < 0 and raw.find(b"\nid") < 0:
        return b"id: %s\n%s" % (event_id, raw)  # common: LF ends, no id line, no BOM
    body = _skip_bom(raw)
    head = raw[: len(raw) - len(body)] + b"id: " + event_id + _line_end(body)
    if body.startswith(b"id") or b"\nid" in body or b"\rid" in body:
        body = b"".join(ln for ln in body.splitlines(keepends=True) if not _is_id_line(ln))
    return head + body
