"""The gRPC front: `relay.v1.Relay/Subscribe`, a server stream of one session's events.

gRPC flow control paces the reader (each yield waits for the write). `after` is an event id
from any front. A stream that reads to the end sends one `End`, then status OK; errors are
mapped here, once, to the error's gRPC code (unknown or gone: NOT_FOUND, malformed:
INVALID_ARGUMENT, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from extproc.access.grants import SHARE_HEADER, Access
from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER, owner_key
from extproc.errors import InvalidArgument, RelayError
from extproc.node.metrics import RelayMetrics
from extproc.proto.relay.v1 import relay_pb2, relay_pb2_grpc
from extproc.proto.relay.v1.relay_pb2 import End, Event, SubscribeRequest, SubscribeResponse
from extproc.readers.cursors import event_fields, open_cursor, resume_cursor
from extproc.readers.registry import ReaderRegistry
from extproc.session.ids import EventId, format_event_id, is_session_id
from extproc.session.log import Cursor, SessionLog
from extproc.store.base import SessionStore
from extproc.vocabulary import ReaderProtocol

SERVICE_NAME = relay_pb2.DESCRIPTOR.services_by_name["Relay"].full_name  # for reflection
_Context = grpc.aio.ServicerContext[SubscribeRequest, SubscribeResponse]


def _event(log: SessionLog, seq: int, raw: bytes) -> SubscribeResponse:
    name, data = event_fields(log, raw)
    event_id = format_event_id(log.session_id, seq)
    return SubscribeResponse(event=Event(id=event_id, seq=seq, event=name or "", data=data))


def _end(log: SessionLog) -> SubscribeResponse:
    return SubscribeResponse(
        end=End(state=log.state.value, reason=log.reason, last_seq=log.last_seq)
    )


def _access(context: _Context) -> Access:
    # Envoy's identity and a share token arrive as metadata (gRPC's headers).
    metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    owner = owner_key(metadata.get(IDENTITY_HEADER), metadata.get(JWT_PAYLOAD_HEADER))
    return Access.of(owner, metadata.get(SHARE_HEADER))


class RelayServicer(relay_pb2_grpc.RelayServicer):
    def __init__(self, store: SessionStore, readers: ReaderRegistry, metrics: RelayMetrics) -> None:
        self._store = store
        self._readers = readers
        self._metrics = metrics

    async def _cursor(self, request: SubscribeRequest, access: Access) -> Cursor:
        if request.after:  # `session` may be left empty: the id names it
            return await resume_cursor(
                self._store,
                self._metrics,
                request.after,
                access,
                protocol=ReaderProtocol.GRPC,
                session_id=request.session or None,
            )
        if not is_session_id(request.session):
            raise InvalidArgument("session ids are 22 URL-safe characters")
        return await open_cursor(self._store, EventId(request.session, 0), access)  # new reader

    async def Subscribe(
        self, request: SubscribeRequest, context: _Context
    ) -> AsyncIterator[SubscribeResponse]:
        try:
            access = _access(context)
            cursor = await self._cursor(request, access)
            log = cursor.log
            with self._readers.attach(cursor, ReaderProtocol.GRPC, access) as reader:
                async for first, batch in reader.batches():
                    for i, raw in enumerate(batch):
                        yield _event(log, first + i, raw)
            yield _end(log)
        except RelayError as error:  # the one mapping from the error tree to gRPC
            await context.abort(error.grpc_code, error.message)


def add_to_server(servicer: RelayServicer, server: grpc.aio.Server) -> None:
    relay_pb2_grpc.add_RelayServicer_to_server(servicer, server)
