"""The gRPC front: `relay.v1.Relay/Subscribe`, a server stream of one session's events.

The reader is a Cursor (history, then live) counted by `Generations.reading`; gRPC flow
control paces it (each yield waits for the write). `after` is an event id from any front.
A stream that reads to the end sends one `End`, then status OK; errors are mapped here, once,
to the error's gRPC code (unknown or gone: NOT_FOUND, malformed: INVALID_ARGUMENT, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from extproc.access.grants import SHARE_HEADER, Access
from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER, owner_key
from extproc.detached.generations import Generations
from extproc.errors import MalformedEventId, RelayError
from extproc.proto.relay.v1 import relay_pb2, relay_pb2_grpc
from extproc.proto.relay.v1.relay_pb2 import End, Event, SubscribeRequest, SubscribeResponse
from extproc.readers.cursors import event_fields, open_cursor, resume_cursor
from extproc.session.ids import EventId, format_event_id, is_session_id
from extproc.session.log import Cursor, SessionLog
from extproc.store import SessionStore

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


class RelayServicer(relay_pb2_grpc.RelayServicer):
    def __init__(self, store: SessionStore, generations: Generations) -> None:
        self._store = store
        self._generations = generations

    @staticmethod
    def _access(context: _Context) -> Access:
        # Envoy's identity and a share token arrive as metadata (gRPC's headers).
        metadata = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        owner = owner_key(metadata.get(IDENTITY_HEADER), metadata.get(JWT_PAYLOAD_HEADER))
        return Access.of(owner, metadata.get(SHARE_HEADER))

    async def _cursor(self, request: SubscribeRequest, access: Access) -> Cursor:
        if request.after:  # `session` may be left empty: the id names it
            session = request.session or None
            return await resume_cursor(
                self._store, request.after, access, protocol="grpc", session_id=session
            )
        if not is_session_id(request.session):
            raise MalformedEventId("session ids are 22 URL-safe characters")
        return await open_cursor(self._store, EventId(request.session, 0), access)  # new reader

    async def Subscribe(
        self, request: SubscribeRequest, context: _Context
    ) -> AsyncIterator[SubscribeResponse]:
        try:
            access = self._access(context)
            cursor = await self._cursor(request, access)
            log = cursor.log
            metrics = self._store.metrics
            with self._generations.reading(cursor, protocol="grpc", identity=access.identity):
                async for batch in cursor.batches():
                    first = cursor.seq - len(batch) + 1
                    for i, raw in enumerate(batch):
                        yield _event(log, first + i, raw)
                    metrics.reader_wrote("grpc", len(batch), log.last_seq - cursor.seq)
            yield _end(log)
        except RelayError as error:  # the one mapping from the error tree to gRPC
            await context.abort(error.grpc_code, error.message)


def add_to_server(servicer: RelayServicer, server: grpc.aio.Server) -> None:
    relay_pb2_grpc.add_RelayServicer_to_server(servicer, server)
