"""The session API under /relay/v1/sessions/{id}: its state, cancelling it, and the share
tokens that let someone else read it.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from extproc.access.grants import DEFAULT_SHARE_TTL_S, SHARE_QUERY, mint_share
from extproc.errors import InvalidArgument, SessionConflict, SessionNotFound, StoreUnavailable
from extproc.readers.http import Node, access_of, node_of, session_from_path
from extproc.session.log import EndState, SessionLog, WritePath

CANCEL_WAIT_S = 5.0  # a cancel sent to another node: how long DELETE waits for its end


async def session_json(log: SessionLog, node: Node) -> dict[str, object]:
    """A session's state; `readers` counts every node's (others' as of their last beat)."""
    try:
        elsewhere = await node.store.remote_readers(log.session_id)
    except StoreUnavailable:
        elsewhere = 0  # this node's own count is still worth answering with
    return {
        "session": log.session_id,
        "state": log.state.value,
        "reason": log.reason,
        "last_seq": log.last_seq,
        "write_path": log.write_path.value,
        "content_type": log.content_type,
        "readers": node.readers.readers(log.session_id) + elsewhere,
    }


async def session_info(request: web.Request) -> web.Response:
    node = node_of(request)
    access = access_of(request)  # who asks, before what they ask about
    log = await node.store.lookup(session_from_path(request), access=access)
    return web.json_response(await session_json(log, node))


async def cancel(request: web.Request) -> web.Response:
    """DELETE /relay/v1/sessions/{id}: stop a detached generation now, on whichever node
    runs it. 200 with the ended session, or 202 if its node has not confirmed in time."""
    node = node_of(request)
    access = access_of(request).for_owner()
    log = await node.store.lookup(session_from_path(request), access=access)
    if log.state is not EndState.OPEN:
        raise SessionConflict(f"session already ended {log.state.value}")
    if log.write_path is not WritePath.DETACHED:
        raise SessionConflict("an inline session ends with its client's connection")
    cancelled = node.generations.cancel(log.session_id, "cancelled by owner")
    if not cancelled and not await node.store.request_cancel(log.session_id):
        raise SessionConflict("no relay node runs this generation")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CANCEL_WAIT_S):
            while log.state is EndState.OPEN:  # the generation task records the end promptly
                await log.wait_beyond(log.last_seq)
    status = 202 if log.state is EndState.OPEN else 200
    return web.json_response(await session_json(log, node), status=status)


async def share(request: web.Request) -> web.Response:
    """POST /relay/v1/sessions/{id}/share[?ttl=<seconds>]: the owner mints a read-only token
    for this one session (201); readers present it as `x-relay-share` or `?share=`."""
    node = node_of(request)
    access = access_of(request).for_owner()
    session_id = session_from_path(request)
    await node.store.lookup(session_id, access=access)
    try:
        ttl_s = float(request.query.get("ttl", DEFAULT_SHARE_TTL_S))
    except ValueError:
        raise InvalidArgument("ttl must be a number of seconds") from None
    new = mint_share(ttl_s)
    await node.store.add_share(session_id, new.token_id, new.record)
    body = {
        "token": new.token,
        "token_id": new.token_id,
        "expires_at": new.record.expires_at,
        "events_url": f"/relay/v1/sessions/{session_id}/events?{SHARE_QUERY}={new.token}",
    }
    return web.json_response(body, status=201)


async def revoke_share(request: web.Request) -> web.Response:
    """DELETE /relay/v1/sessions/{id}/share/{token_id}: the owner revokes a token (204); the
    readers attached with it here are cut at once, those on other nodes within a second."""
    node = node_of(request)
    access = access_of(request).for_owner()
    session_id = session_from_path(request)
    await node.store.lookup(session_id, access=access)
    token_id = request.match_info["token_id"]
    if not await node.store.revoke_share(session_id, token_id):
        raise SessionNotFound("no such share token")
    node.readers.revoke(session_id, token_id)
    return web.Response(status=204)
