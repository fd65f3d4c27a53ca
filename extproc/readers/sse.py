"""`GET /relay/v1/sessions/{id}/events`: a session as an event stream, for EventSource and any
SSE client. SSE sessions are sent as logged; NDJSON lines are wrapped as SSE events. The
stream ends with a `relay.end` event that says how the session ended.
"""

from __future__ import annotations

import json

from aiohttp import web

from extproc.errors import RelayError
from extproc.readers.http import (
    access_of,
    cut,
    node_of,
    reader_cursor,
    session_from_path,
    stream_headers,
)
from extproc.session.ids import format_event_id
from extproc.session.log import EndState, SessionLog
from extproc.vocabulary import Framing, ReaderProtocol

END_EVENT = "relay.end"


def sse_event(log: SessionLog, seq: int, raw: bytes) -> bytes:
    """An event as this endpoint sends it: SSE sessions as logged; NDJSON lines wrapped."""
    if log.framing is Framing.SSE:
        return raw
    data = raw.rstrip(b"\r\n").replace(b"\r", b"")
    return b"id: %s\ndata: %s\n\n" % (format_event_id(log.session_id, seq).encode(), data)


def end_event(log: SessionLog) -> bytes:
    """The last thing a reader sees: how the session ended. Its id is one past the last event,
    so a reader cut before it hears the end again on reconnect, and one that got it is answered
    204 (which stops an EventSource) instead of a reconnect loop."""
    payload = json.dumps({"state": log.state.value, "reason": log.reason, "last_seq": log.last_seq})
    end_id = format_event_id(log.session_id, log.last_seq + 1)
    return f"id: {end_id}\nevent: {END_EVENT}\ndata: {payload}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """GET /relay/v1/sessions/{id}/events[?after=<event id>] (Last-Event-ID wins)."""
    access = access_of(request)
    cursor = await reader_cursor(request, session_from_path(request), access, ReaderProtocol.SSE)
    log = cursor.log
    if log.state is not EndState.OPEN and cursor.seq > log.last_seq:
        return web.Response(status=204)  # it saw relay.end: tells EventSource to stop
    with node_of(request).readers.attach(cursor, ReaderProtocol.SSE, access) as reader:
        response = web.StreamResponse(headers=stream_headers(log, "text/event-stream"))
        await response.prepare(request)
        try:
            async for first, batch in reader.batches():
                await response.write(
                    b"".join(sse_event(log, first + i, raw) for i, raw in enumerate(batch))
                )
        except RelayError as exc:  # gone, or no longer readable (a revoked share token)
            await cut(request, response, exc.message, event_stream=True)
            return response
        await response.write(end_event(log))
        await response.write_eof()
        return response
