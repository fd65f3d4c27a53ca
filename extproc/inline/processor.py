"""The inline write path: one state machine per HTTP stream that Envoy hands to ext_proc.

Pure: ProcessingRequest messages in, ProcessingResponse messages out; the gRPC loop around it
lives in `service.py`. Envoy sends request and response headers; for `200` event streams the
processor switches the body to STREAMED (mode_override), frames each chunk, appends events to
the log and returns the chunk re-written with `id:` lines. Everything else passes untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeAlias

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
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus

from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER, owner_key
from extproc.access.quota import SessionQuota, Slot
from extproc.errors import RelayError
from extproc.session.framing import framing_of, identity_coded, new_framer
from extproc.session.ids import SESSION_HEADER
from extproc.session.log import EndState, SessionLog, WritePath
from extproc.session.request_key import RequestKeyBuilder
from extproc.session.usage import Usage
from extproc.session.writer import SessionWriter
from extproc.store.base import SessionStore
from extproc.vocabulary import GENERATION_PATH

# Set by the processor, matched by Envoy's route table; Envoy strips any client-sent copy.
# (Resumes never reach the processor: Envoy's `relay_resume` route sends a relay id in
# Last-Event-ID straight to the relay, with ext_proc off, so they work while it is down.)
ROUTE_HEADER = "x-relay-target"
ROUTE_DETACHED = "detached"
# gRPC metadata that Envoy's per-route ext_proc override sends on generation routes: the
# route's write path ("detached" or "inline"); absent on every other route.
WRITE_PATH_METADATA = "x-relay-write-path"

_CONTINUE_REQUEST = ProcessingResponse(request_headers=HeadersResponse())
_CONTINUE_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse())
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
STREAM_BODY_MODE = ProcessingMode(
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


def node_route(headers: HttpHeaders, default: WritePath | None) -> WritePath | None:
    """The node's default write path (`serve --write-path`) for a request whose route named
    none (Envoy Gateway cannot): it applies only to a POST to a generation path, matched by
    the expression Envoy's `generations` route uses; anything else is no generation."""
    if default is None or header_value(headers, ":method") != "POST":
        return None
    path = (header_value(headers, ":path") or "").partition("?")[0]
    return default if GENERATION_PATH.fullmatch(path) else None


def _set_header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, raw_value=value.encode()),
        append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


# A reply as the servicer hands it to grpc: a message, or (the body replies, one per chunk)
# its wire bytes already; service.py's serializer passes bytes through.
Reply: TypeAlias = ProcessingResponse | bytes
_CLEAR_BODY = ProcessingResponse(
    response_body=BodyResponse(response=CommonResponse(body_mutation=BodyMutation(clear_body=True)))
).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@functools.lru_cache(maxsize=2048)
def _body_prefix(size: int) -> bytes:
    """Wire bytes before a replacement body of `size` bytes: ProcessingResponse.response_body (4)
    > BodyResponse.response (1) > CommonResponse.body_mutation (3) > BodyMutation.body (1),
    each a length-delimited field whose length covers what it holds."""
    mutation = 1 + len(_varint(size)) + size
    common = 1 + len(_varint(mutation)) + mutation
    response = 1 + len(_varint(common)) + common
    return (
        b"\x22" + _varint(response) + b"\x0a" + _varint(common)
        + b"\x1a" + _varint(mutation) + b"\x0a" + _varint(size)
    )  # fmt: skip


def _body(data: bytes) -> bytes:
    # Hot path (one per chunk): the reply's wire bytes are a cached prefix and the body, ~10x
    # cheaper than setting the nested field in place (each nested access makes a Python
    # object) and serializing. tests/test_processor.py decodes every reply with the real class.
    return _body_prefix(len(data)) + data if data else _CLEAR_BODY


def cut_stream() -> ProcessingResponse:
    """Break the client's response mid-body: its headers went out, so Envoy resets the stream,
    which every HTTP client reports. For a session that will not end `done` here (a shared
    store's other node took it over): never passed off as complete."""
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=503), details="relay_session_cut"
        )
    )


def _refuse(error: RelayError) -> ProcessingResponse:
    """Answer the client from Envoy without calling the LLM (the one mapping of this front)."""
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=error.http_status),
            headers=HeaderMutation(set_headers=[_set_header("content-type", "application/json")]),
            body=error.json_body(),
            details=error.code,
        )
    )


class StreamProcessor:
    """What the relay does with one HTTP stream; made fresh for every ext_proc gRPC stream."""

    __slots__ = (
        "_default_route",
        "_max_event_bytes",
        "_on_usage",
        "_owner",
        "_quota",
        "_request",
        "_request_key",
        "_rerouted",
        "_slot",
        "_store",
        "_writer",
        "route",
        "settling",
    )

    def __init__(
        self,
        store: SessionStore,
        quota: SessionQuota,
        *,
        max_event_bytes: int,
        on_usage: Callable[[Usage], None],
        route: WritePath | None = None,
        default_route: WritePath | None = None,
    ) -> None:
        self._store = store
        self._quota = quota
        self._max_event_bytes = max_event_bytes
        self._on_usage = on_usage
        self._writer: SessionWriter | None = None
        self._rerouted = False
        self._owner = ""  # the caller's owner key; "" when auth is off
        self._slot: Slot | None = None  # this exchange's place in the caller's session quota
        # A generation's request as a resume must repeat it; its body arrives in
        # request_body messages (STREAMED on generation routes, envoy/envoy.yaml).
        self._request: RequestKeyBuilder | None = None
        self._request_key = ""  # ... and once the body is complete, its key
        # A generation route's write path (see envoy/envoy.yaml); None on any other route.
        self.route = route
        # Without one from the route, the node's default decides on the request headers.
        self._default_route = default_route if route is None else None
        # The reply that ends the stream must wait until the store records `done` (a shared
        # store holds it until stored): see service.py.
        self.settling = False

    @property
    def session(self) -> SessionLog | None:
        return self._writer.log if self._writer is not None else None

    def handle(self, request: ProcessingRequest, kind: str | None = None) -> Reply | None:
        """Answer one message; None for messages that need no answer. `kind` is the request's
        oneof name (`WhichOneof("request")`), if the caller has it already."""
        if kind is None:
            kind = request.WhichOneof("request")
        if kind == "response_body":
            return self.on_response_body(request.response_body)
        if kind == "request_headers":
            return self.on_request_headers(request.request_headers)
        if kind == "response_headers":
            return self.on_response_headers(request.response_headers)
        if kind == "request_body":
            return self.on_request_body(request.request_body)
        # Phases we do not configure Envoy to send still get the answer "continue unchanged".
        if kind == "request_trailers":
            return ProcessingResponse(request_trailers=TrailersResponse())
        if kind == "response_trailers":
            return ProcessingResponse(response_trailers=TrailersResponse())
        return None

    def on_request_headers(self, headers: HttpHeaders) -> ProcessingResponse:
        if self._default_route is not None:
            self.route = node_route(headers, self._default_route)
        # On a detached route a POST (a generation) is made by the relay itself.
        method = header_value(headers, ":method") or ""
        if self.route is not WritePath.DETACHED or method != "POST":
            try:
                identity = header_value(headers, IDENTITY_HEADER)
                self._owner = owner_key(identity, header_value(headers, JWT_PAYLOAD_HEADER))
                if self.route is not None:  # a generation: its quota slot before the LLM call
                    self._slot = self._quota.reserve(self._owner)
            except RelayError as error:
                return _refuse(error)
            if self.route is not None:
                self._request = RequestKeyBuilder(method, header_value(headers, ":path") or "")
                if headers.end_of_stream:  # no body
                    self._request_complete()
            return _CONTINUE_REQUEST
        self._rerouted = True
        mutation = HeaderMutation(set_headers=[_set_header(ROUTE_HEADER, ROUTE_DETACHED)])
        return ProcessingResponse(
            request_headers=HeadersResponse(
                response=CommonResponse(header_mutation=mutation, clear_route_cache=True)
            ),
            mode_override=_SKIP_RESPONSE,
        )

    def on_request_body(self, body: HttpBody) -> ProcessingResponse:
        if self._request is not None:
            self._request.feed(body.body)
            if body.end_of_stream:
                self._request_complete()
        return _CONTINUE_REQUEST_BODY

    def _request_complete(self) -> None:
        """The whole request is known: its key goes on the session, now or when it opens."""
        if self._request is not None:
            self._request_key = str(self._request.finish())
            self._request = None
            if self._writer is not None:
                self._writer.log.request_key = self._request_key

    def on_response_headers(self, headers: HttpHeaders) -> ProcessingResponse:
        # No body to come (HEAD, an empty 200): nothing to log, so no session to promise.
        if self._rerouted or headers.end_of_stream or header_value(headers, ":status") != "200":
            return _CONTINUE_RESPONSE
        content_type = header_value(headers, "content-type") or ""
        framing = framing_of(content_type)
        if framing is None or not identity_coded(header_value(headers, "content-encoding")):
            return _CONTINUE_RESPONSE  # a compressed stream cannot be framed: passed untouched
        if self._slot is None:  # a stream on another route: it counts from now on
            try:
                self._slot = self._quota.reserve(self._owner)
            except RelayError as error:
                return _refuse(error)
        log = self._store.create(
            content_type=content_type, write_path=WritePath.INLINE, owner=self._owner
        )
        framer = new_framer(framing, max_frame_bytes=self._max_event_bytes)
        log.request_key = self._request_key
        self._writer = SessionWriter(self._store, log, framer, on_usage=self._on_usage)
        mutation = HeaderMutation(
            set_headers=[_set_header(SESSION_HEADER, log.session_id)],
            remove_headers=["content-length"],
        )
        return ProcessingResponse(
            response_headers=HeadersResponse(response=CommonResponse(header_mutation=mutation)),
            mode_override=STREAM_BODY_MODE,
        )

    def on_response_body(self, body: HttpBody) -> Reply:
        writer = self._writer
        if writer is None:
            return _PASS_BODY
        if self._store.fenced(writer.log):  # another node may own it now: nothing more here
            return cut_stream()
        out = writer.feed(body.body)
        if body.end_of_stream:
            out += writer.close()
            self.settling = writer.log.state is EndState.OPEN
            if self._slot is not None:
                self._slot.release()  # the session is over: its quota slot is free again
        return _body(out)

    def finish(self, state: EndState, reason: str = "") -> None:
        """The ext_proc stream went away: end the session (if any and still open) and give
        the quota slot back."""
        if self._writer is not None:
            self._store.end(self._writer.log, state, reason)
        if self._slot is not None:
            self._slot.release()
