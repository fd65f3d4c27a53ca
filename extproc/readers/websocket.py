"""The WebSocket front: `GET /relay/v1/sessions/{id}/ws`, one JSON text message per event.

aiohttp's send drain is the reader's only buffer. Errors found before the upgrade are the
HTTP JSON errors (the middleware); after it the stream ends with `{"type": "end"}` and close
1000, or `{"type": "error"}` and close 1011 if the log is lost or no longer readable (a
revoked share token). A client that leaves stops the reader at once.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import WSCloseCode, web

from extproc.errors import RelayError
from extproc.readers.cursors import event_fields
from extproc.readers.http import access_of, node_of, reader_cursor, session_from_path
from extproc.readers.registry import Reader
from extproc.session.ids import format_event_id
from extproc.session.log import SessionLog
from extproc.vocabulary import ReaderProtocol

HEARTBEAT_S = 20.0  # ping period; a peer that misses the pong (half a period) is dropped
MAX_CLIENT_MESSAGE_BYTES = 4096  # clients have nothing to say; a bigger message closes (1009)


def _event_message(log: SessionLog, seq: int, raw: bytes) -> str:
    name, data = event_fields(log, raw)
    event_id = format_event_id(log.session_id, seq)
    message = {"type": "event", "id": event_id, "seq": seq, "event": name, "data": data}
    return json.dumps(message, separators=(",", ":"))


async def _send_log(ws: web.WebSocketResponse, reader: Reader) -> WSCloseCode:
    """Every event after the cursor, then how the session ended; returns the close code."""
    log = reader.cursor.log
    try:
        async for first, batch in reader.batches():
            for i, raw in enumerate(batch):
                await ws.send_str(_event_message(log, first + i, raw))  # drains: reader's pace
    except RelayError as exc:  # gone, or no longer readable
        await ws.send_json({"type": "error", "code": exc.code, "message": exc.message})
        return WSCloseCode.INTERNAL_ERROR
    end = {"type": "end", "state": log.state.value, "reason": log.reason, "last_seq": log.last_seq}
    await ws.send_json(end)  # then close 1000
    return WSCloseCode.OK


async def _until_peer_leaves(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the client sends: that is how its close frame is answered and
    how a peer that stopped answering heartbeat pings is noticed."""
    async for _ in ws:
        pass


async def _serve(ws: web.WebSocketResponse, reader: Reader) -> None:
    """Send the log and watch the peer; whichever ends first stops the other."""
    sending = asyncio.create_task(_send_log(ws, reader))
    watching = asyncio.create_task(_until_peer_leaves(ws))
    try:
        await asyncio.wait((sending, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sending, watching):
            task.cancel()
        await asyncio.gather(sending, watching, return_exceptions=True)
    if sending.cancelled():
        return  # the peer left first: nothing to close politely
    error = sending.exception()
    if isinstance(error, ConnectionError):
        return  # the peer vanished mid-send
    if error is not None:
        raise error
    await ws.close(code=sending.result())


async def websocket(request: web.Request) -> web.StreamResponse:
    """GET /relay/v1/sessions/{id}/ws[?after=<event id>]."""
    access = access_of(request)
    cursor = await reader_cursor(request, session_from_path(request), access, ReaderProtocol.WS)
    with node_of(request).readers.attach(cursor, ReaderProtocol.WS, access) as reader:
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT_S, max_msg_size=MAX_CLIENT_MESSAGE_BYTES)
        await ws.prepare(request)
        await _serve(ws, reader)
        return ws
