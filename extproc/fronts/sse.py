"""The SSE front: serves a session's events from the log over HTTP, history then live.

Used for resumes on the original endpoint (Envoy re-routes a request carrying
`Last-Event-ID` here). Event bytes are written exactly as logged, so a client that joins the
bytes it got before the id with these gets the uninterrupted stream. A session that did not
end `done` is never passed off as complete: the response is cut (no final chunk), which
every HTTP client reports as an incomplete body.
"""

from __future__ import annotations

from aiohttp import web

from extproc.errors import MalformedEventId, RelayError, SessionGone
from extproc.ids import EventId, parse_event_id
from extproc.log import Cursor, EndState, SessionLog
from extproc.processor import LAST_EVENT_ID_HEADER, SESSION_HEADER
from extproc.store import MemoryStore

STORE_KEY = web.AppKey("store", MemoryStore)


def error_response(error: RelayError) -> web.Response:
    """The one mapping from the error tree to HTTP for this front."""
    return web.Response(
        status=error.http_status,
        body=error.json_body(),
        content_type="application/json",
    )


def open_cursor(store: MemoryStore, event_id: EventId) -> Cursor:
    log = store.get(event_id.session)
    if event_id.seq > log.last_seq:
        if log.state is EndState.OPEN:
            raise MalformedEventId(f"event {event_id} has not been sent yet")
        raise SessionGone(f"session {event_id.session} has no event {event_id.seq}")
    return Cursor(log, event_id.seq)


async def stream_cursor(request: web.Request, cursor: Cursor) -> web.StreamResponse:
    """Write every event after the cursor, then follow the live tail until the log ends."""
    log: SessionLog = cursor.log
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": log.content_type,
            "Cache-Control": "no-cache",
            SESSION_HEADER: log.session_id,
        },
    )
    await response.prepare(request)
    try:
        async for batch in cursor.batches():
            await response.write(b"".join(batch))  # drains: the socket's pace is the reader's
    except SessionGone as exc:
        await _cut(request, response, f"session gone: {exc.message}")
        return response
    if log.state is not EndState.DONE:
        await _cut(request, response, f"session {log.state.value}: {log.reason or 'no reason'}")
        return response
    await response.write_eof()
    return response


async def _cut(request: web.Request, response: web.StreamResponse, why: str) -> None:
    # An SSE comment says why for humans; closing without the final chunk tells clients.
    if log_is_sse(response):
        await response.write(f": relay: {why}\n\n".encode())
    if request.transport is not None:
        request.transport.close()


def log_is_sse(response: web.StreamResponse) -> bool:
    return (response.content_type or "").startswith("text/event-stream")


async def resume(request: web.Request) -> web.StreamResponse:
    """Answer a repeated request that carries `Last-Event-ID` from the log."""
    store: MemoryStore = request.app[STORE_KEY]
    try:
        event_id = parse_event_id(request.headers.get(LAST_EVENT_ID_HEADER, ""))
        cursor = open_cursor(store, event_id)
    except RelayError as error:
        return error_response(error)
    return await stream_cursor(request, cursor)
