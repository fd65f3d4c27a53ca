"""What every HTTP front of the relay shares: the node's parts (one app key), the one mapping
from the error tree to HTTP (a middleware), and reading a request's identity, session id and
starting point. The original endpoint, SSE, WebSocket and the session API build on this and
not on each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from extproc.access.grants import SHARE_HEADER, SHARE_QUERY, Access
from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER, owner_key
from extproc.access.quota import SessionQuota
from extproc.detached.generations import Generations
from extproc.errors import InvalidArgument, LimitExceeded, RelayError
from extproc.node.metrics import RelayMetrics
from extproc.readers.cursors import open_cursor, resume_cursor
from extproc.readers.registry import ReaderRegistry
from extproc.session.ids import LAST_EVENT_ID_HEADER, SESSION_HEADER, EventId, is_session_id
from extproc.session.log import Cursor, SessionLog
from extproc.store.base import SessionStore
from extproc.vocabulary import ReaderProtocol

AFTER_QUERY = "after"  # ?after=<event id>, for readers that cannot set Last-Event-ID


@dataclass(frozen=True)
class Node:
    """The parts of the relay node the HTTP fronts use, passed in by the node."""

    store: SessionStore
    readers: ReaderRegistry
    generations: Generations
    quota: SessionQuota
    metrics: RelayMetrics


NODE = web.AppKey("node", Node)
# On a response that carries the LLM's own headers: its `Server` header, if it sent one.
UPSTREAM_SERVER = "relay.upstream_server"


async def no_server_of_our_own(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp names itself in `Server` on every answer that has none; Envoy passes `Server`
    through as it came (the LLM's own must reach its clients), so the relay's own answers, and
    an LLM answer that had none, carry none (no software and version disclosed)."""
    if response.get(UPSTREAM_SERVER) is None:
        response.headers.popall("Server", None)


def node_of(request: web.Request) -> Node:
    return request.app[NODE]


def error_response(error: RelayError) -> web.Response:
    return web.Response(
        status=error.http_status, body=error.json_body(), content_type="application/json"
    )


@web.middleware
async def relay_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The one mapping from the error tree to HTTP, for errors raised before a response has
    started (after that, a front ends its stream in its own protocol's way)."""
    try:
        return await handler(request)
    except RelayError as error:
        return error_response(error)


def owner_of(request: web.Request) -> str:
    """The owner key of the caller Envoy authenticated ("" when auth is off)."""
    return owner_key(request.headers.get(IDENTITY_HEADER), request.headers.get(JWT_PAYLOAD_HEADER))


def access_of(request: web.Request) -> Access:
    """Envoy's identity for this request, and a share token if one is presented."""
    token = request.headers.get(SHARE_HEADER) or request.query.get(SHARE_QUERY)
    return Access.of(owner_of(request), token)


def session_from_path(request: web.Request) -> str:
    session_id = request.match_info["session"]
    if not is_session_id(session_id):
        raise InvalidArgument("session ids are 22 URL-safe characters")
    return session_id


async def reader_cursor(
    request: web.Request, session_id: str, access: Access, protocol: ReaderProtocol
) -> Cursor:
    """Where a reader starts: `Last-Event-ID` (an EventSource reconnecting), else `?after=`,
    else the session's first event."""
    node = node_of(request)
    text = request.headers.get(LAST_EVENT_ID_HEADER) or request.query.get(AFTER_QUERY)
    if text:
        return await resume_cursor(
            node.store, node.metrics, text, access, protocol=protocol, session_id=session_id
        )
    return await open_cursor(node.store, EventId(session_id, 0), access)


def client_target(request: web.Request) -> str:
    """The client's path and query exactly as sent, on a route Envoy re-routed here with a
    prefix (/v1/x?q arrives as /_relay/<kind>/v1/x?q)."""
    return "/" + request.raw_path.split("/", 3)[3]


async def body_chunks(request: web.Request, max_bytes: int) -> AsyncIterator[bytes]:
    """The request body as it arrives, at most `max_bytes` of it (then LimitExceeded)."""
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise LimitExceeded(f"request body larger than {max_bytes} bytes")
        yield chunk


def stream_headers(log: SessionLog, content_type: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        SESSION_HEADER: log.session_id,
    }


async def cut(
    request: web.Request, response: web.StreamResponse, why: str, *, event_stream: bool
) -> None:
    """End a started response without its final chunk, which every HTTP client reports as
    an incomplete body; on an event stream (`event_stream`: what the response is, whatever
    the log's framing) an SSE comment first tells a human why."""
    if event_stream:
        await response.write(f": relay: {why}\n\n".encode())
    if request.transport is not None:
        request.transport.close()
