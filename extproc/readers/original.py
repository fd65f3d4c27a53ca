"""The HTTP/SSE front: every way a client reads a session's log over plain HTTP.

- resume on the original endpoint (Envoy re-routes requests carrying `Last-Event-ID`),
- the first client of a detached generation (it is just the first reader),
- `GET /relay/v1/sessions/{id}/events`, EventSource-compatible, ending with `relay.end`,
- `GET`/`DELETE /relay/v1/sessions/{id}`: state, and cancel.

Bytes on the original endpoint are exactly the logged ones, so what a client got before the
id plus what it gets here is the uninterrupted stream. A session that did not end `done` is
never passed off as complete there: the response is cut, which every HTTP client reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
from aiohttp import web

from extproc.access.grants import DEFAULT_SHARE_TTL_S, SHARE_HEADER, SHARE_QUERY, Access, mint_share
from extproc.detached.generations import HOP_BY_HOP, Generations, owner_of
from extproc.errors import (
    MalformedEventId,
    RelayError,
    SessionConflict,
    SessionGone,
    SessionNotFound,
    StoreUnavailable,
)
from extproc.inline.processor import LAST_EVENT_ID_HEADER, SESSION_HEADER
from extproc.readers.cursors import open_cursor, resume_cursor
from extproc.session.ids import EventId, format_event_id, is_session_id
from extproc.session.log import Cursor, EndState, SessionLog, WritePath
from extproc.store import SessionStore

STORE_KEY = web.AppKey("store", SessionStore)
GENERATIONS_KEY = web.AppKey("generations", Generations)
# aiohttp frames the body itself, so the upstream's length goes with the hop-by-hop headers.
_NOT_RELAYED = HOP_BY_HOP | {"content-length"}
CANCEL_WAIT_S = 5.0  # a cancel sent to another node: how long DELETE waits for its end


def error_response(error: RelayError) -> web.Response:
    """The one mapping from the error tree to HTTP for this front."""
    return web.Response(
        status=error.http_status, body=error.json_body(), content_type="application/json"
    )


def access_of(request: web.Request) -> Access:
    """Envoy's identity for this request, and a share token if one is presented."""
    token = request.headers.get(SHARE_HEADER) or request.query.get(SHARE_QUERY)
    return Access.of(owner_of(request), token)


def session_from_path(request: web.Request) -> str:
    session_id = request.match_info["session"]
    if not is_session_id(session_id):
        raise MalformedEventId("session ids are 22 URL-safe characters")
    return session_id


async def reader_cursor(request: web.Request, session_id: str, *, protocol: str = "sse") -> Cursor:
    """Where a reader starts: `Last-Event-ID` (an EventSource reconnecting), else `?after=`."""
    store = request.app[STORE_KEY]
    access = access_of(request)
    text = request.headers.get(LAST_EVENT_ID_HEADER) or request.query.get("after")
    if text:
        return await resume_cursor(store, text, access, protocol=protocol, session_id=session_id)
    return await open_cursor(store, EventId(session_id, 0), access)  # a new reader


def _stream_headers(log: SessionLog, content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        SESSION_HEADER: log.session_id,
    }


async def stream_cursor(request: web.Request, cursor: Cursor) -> web.StreamResponse:
    """Original-endpoint semantics: the logged bytes, history then live, as the upstream sent."""
    log = cursor.log
    metrics = request.app[STORE_KEY].metrics
    identity = access_of(request).identity
    with request.app[GENERATIONS_KEY].reading(cursor, protocol="http", identity=identity):
        response = web.StreamResponse(headers=_stream_headers(log, log.content_type))
        await response.prepare(request)
        try:
            async for batch in cursor.batches():
                await response.write(b"".join(batch))  # drains: the reader sets the pace
                metrics.reader_wrote("http", len(batch), log.last_seq - cursor.seq)
        except SessionGone as exc:
            await _cut(request, response, f"session gone: {exc.message}")
            return response
    if log.state is not EndState.DONE:
        await _cut(request, response, f"session {log.state.value}: {log.reason or 'no reason'}")
        return response
    await response.write_eof()
    return response


async def _cut(request: web.Request, response: web.StreamResponse, why: str) -> None:
    # An SSE comment tells a human why; closing without the final chunk tells the client.
    if (response.content_type or "").startswith("text/event-stream"):
        await response.write(f": relay: {why}\n\n".encode())
    if request.transport is not None:
        request.transport.close()


async def resume(request: web.Request) -> web.StreamResponse:
    """A repeated request that carries `Last-Event-ID`: answered from the log."""
    try:
        text = request.headers.get(LAST_EVENT_ID_HEADER, "")
        cursor = await resume_cursor(
            request.app[STORE_KEY], text, access_of(request), protocol="http"
        )
        return await stream_cursor(request, cursor)
    except RelayError as error:
        return error_response(error)


async def detach(request: web.Request) -> web.StreamResponse:
    """A generation request on a detached route: call upstream, log it, serve it as a reader."""
    generations = request.app[GENERATIONS_KEY]
    try:
        owner = owner_of(request)
        upstream = await generations.open(request, request.match_info["tail"], owner=owner)
    except RelayError as error:
        return error_response(error)
    session = generations.start(upstream, owner=owner)
    if session is None:
        return await _pass_through(request, upstream)
    try:
        return await stream_cursor(request, Cursor(session, 0))
    except RelayError as error:  # e.g. the reader limit, if the limit is 0 readers
        return error_response(error)


async def _pass_through(
    request: web.Request, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Not an event stream (JSON, an error, binary): relay status, headers and bytes as-is."""
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_RELAYED}
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    finally:
        upstream.close()
    return response


def _sse_event(log: SessionLog, seq: int, raw: bytes) -> bytes:
    """An event as the reader endpoint sends it: SSE sessions as logged; NDJSON lines wrapped."""
    if log.content_type.startswith("text/event-stream"):
        return raw
    data = raw.rstrip(b"\r\n").replace(b"\r", b"")
    return b"id: %s:%d\ndata: %s\n\n" % (log.session_id.encode(), seq, data)


def end_event(log: SessionLog) -> bytes:
    """The last thing a reader sees: how the session ended. Its id is one past the last event,
    so a reader cut before it hears the end again on reconnect, and one that got it is answered
    204 (which stops an EventSource) instead of a reconnect loop."""
    payload = json.dumps({"state": log.state.value, "reason": log.reason, "last_seq": log.last_seq})
    end_id = format_event_id(log.session_id, log.last_seq + 1)
    return f"id: {end_id}\nevent: relay.end\ndata: {payload}\n\n".encode()


async def events(request: web.Request) -> web.StreamResponse:
    """GET /relay/v1/sessions/{id}/events — SSE for EventSource and any SSE client."""
    try:
        cursor = await reader_cursor(request, session_from_path(request))
        log = cursor.log
        if log.state is not EndState.OPEN and cursor.seq > log.last_seq:
            return web.Response(status=204)  # it saw relay.end: tells EventSource to stop
        metrics = request.app[STORE_KEY].metrics
        identity = access_of(request).identity
        with request.app[GENERATIONS_KEY].reading(cursor, protocol="sse", identity=identity):
            response = web.StreamResponse(headers=_stream_headers(log, "text/event-stream"))
            await response.prepare(request)
            try:
                async for batch in cursor.batches():
                    first = cursor.seq - len(batch) + 1
                    out = b"".join(_sse_event(log, first + i, raw) for i, raw in enumerate(batch))
                    await response.write(out)
                    metrics.reader_wrote("sse", len(batch), log.last_seq - cursor.seq)
            except SessionGone as exc:
                await _cut(request, response, f"session gone: {exc.message}")
                return response
            await response.write(end_event(log))
            await response.write_eof()
            return response
    except RelayError as error:
        return error_response(error)


async def session_json(
    log: SessionLog, generations: Generations, store: SessionStore
) -> dict[str, object]:
    """A session's state; `readers` counts every node's (others' as of their last beat)."""
    try:
        elsewhere = await store.remote_readers(log.session_id)
    except StoreUnavailable:
        elsewhere = 0  # this node's own count is still worth answering with
    return {
        "session": log.session_id,
        "state": log.state.value,
        "reason": log.reason,
        "last_seq": log.last_seq,
        "write_path": log.write_path.value,
        "content_type": log.content_type,
        "readers": generations.readers(log.session_id) + elsewhere,
    }


async def session_info(request: web.Request) -> web.Response:
    try:
        access = access_of(request)
        log = await request.app[STORE_KEY].lookup(session_from_path(request), access=access)
    except RelayError as error:
        return error_response(error)
    info = await session_json(log, request.app[GENERATIONS_KEY], request.app[STORE_KEY])
    return web.json_response(info)


async def cancel(request: web.Request) -> web.Response:
    """DELETE /relay/v1/sessions/{id}: stop a detached generation now, on whichever node
    runs it. 200 with the ended session, or 202 if its node has not confirmed in time."""
    generations = request.app[GENERATIONS_KEY]
    store = request.app[STORE_KEY]
    try:
        access = access_of(request).for_owner()
        log = await store.lookup(session_from_path(request), access=access)
        if log.state is not EndState.OPEN:
            raise SessionConflict(f"session already ended {log.state.value}")
        if log.write_path is not WritePath.DETACHED:
            raise SessionConflict("an inline session ends with its client's connection")
        cancelled = generations.cancel(log.session_id, "cancelled by owner")
        if not cancelled and not await store.request_cancel(log.session_id):
            raise SessionConflict("no relay node runs this generation")
    except RelayError as error:
        return error_response(error)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CANCEL_WAIT_S):
            while log.state is EndState.OPEN:  # the generation task records the end promptly
                await log.wait_beyond(log.last_seq)
    status = 202 if log.state is EndState.OPEN else 200
    return web.json_response(await session_json(log, generations, store), status=status)


async def share(request: web.Request) -> web.Response:
    """POST /relay/v1/sessions/{id}/share[?ttl=<seconds>]: the owner mints a read-only token
    for this one session (201); readers present it as `x-relay-share` or `?share=`."""
    store = request.app[STORE_KEY]
    try:
        session_id = session_from_path(request)
        await store.lookup(session_id, access=access_of(request).for_owner())
        try:
            ttl_s = float(request.query.get("ttl", DEFAULT_SHARE_TTL_S))
        except ValueError:
            raise MalformedEventId("ttl must be a number of seconds") from None
        new = mint_share(ttl_s)
        await store.add_share(session_id, new.token_id, new.record)
    except RelayError as error:
        return error_response(error)
    body = {
        "token": new.token,
        "token_id": new.token_id,
        "expires_at": new.record.expires_at,
        "events_url": f"/relay/v1/sessions/{session_id}/events?{SHARE_QUERY}={new.token}",
    }
    return web.json_response(body, status=201)


async def revoke_share(request: web.Request) -> web.Response:
    """DELETE /relay/v1/sessions/{id}/share/{token_id}: the owner revokes a token (204)."""
    store = request.app[STORE_KEY]
    try:
        session_id = session_from_path(request)
        await store.lookup(session_id, access=access_of(request).for_owner())
        if not await store.revoke_share(session_id, request.match_info["token_id"]):
            raise SessionNotFound("no such share token")
    except RelayError as error:
        return error_response(error)
    return web.Response(status=204)
