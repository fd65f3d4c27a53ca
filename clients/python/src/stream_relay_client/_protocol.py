"""Sans-IO core: event framing, the resume state machine, SSE parsing and backoff.

Nothing here touches a socket, so the sync and async drivers (and the tests) share it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import httpx

SESSION_HEADER = "x-relay-session"
LAST_EVENT_ID_HEADER = "Last-Event-ID"

# A blank line: two line terminators in a row. CRLF is one terminator, so a CR is one only
# when no LF follows it.
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One dispatched server-sent event. `id` is the last event id seen (it persists across
    events, as in an EventSource); `retry` is the `retry:` field of this event, if any."""

    id: str
    event: str
    data: str
    retry: int | None = None


def _fields(block: bytes) -> list[tuple[str, str]]:
    fields = []
    for line in _LINE_BREAK.split(block.decode("utf-8", "replace")):
        if not line or line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        fields.append((name, value.removeprefix(" ") if colon else ""))
    return fields


class ResumeState:
    """Fed the bytes of an event stream, connection after connection; tells what is safe to
    emit (whole events only) and the id to resume from.

    `feed` returns the complete blocks (an event and its terminating blank line, byte for
    byte) and keeps a partial trailing event. `reconnect` drops that partial event, since the
    resume replays it whole, and returns the `Last-Event-ID` to send. `finish`, at a clean end
    of the stream, returns the remaining whole blocks and any partial tail.
    """

    def __init__(self, session: str | None, last_event_id: str | None = None) -> None:
        self.session = session
        self.last_event_id = last_event_id or (f"{session}:0" if session else None)
        self.retry_ms: int | None = None
        self.blocks_seen = 0
        self._buffer = b""
        self._scan_from = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        return self._split(final=False)

    def finish(self) -> tuple[list[bytes], bytes]:
        blocks = self._split(final=True)
        tail, self._buffer, self._scan_from = self._buffer, b"", 0
        return blocks, tail

    def reconnect(self) -> str:
        """Drop the partial event of the broken connection; the id to resume after."""
        if self.last_event_id is None:
            raise RuntimeError("no session and no event id: this stream cannot be resumed")
        self._buffer, self._scan_from = b"", 0
        return self.last_event_id

    def _split(self, *, final: bool) -> list[bytes]:
        blocks = []
        start = 0
        buffer = self._buffer
        for match in _BLANK_LINE.finditer(buffer, self._scan_from):
            end = match.end()
            if end == len(buffer) and buffer.endswith(b"\r") and not final:
                break  # a CR at the very end may be the first half of a CRLF
            blocks.append(buffer[start:end])
            start = end
        self._buffer = buffer[start:]
        self._scan_from = max(0, len(self._buffer) - 3)  # a blank line is at most 4 bytes
        for block in blocks:
            self._observe(block)
        return blocks

    def _observe(self, block: bytes) -> None:
        self.blocks_seen += 1
        for name, value in _fields(block):
            if name == "id" and value and "\0" not in value:
                self.last_event_id = value
            elif name == "retry" and value.isascii() and value.isdigit():
                self.retry_ms = int(value)


class EventDecoder:
    """Whole blocks in, events out, as an EventSource dispatches them (no data, no event)."""

    def __init__(self) -> None:
        self.last_id = ""

    def decode(self, block: bytes) -> Event | None:
        name, data, retry = "", list[str](), None
        for field, value in _fields(block):
            if field == "id" and "\0" not in value:
                self.last_id = value
            elif field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "retry" and value.isascii() and value.isdigit():
                retry = int(value)
        if not data:
            return None
        return Event(self.last_id, name or "message", "\n".join(data), retry)


@dataclass(frozen=True)
class RetryPolicy:
    """Reconnects per stream, and exponential backoff with full jitter between them; an SSE
    `retry:` field (milliseconds) is honoured as the minimum delay."""

    max_reconnects: int = 8
    base: float = 0.1
    cap: float = 5.0

    def delay(self, attempt: int, retry_ms: int | None, rng: random.Random) -> float:
        """Seconds to wait before reconnect number `attempt` (0-based)."""
        delay = rng.uniform(0.0, min(self.cap, self.base * 2.0 ** min(attempt, 62)))
        if retry_ms is not None:
            delay = max(delay, retry_ms / 1000)
        return delay


# A connection that broke mid-body, or a reconnect that did not get through.
RESUMABLE_ERRORS: tuple[type[Exception], ...] = (
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.TimeoutException,
)
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def is_resumable(response: httpx.Response) -> bool:
    """A relay event stream: a 200 `text/event-stream` with a session, not content-encoded
    (the transport sees raw bytes, so it can only frame an identity-encoded body)."""
    return (
        response.status_code == 200
        and SESSION_HEADER in response.headers
        and response.headers.get("content-type", "").startswith("text/event-stream")
        and response.headers.get("content-encoding", "identity") == "identity"
    )


def resume_request(request: httpx.Request, last_event_id: str) -> httpx.Request:
    """The same request again (method, url, headers, body), resuming after `last_event_id`."""
    headers = request.headers.copy()
    headers[LAST_EVENT_ID_HEADER] = last_event_id
    return httpx.Request(
        request.method,
        request.url,
        headers=headers,
        content=request.content,
        extensions=request.extensions,
    )
