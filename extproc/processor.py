"""The inline write path: one state machine per HTTP stream that Envoy hands to ext_proc.

Pure: ProcessingRequest messages in, ProcessingResponse messages out; the gRPC loop around it
lives in `service.py`. Envoy sends request and response headers; for `200` event streams the
processor switches the body to STREAMED (mode_override), frames each chunk, appends events to
the log and returns the chunk re-written with `id:` lines. Everything else passes untouched.
"""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)

from extproc.framing import Frame, FrameTooLarge, NdjsonFramer, SseFramer, framer_for, tag_sse
from extproc.ids import format_event_id
from extproc.log import EndState, SessionLog, WritePath
from extproc.store import MemoryStore

SESSION_HEADER = "x-relay-session"
# Set by the processor, matched by Envoy's route table; Envoy strips any client-sent copy.
ROUTE_HEADER = "x-relay-target"
ROUTE_RESUME = "resume"
LAST_EVENT_ID_HEADER = "last-event-id"

_CONTINUE_REQUEST = ProcessingResponse(request_headers=HeadersResponse())
_CONTINUE_RESPONSE = ProcessingResponse(response_headers=HeadersResponse())
# For requests re-routed to the relay's own front, whose response is already tagged.
_SKIP_RESPONSE = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,
    response_header_mode=ProcessingMode.SKIP,
    request_body_mode=ProcessingMode.NONE,
    response_body_mode=ProcessingMode.NONE,
    request_trailer_mode=ProcessingMode.SKIP,
    response_trailer_mode=ProcessingMode.SKIP,
)
_PASS_BODY = ProcessingResponse(response_body=BodyResponse())
# Must equal the `allowed_override_modes` entry in envoy/envoy.yaml field for field.
_STREAM_BODY = ProcessingMode(
    request_header_mode=ProcessingMode.SEND,
    response_header_mode=ProcessingMode.SEND,
    request_body_mode=ProcessingMode.NONE,
    response_body_mode=ProcessingMode.STREAMED,
    request_trailer_mode=ProcessingMode.SKIP,
    response_trailer_mode=ProcessingMode.SKIP,
)


def header_value(headers: HttpHeaders, name: str) -> str | None:
    """The first value of `name` (lower case); Envoy sends either raw_value or value."""
    for header in headers.headers.headers:
        if header.key == name:
            return header.raw_value.decode("latin-1") if header.raw_value else str(header.value)
    return None


def _set_header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _body(data: bytes) -> ProcessingResponse:
    mutation = BodyMutation(body=data) if data else BodyMutation(clear_body=True)
    return ProcessingResponse(
        response_body=BodyResponse(response=CommonResponse(body_mutation=mutation))
    )


class StreamProcessor:
    """What the relay does with one HTTP stream; made fresh for every ext_proc gRPC stream."""

    __slots__ = ("_framer", "_log", "_max_frame_bytes", "_rerouted", "_store", "_tag")

    def __init__(self, store: MemoryStore, *, max_frame_bytes: int) -> None:
        self._store = store
        self._framer: SseFramer | NdjsonFramer | None = None
        self._log: SessionLog | None = None
        self._rerouted = False
        self._tag = True
        self._max_frame_bytes = max_frame_bytes

    @property
    def session(self) -> SessionLog | None:
        return self._log

    def handle(self, request: ProcessingRequest) -> ProcessingResponse | None:
        """Answer one message; None for messages that need no answer."""
        kind = request.WhichOneof("request")
        if kind == "response_body":
            return self.on_response_body(request.response_body)
        if kind == "request_headers":
            return self.on_request_headers(request.request_headers)
        if kind == "response_headers":
            return self.on_response_headers(request.response_headers)
        # Phases we do not configure Envoy to send still get the answer "continue unchanged".
        if kind == "request_body":
            return ProcessingResponse(request_body=BodyResponse())
        if kind == "request_trailers":
            return ProcessingResponse(request_trailers=TrailersResponse())
        if kind == "response_trailers":
            return ProcessingResponse(response_trailers=TrailersResponse())
        return None

    def on_request_headers(self, headers: HttpHeaders) -> ProcessingResponse:
        # A request that names an event it already saw is answered from the log by the relay's
        # HTTP front, never by a second upstream call: re-route it there.
        if header_value(headers, LAST_EVENT_ID_HEADER) is None:
            return _CONTINUE_REQUEST
        self._rerouted = True
        mutation = HeaderMutation(set_headers=[_set_header(ROUTE_HEADER, ROUTE_RESUME)])
        return ProcessingResponse(
            request_headers=HeadersResponse(
                response=CommonResponse(header_mutation=mutation, clear_route_cache=True)
            ),
            mode_override=_SKIP_RESPONSE,
        )

    def on_response_headers(self, headers: HttpHeaders) -> ProcessingResponse:
        if self._rerouted or header_value(headers, ":status") != "200":
            return _CONTINUE_RESPONSE
        content_type = header_value(headers, "content-type") or ""
        framer = framer_for(content_type, max_frame_bytes=self._max_frame_bytes)
        if framer is None:
            return _CONTINUE_RESPONSE
        self._framer = framer
        self._tag = isinstance(framer, SseFramer)  # NDJSON lines cannot carry an id in-band
        self._log = self._store.create(content_type=content_type, write_path=WritePath.INLINE)
        mutation = HeaderMutation(
            set_headers=[_set_header(SESSION_HEADER, self._log.session_id)],
            remove_headers=["content-length"],
        )
        return ProcessingResponse(
            response_headers=HeadersResponse(response=CommonResponse(header_mutation=mutation)),
            mode_override=_STREAM_BODY,
        )

    def on_response_body(self, body: HttpBody) -> ProcessingResponse:
        framer, log = self._framer, self._log
        if framer is None or log is None:
            return _PASS_BODY
        try:
            frames = framer.feed(body.body)
        except FrameTooLarge as exc:
            # Fail this session loudly; the client still gets the upstream's bytes untagged.
            self._store.end(log, EndState.FAILED, f"event larger than {exc.limit} bytes")
            self._framer = None
            return _PASS_BODY
        if body.end_of_stream:
            tail = framer.close()
            if tail is not None:
                frames.append(tail)
        out = self._emit(log, frames)
        if body.end_of_stream:
            torn = bool(frames) and not frames[-1].complete and frames[-1].is_event
            if torn:
                self.finish(EndState.FAILED, "upstream ended mid-event")
            else:
                self.finish(EndState.DONE)
        return _body(out)

    def finish(self, state: EndState, reason: str = "") -> None:
        """End the session (if any and still open): called at end of stream or on disconnect."""
        if self._log is not None:
            self._store.end(self._log, state, reason)

    def _emit(self, log: SessionLog, frames: list[Frame]) -> bytes:
        if log.state is not EndState.OPEN or log.gone_reason:
            return b"".join(frame.raw for frame in frames)
        kept: list[bytes] = []
        out: list[bytes] = []
        seq = log.last_seq
        for frame in frames:
            if not (frame.is_event and frame.complete):
                out.append(frame.raw)  # comments, retry-only blocks, a torn tail: untouched
                continue
            seq += 1
            raw = (
                tag_sse(frame.raw, format_event_id(log.session_id, seq)) if self._tag else frame.raw
            )
            kept.append(raw)
            out.append(raw)
        if kept and not self._store.append(log, kept):
            # The log stopped keeping events (its byte limit): ids would not resume, so the
            # client gets the upstream's bytes untagged from here on.
            return b"".join(frame.raw for frame in frames)
        return b"".join(out)
