"""Where a reader starts on a log, and what an event looks like to field-based readers.

Shared by every front (HTTP/SSE, WebSocket, gRPC), so an id received over one resumes over
any other and every front counts resume outcomes the same way.
"""

from __future__ import annotations

from extproc.access.grants import Access
from extproc.errors import (
    AccessDenied,
    MalformedEventId,
    SessionConflict,
    SessionGone,
    SessionNotFound,
)
from extproc.node.metrics import RelayMetrics
from extproc.session.framing import sse_data, sse_event_name
from extproc.session.ids import EventId, parse_event_id
from extproc.session.log import Cursor, EndState, SessionLog
from extproc.session.request_key import RequestKey
from extproc.store.base import SessionStore
from extproc.vocabulary import Framing, ReaderProtocol, ResumeOutcome


async def open_cursor(store: SessionStore, event_id: EventId, access: Access) -> Cursor:
    """A cursor after `event_id`; the id must be one this session has already sent.

    An ended session has one more id, `last_seq + 1`: that of the `relay.end` marker, after
    which nothing is left."""
    log = await store.lookup(event_id.session, at_least=event_id.seq, access=access)
    ended = log.state is not EndState.OPEN and not log.gone_reason
    if event_id.seq > log.last_seq and not (ended and event_id.seq == log.last_seq + 1):
        if log.state is EndState.OPEN and not log.gone_reason:
            raise MalformedEventId(f"event {event_id} has not been sent yet")
        raise SessionGone(f"session {event_id.session} has no event {event_id.seq}")
    return Cursor(log, event_id.seq)


_OUTCOMES: tuple[tuple[type[Exception], ResumeOutcome], ...] = (
    (MalformedEventId, ResumeOutcome.MALFORMED),
    (AccessDenied, ResumeOutcome.FORBIDDEN),  # before its base class: the same 404 to clients
    (SessionNotFound, ResumeOutcome.UNKNOWN),
    (SessionGone, ResumeOutcome.EXPIRED),
    (SessionConflict, ResumeOutcome.CONFLICT),
)


def check_same_request(log: SessionLog, request: RequestKey) -> None:
    """A resume on the original endpoint must repeat the request that created the session;
    otherwise it would be answered with another question's answer. A session whose request
    is not known (not a generation route) is not checked."""
    created = RequestKey.parse(log.request_key)
    difference = None if created is None else created.difference(request)
    if difference is not None:
        raise SessionConflict(
            f"this Last-Event-ID belongs to session {log.session_id}, created by another "
            f"request (this one has {difference}); a resume must repeat the request that "
            "created the session"
        )


async def resume_cursor(
    store: SessionStore,
    metrics: RelayMetrics,
    text: str,
    access: Access,
    *,
    protocol: ReaderProtocol,
    session_id: str | None = None,
    request: RequestKey | None = None,
) -> Cursor:
    """A cursor for a client that came back with an event id; counts the outcome.

    `session_id`, when the path already names the session, must match the id's session;
    `request`, a repeated request on the original endpoint, must be the one that created it.
    """
    try:
        event_id = parse_event_id(text)
        if session_id is not None and event_id.session != session_id:
            raise MalformedEventId("the event id belongs to another session")
        cursor = await open_cursor(store, event_id, access)
        if request is not None:
            check_same_request(cursor.log, request)
    except (MalformedEventId, SessionNotFound, SessionGone, SessionConflict) as error:
        outcome = next(o for kind, o in _OUTCOMES if isinstance(error, kind))
        metrics.resumed(outcome, protocol)
        raise
    metrics.resumed(ResumeOutcome.HIT, protocol)
    return cursor


def event_fields(log: SessionLog, raw: bytes) -> tuple[str | None, str]:
    """A logged event for readers that get fields, not bytes: (SSE event name, data as the
    WHATWG parser builds it). An NDJSON line has no name; its data is the line, no line end."""
    if log.framing is Framing.SSE:
        return sse_event_name(raw), (sse_data(raw) or b"").decode("utf-8", "replace")
    return None, raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", "replace")
