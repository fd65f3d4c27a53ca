"""The ext_proc gRPC servicer: a thin loop that feeds Envoy's messages to a StreamProcessor.

Envoy may close the stream as soon as it needs nothing more, so cancellation is a normal
end; a session still open when the stream goes away was cut short (client gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from extproc.access.quota import SessionQuota
from extproc.errors import SessionGone
from extproc.inline.processor import WRITE_PATH_METADATA, Reply, StreamProcessor, cut_stream
from extproc.node.metrics import RelayMetrics
from extproc.session.log import EndState
from extproc.store.base import SessionStore
from extproc.vocabulary import WritePath

# Below Envoy's ext_proc message_timeout (2 s in envoy/envoy.yaml), past which Envoy would
# fail open and end the response itself.
SETTLE_TIMEOUT_S = 1.0
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: SessionStore,
        quota: SessionQuota,
        metrics: RelayMetrics,
        *,
        max_event_bytes: int,
        write_path: WritePath | None = None,
    ) -> None:
        self._store = store
        self._quota = quota
        self._metrics = metrics
        self._max_event_bytes = max_event_bytes
        self._write_path = write_path  # `serve --write-path`: for routes that name none
        self.streams = 0  # ext_proc streams running (a stopping node waits for them)
        self.stop_reason = ""  # set when the node stops: why the streams it cuts ended

    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext[ProcessingRequest, ProcessingResponse],
    ) -> AsyncIterator[Reply]:
        # Envoy's per-route ext_proc override names a generation route's write path; where
        # it names none (or an unknown one), the node's default applies to generation POSTs.
        route = dict(context.invocation_metadata() or ()).get(WRITE_PATH_METADATA)
        metrics = self._metrics
        processor = StreamProcessor(
            self._store,
            self._quota,
            max_event_bytes=self._max_event_bytes,
            on_usage=metrics.count_tokens,
            route=WritePath(route) if route in tuple(WritePath) else None,
            default_route=self._write_path,
        )
        timings = metrics.processor_message
        self.streams += 1
        clock = time.perf_counter
        try:
            async for request in request_iterator:
                started = clock()
                kind = request.WhichOneof("request")
                if kind == "response_body":  # nearly every message: no dispatch call
                    response = processor.on_response_body(request.response_body)
                else:
                    response = processor.handle(request, kind)
                timings[kind].observe(clock() - started)
                if response is not None:
                    if processor.settling:
                        response = await _settled(processor, response)
                    yield response
        finally:
            self.streams -= 1
            # Normal ends already closed the session; anything left open lost its client,
            # unless the node is stopping and cut the stream itself.
            session = processor.session
            if session is not None and session.state is EndState.OPEN and not self.stop_reason:
                metrics.inline_client_gone()
            processor.finish(EndState.CANCELLED, self.stop_reason or "client disconnected")


async def _settled(processor: StreamProcessor, response: Reply) -> Reply:
    """The reply that ends a stream tells the client it is complete. A shared store records
    `done` only once it holds it (one round trip); if that does not happen in time, the
    session failed instead, or the store dropped it meanwhile (SessionGone), the client's
    response is cut rather than passed off as complete."""
    session = processor.session
    with contextlib.suppress(TimeoutError, SessionGone):
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while session is not None and session.state is EndState.OPEN:
                await session.wait_beyond(session.last_seq)
    return response if session is not None and session.state is EndState.DONE else cut_stream()


def _serialize(reply: Reply) -> bytes:
    """Body replies arrive as wire bytes already (processor._body); the rest are messages."""
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


def add_to_server(servicer: ExternalProcessor, server: grpc.aio.Server) -> None:
    """As the generated add_ExternalProcessorServicer_to_server, with our serializer."""
    handlers = {
        "Process": grpc.stream_stream_rpc_method_handler(
            servicer.Process,
            request_deserializer=ProcessingRequest.FromString,
            response_serializer=_serialize,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
