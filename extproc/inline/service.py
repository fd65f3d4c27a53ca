"""The ext_proc gRPC servicer: a thin loop that feeds Envoy's messages to a StreamProcessor.

Envoy may close the stream as soon as it needs nothing more, so cancellation is a normal
end; a session still open when the stream goes away was cut short (client gone).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from extproc.access.grants import DEFAULT_MAX_SESSIONS_PER_IDENTITY
from extproc.inline.processor import WRITE_PATH_METADATA, StreamProcessor
from extproc.session.log import EndState
from extproc.store import SessionStore

# The ProcessingRequest oneof names (also the `phase` label of relay_processor_message_seconds).
_KINDS = (
    "request_headers",
    "response_headers",
    "request_body",
    "response_body",
    "request_trailers",
    "response_trailers",
)


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: SessionStore,
        *,
        max_frame_bytes: int,
        max_sessions_per_identity: int = DEFAULT_MAX_SESSIONS_PER_IDENTITY,
    ) -> None:
        self._store = store
        self._max_frame_bytes = max_frame_bytes
        self._max_sessions = max_sessions_per_identity
        # The timing histogram's child per message kind, looked up once, not per message.
        timing = store.metrics.processor_message
        self._timings = {kind: timing.labels(kind) for kind in _KINDS}

    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext[ProcessingRequest, ProcessingResponse],
    ) -> AsyncIterator[ProcessingResponse]:
        # Envoy's per-route ext_proc override names the route's write path in gRPC metadata.
        metadata = dict(context.invocation_metadata() or ())
        processor = StreamProcessor(
            self._store,
            max_frame_bytes=self._max_frame_bytes,
            detach=metadata.get(WRITE_PATH_METADATA) == "detached",
            max_sessions_per_identity=self._max_sessions,
        )
        timings = self._timings
        try:
            async for request in request_iterator:
                started = time.perf_counter()
                response = processor.handle(request)
                timings[request.WhichOneof("request")].observe(time.perf_counter() - started)
                if response is not None:
                    yield response
        finally:
            # Normal ends already closed the session; anything left open lost its client.
            session = processor.session
            if session is not None and session.state is EndState.OPEN:
                self._store.metrics.client_disconnects.labels("inline").inc()
            processor.finish(EndState.CANCELLED, "client disconnected")


def add_to_server(servicer: ExternalProcessor, server: grpc.aio.Server) -> None:
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
