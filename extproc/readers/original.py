"""The original endpoint: a client that repeats its request with a relay id in `Last-Event-ID`
(Envoy's route table sends it here), and a detached generation's first client (the relay makes
the call and serves the client as the log's first reader).

Bytes here are exactly the logged ones, so what a client got before the id plus what it gets
here is the uninterrupted stream. A resume must repeat the request that created the session
(method, path, body), or it is refused (409). A session that did not end `done` is never passed
off as complete: the response is cut, which every HTTP client reports.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from aiohttp import web

from extproc.access.grants import Access
from extproc.detached.forwarding import pass_through_headers, stream_response_headers
from extproc.errors import RelayError
from extproc.readers.cursors import resume_cursor
from extproc.readers.http import (
    UPSTREAM_SERVER,
    access_of,
    body_chunks,
    client_target,
    cut,
    node_of,
    stream_headers,
)
from extproc.session.ids import LAST_EVENT_ID_HEADER
from extproc.session.log import Cursor, EndState
from extproc.session.request_key import RequestKeyBuilder
from extproc.vocabulary import Framing, ReaderProtocol


async def stream_cursor(
    request: web.Request,
    cursor: Cursor,
    access: Access,
    *,
    identity_counted: bool = False,
    upstream_headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """The logged bytes, history then live, as the upstream sent them. The first client of a
    detached generation also gets the upstream's response headers (`upstream_headers`); a
    resume is the relay's answer and carries the relay's."""
    log = cursor.log
    event_stream = log.framing is Framing.SSE  # the response is what the upstream spoke
    readers = node_of(request).readers
    with readers.attach(
        cursor, ReaderProtocol.HTTP, access, identity_counted=identity_counted
    ) as reader:
        headers: Mapping[str, str] = stream_headers(log, log.content_type)
        if upstream_headers is not None:
            headers = stream_response_headers(upstream_headers.items(), headers)
        response = web.StreamResponse(headers=headers)
        if upstream_headers is not None:
            response[UPSTREAM_SERVER] = upstream_headers.get("Server")
        await response.prepare(request)
        try:
            async for _, batch in reader.batches():
                await response.write(b"".join(batch))  # drains: the reader sets the pace
        except RelayError as exc:  # gone, or no longer readable (a revoked share token)
            await cut(request, response, exc.message, event_stream=event_stream)
            return response
    if log.state is not EndState.DONE:
        why = f"session {log.state}: {log.reason or 'no reason'}"
        await cut(request, response, why, event_stream=event_stream)
        return response
    await response.write_eof()
    return response


async def resume(request: web.Request) -> web.StreamResponse:
    """A repeated request that carries a relay id in `Last-Event-ID`: answered from the log,
    if it is the request that created the session."""
    node = node_of(request)
    access = access_of(request)
    key = RequestKeyBuilder(request.method, client_target(request))
    async for chunk in body_chunks(request, node.generations.settings.max_request_bytes):
        key.feed(chunk)
    text = request.headers.get(LAST_EVENT_ID_HEADER, "")
    cursor = await resume_cursor(
        node.store, node.metrics, text, access, protocol=ReaderProtocol.HTTP, request=key.finish()
    )
    return await stream_cursor(request, cursor, access)


async def detach(request: web.Request) -> web.StreamResponse:
    """A generation request on a detached route: call upstream, log it, serve it as a reader.

    The caller's session quota and reader slot are taken before the upstream is called, so a
    refused request never reaches the LLM."""
    node = node_of(request)
    access = access_of(request)
    generations = node.generations
    with node.readers.identity_slot(access.identity):
        slot = node.quota.reserve(access.identity)
        try:
            key = RequestKeyBuilder(request.method, client_target(request))
            body = bytearray()
            async for chunk in body_chunks(request, generations.settings.max_request_bytes):
                key.feed(chunk)
                body += chunk
            upstream = await generations.open(
                request.method, key.target, request.headers.copy(), bytes(body)
            )
            session = generations.start(
                upstream, owner=access.identity, slot=slot, request_key=str(key.finish())
            )
        except BaseException:
            slot.release()
            raise
        if session is None:
            try:
                return await _pass_through(request, upstream)
            finally:
                slot.release()
        return await stream_cursor(
            request,
            Cursor(session, 0),
            access,
            identity_counted=True,
            upstream_headers=upstream.headers,
        )


async def _pass_through(
    request: web.Request, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    """Not a stream the relay logs (JSON, an error, binary, a compressed stream): status,
    headers (`Content-Length` too: the bytes are unchanged) and bytes as the upstream sent."""
    headers = pass_through_headers(upstream.headers.items())
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    response[UPSTREAM_SERVER] = upstream.headers.get("Server")
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
    finally:
        upstream.close()
    return response
