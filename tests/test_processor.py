"""Tests for extproc.inline.processor (layer 2): a StreamProcessor driven by real ext_proc
ProcessingRequest messages, as Envoy sends them, with the replies decoded as Envoy would.

Expected bodies come from a small reference tagger below that works on the whole input by the
WHATWG block rules, so the processor's incremental framing is checked against an independent
reading of the same bytes, whatever the chunk split."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HeadersResponse,
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.access.identity import owner_key
from extproc.access.quota import SessionQuota
from extproc.inline import processor as processor_module
from extproc.inline.processor import StreamProcessor
from extproc.node.metrics import RelayMetrics
from extproc.session.log import EVENT_OVERHEAD_BYTES, LOG_OVERHEAD_BYTES, EndState, SessionLog
from extproc.store import MemoryStore, StoreLimits
from extproc.vocabulary import WritePath

FIXTURES = Path(__file__).parent / "fixtures"
MAX_FRAME_BYTES = 1 << 20
ALL_EVENTS = 1 << 20
SSE = "text/event-stream"

# fixture -> data events, from tests/fixtures/README.md
SSE_FIXTURES = {
    "openai-chat-usage.sse": 13,
    "openai-tool-calls.sse": 6,
    "anthropic-messages.sse": 10,
    "openai-responses.sse": 7,
    "crlf-comments-multiline.sse": 3,
    "openai-error-midstream.sse": 2,
    "truncated-last-event.sse": 3,  # the unterminated 4th is not an event we can tag
}
# Inline streams for what the fixtures lack: upstream ids, bare CR line ends, odd blocks.
UPSTREAM_IDS = (
    b"id: up-1\ndata: a\n\n"
    b"event: named\nid\ndata: b\nid: up-3\n\n"
    b": comment\n\n"
    b"id: only-an-id\n\n"
    b"\n"
    b"data\n\n"
)
CR_ONLY = b"data: one\r\rretry: 10\r\rdata: two\rid: up-2\rdata: more\r\r"


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


SSE_INPUTS = {name: load(name) for name in SSE_FIXTURES} | {
    "upstream-ids": UPSTREAM_IDS,
    "cr-only": CR_ONLY,
}


# --- messages in and out -------------------------------------------------------------------


def http_headers(pairs: dict[str, str]) -> HttpHeaders:
    """Headers as Envoy sends them: lower-case keys, values in raw_value bytes."""
    values = [HeaderValue(key=key, raw_value=value.encode()) for key, value in pairs.items()]
    return HttpHeaders(headers=HeaderMap(headers=values))


def request_headers(pairs: dict[str, str]) -> ProcessingRequest:
    base = {":method": "POST", ":path": "/v1/chat/completions", ":authority": "relay"}
    return ProcessingRequest(request_headers=http_headers(base | pairs))


def response_headers(status: int, content_type: str | None) -> ProcessingRequest:
    pairs = {":status": str(status), "content-length": "123"}
    if content_type is not None:
        pairs["content-type"] = content_type
    return ProcessingRequest(response_headers=http_headers(pairs))


def body_chunk(data: bytes, *, end_of_stream: bool = False) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=data, end_of_stream=end_of_stream))


def on_wire(response: ProcessingResponse | bytes | None) -> ProcessingResponse:
    """The reply as Envoy decodes it (body replies are wire bytes already)."""
    assert response is not None
    wire = response if isinstance(response, bytes) else response.SerializeToString()
    return ProcessingResponse.FromString(wire)


def client_bytes(chunk: bytes, response: ProcessingResponse) -> bytes:
    """What Envoy forwards to the client for `chunk`, given the processor's reply to it."""
    assert response.WhichOneof("response") == "response_body"
    common = response.response_body.response
    assert common.status == 0  # CONTINUE
    if not common.HasField("body_mutation"):
        return chunk
    mutation = common.body_mutation
    kind = mutation.WhichOneof("mutation")
    if kind == "body":
        assert mutation.body, "an empty reply must be clear_body, not an empty replacement"
        return bytes(mutation.body)
    assert kind == "clear_body"
    assert mutation.clear_body is True  # clear_body=False would forward the chunk unchanged
    return b""


def set_headers(options: list[HeaderValueOption]) -> dict[str, str]:
    for option in options:
        assert option.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return {o.header.key: (o.header.raw_value or o.header.value.encode()).decode() for o in options}


# --- driving a processor -------------------------------------------------------------------


def new_store(limits: StoreLimits | None = None) -> MemoryStore:
    return MemoryStore(limits, metrics=RelayMetrics())


def new_processor(
    store: MemoryStore | None = None,
    *,
    max_frame_bytes: int = MAX_FRAME_BYTES,
    quota: SessionQuota | None = None,
    route: WritePath | None = None,
) -> StreamProcessor:
    store = store if store is not None else new_store()  # an empty store is falsy
    return StreamProcessor(
        store,
        quota if quota is not None else SessionQuota(),
        max_event_bytes=max_frame_bytes,
        on_usage=lambda usage: None,
        route=route,
    )


def start_stream(processor: StreamProcessor, content_type: str = SSE) -> SessionLog:
    """Request and response headers of a 200 stream; returns the session it opened."""
    assert on_wire(processor.handle(request_headers({}))).WhichOneof("response")
    reply = on_wire(processor.handle(response_headers(200, content_type)))
    assert processor.session is not None
    mutation = reply.response_headers.response.header_mutation
    assert set_headers(list(mutation.set_headers)) == {
        "x-relay-session": processor.session.session_id
    }
    return processor.session


def send_body(processor: StreamProcessor, chunks: list[bytes], *, end: bool = True) -> list[bytes]:
    """Each chunk as one response_body message; the last one ends the stream if `end`."""
    out: list[bytes] = []
    for n, chunk in enumerate(chunks):
        last = end and n == len(chunks) - 1
        reply = on_wire(processor.handle(body_chunk(chunk, end_of_stream=last)))
        out.append(client_bytes(chunk, reply))
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def logged(log: SessionLog) -> list[bytes]:
    return log.events_after(0, ALL_EVENTS)


# --- an independent reference: whole input, WHATWG blocks ----------------------------------

_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_BLANK = {b"\n", b"\r\n", b"\r"}


def _field(line: bytes, name: bytes) -> bool:
    line = line.rstrip(b"\r\n")
    return line == name or line.startswith(name + b":")


def reference_blocks(data: bytes) -> tuple[list[bytes], bytes]:
    """The terminated blocks (each ending with its blank line) and the unterminated tail."""
    blocks: list[bytes] = []
    block = b""
    for line in _LINE.findall(data):
        block += line
        if line in _BLANK:
            blocks.append(block)
            block = b""
    return blocks, block


def reference_tag(block: bytes, event_id: str) -> bytes:
    lines = _LINE.findall(block)
    ending = re.search(rb"\r\n|\r|\n", lines[0])
    assert ending is not None
    kept = b"".join(line for line in lines if not _field(line, b"id"))
    return b"id: " + event_id.encode() + ending.group() + kept


def reference(
    data: bytes, session: str, *, tag_first: int = ALL_EVENTS
) -> tuple[bytes, list[bytes]]:
    """(bytes the client gets, events logged) when the log keeps only the first `tag_first`."""
    blocks, tail = reference_blocks(data)
    out: list[bytes] = []
    events: list[bytes] = []
    for block in blocks:
        is_event = any(_field(line, b"data") for line in _LINE.findall(block))
        if is_event and len(events) < tag_first:
            block = reference_tag(block, f"{session}:{len(events) + 1}")
            events.append(block)
        out.append(block)
    return b"".join(out) + tail, events


def torn(data: bytes) -> bool:
    _, tail = reference_blocks(data)
    return any(_field(line, b"data") for line in _LINE.findall(tail))


# --- request headers -----------------------------------------------------------------------


def test_request_without_last_event_id_continues_plainly() -> None:
    reply = on_wire(new_processor().handle(request_headers({"accept": SSE})))
    assert reply == ProcessingResponse(request_headers=HeadersResponse())  # no mutation, no mode


def test_last_event_id_is_not_the_processors_business() -> None:
    """Envoy's route table sends relay ids to the relay before ext_proc runs; whatever reaches
    the processor with a Last-Event-ID (an MCP server's, any SSE API's) is the upstream's."""
    for route in (None, WritePath.INLINE):
        processor = new_processor(route=route)
        for value in ("x" * 22 + ":3", "7", "mcp-40"):
            reply = on_wire(processor.handle(request_headers({"last-event-id": value})))
            assert reply == ProcessingResponse(request_headers=HeadersResponse())
    detached = new_processor(route=WritePath.DETACHED)
    reply = on_wire(detached.handle(request_headers({"last-event-id": "x" * 22 + ":3"})))
    mutation = reply.request_headers.response.header_mutation
    assert set_headers(list(mutation.set_headers)) == {"x-relay-target": "detached"}


def request_body(data: bytes, *, end_of_stream: bool) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=data, end_of_stream=end_of_stream))


@pytest.mark.parametrize("body_ends_after_the_response_starts", [False, True])
def test_an_inline_generation_keeps_the_request_a_resume_must_repeat(
    body_ends_after_the_response_starts: bool,
) -> None:
    processor = new_processor(route=WritePath.INLINE)
    path = {":path": "/v1/chat/completions?api-version=1"}
    assert on_wire(processor.handle(request_headers(path))).request_headers == HeadersResponse()
    reply = on_wire(processor.handle(request_body(b'{"a":', end_of_stream=False)))
    assert reply == ProcessingResponse(request_body=BodyResponse())  # forwarded unchanged
    if body_ends_after_the_response_starts:
        processor.handle(response_headers(200, SSE))
        assert processor.session is not None and processor.session.request_key == ""
    processor.handle(request_body(b"1}", end_of_stream=True))
    if not body_ends_after_the_response_starts:
        processor.handle(response_headers(200, SSE))
    log = processor.session
    assert log is not None
    digest = hashlib.sha256(b'{"a":1}').hexdigest()
    assert log.request_key == f"POST /v1/chat/completions?api-version=1 {digest}"

    bodiless = new_processor(route=WritePath.INLINE)
    headers = request_headers({})
    headers.request_headers.end_of_stream = True
    bodiless.handle(headers)
    bodiless.handle(response_headers(200, SSE))
    assert bodiless.session is not None
    assert bodiless.session.request_key.endswith(" " + hashlib.sha256(b"").hexdigest())

    elsewhere = new_processor(route=None)  # a stream on another route: no key, not resumable
    elsewhere.handle(request_headers({}))
    elsewhere.handle(request_body(b"{}", end_of_stream=True))
    elsewhere.handle(response_headers(200, SSE))
    assert elsewhere.session is not None and elsewhere.session.request_key == ""


def test_detached_route_reroutes_generations_only() -> None:
    store = new_store()
    post = new_processor(store, route=WritePath.DETACHED)
    reply = on_wire(post.handle(request_headers({})))
    mutation = reply.request_headers.response.header_mutation
    assert set_headers(list(mutation.set_headers)) == {"x-relay-target": "detached"}
    get = new_processor(store, route=WritePath.DETACHED)
    reply = on_wire(get.handle(request_headers({":method": "GET"})))
    assert not reply.request_headers.HasField("response")


def test_header_value_reads_raw_value_or_value() -> None:
    processor = new_processor(route=WritePath.DETACHED)
    headers = HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key=":method", value="POST")]))
    reply = on_wire(processor.handle(ProcessingRequest(request_headers=headers)))
    assert reply.request_headers.response.clear_route_cache is True


# --- response headers ----------------------------------------------------------------------


def test_event_stream_opens_a_session_and_streams_the_body() -> None:
    store = new_store()
    processor = new_processor(store)
    processor.handle(request_headers({}))
    reply = on_wire(processor.handle(response_headers(200, "text/event-stream; charset=utf-8")))
    log = processor.session
    assert log is not None
    assert store.get(log.session_id) is log
    assert log.state is EndState.OPEN
    assert log.content_type == "text/event-stream; charset=utf-8"
    mutation = reply.response_headers.response.header_mutation
    assert set_headers(list(mutation.set_headers)) == {"x-relay-session": log.session_id}
    assert list(mutation.remove_headers) == ["content-length"]  # the body changes length
    mode = reply.mode_override
    assert mode.response_body_mode == ProcessingMode.STREAMED
    assert mode.response_header_mode == ProcessingMode.SEND
    assert mode.request_body_mode == ProcessingMode.NONE


@pytest.mark.parametrize(
    ("status", "content_type"),
    [
        (200, "application/json"),
        (200, None),
        (500, SSE),
        (429, SSE),
        (204, None),
        (206, SSE),
    ],
)
def test_other_responses_pass_untouched(status: int, content_type: str | None) -> None:
    store = new_store()
    processor = new_processor(store)
    processor.handle(request_headers({}))
    reply = on_wire(processor.handle(response_headers(status, content_type)))
    assert not reply.response_headers.HasField("response")
    assert not reply.HasField("mode_override")
    assert processor.session is None
    assert len(store) == 0
    chunks = [b'{"error": ', b'"x"}\n\n', b"data: 1\n\n"]
    for n, chunk in enumerate(chunks):
        reply = on_wire(processor.handle(body_chunk(chunk, end_of_stream=n == 2)))
        assert not reply.response_body.HasField("response")
        assert client_bytes(chunk, reply) == chunk
    processor.finish(EndState.CANCELLED)
    assert len(store) == 0


# --- response bodies -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SSE_INPUTS)
@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12), empty_end=st.booleans()
)
def test_sse_bodies_are_tagged_whatever_the_split(
    name: str, cuts: list[int], empty_end: bool
) -> None:
    data = SSE_INPUTS[name]
    store = new_store()
    processor = new_processor(store)
    log = start_stream(processor)
    chunks = split_at(data, cuts) + ([b""] if empty_end else [])

    out = b"".join(send_body(processor, chunks))

    expected_out, expected_events = reference(data, log.session_id)
    assert out == expected_out
    assert logged(log) == expected_events
    seqs = re.findall(rb"id: " + log.session_id.encode() + rb":([0-9]+)\r?\n?", out)
    assert seqs == [str(n).encode() for n in range(1, len(expected_events) + 1)]
    if name in SSE_FIXTURES:
        assert log.last_seq == SSE_FIXTURES[name]
    if torn(data):
        assert (log.state, log.reason) == (EndState.FAILED, "upstream ended mid-event")
    else:
        assert log.state is EndState.DONE


@pytest.mark.parametrize("name", SSE_INPUTS)
def test_sse_bodies_one_byte_per_chunk(name: str) -> None:
    data = SSE_INPUTS[name]
    processor = new_processor()
    log = start_stream(processor)
    out = send_body(processor, [data[i : i + 1] for i in range(len(data))])
    assert b"".join(out) == reference(data, log.session_id)[0]
    assert logged(log) == reference(data, log.session_id)[1]


def test_upstream_ids_are_replaced_not_kept() -> None:
    processor = new_processor()
    log = start_stream(processor)
    out = b"".join(send_body(processor, [UPSTREAM_IDS]))
    sid = log.session_id
    assert (
        out
        == (
            f"id: {sid}:1\ndata: a\n\n"
            f"id: {sid}:2\nevent: named\ndata: b\n\n"
            ": comment\n\n"
            "id: only-an-id\n\n"  # no data: not an event, passed through as sent
            "\n"
            f"id: {sid}:3\ndata\n\n"
        ).encode()
    )


def test_partial_event_is_held_back_with_an_empty_reply() -> None:
    processor = new_processor()
    log = start_stream(processor)
    held = on_wire(processor.handle(body_chunk(b"data: par")))
    assert held.response_body.response.body_mutation.WhichOneof("mutation") == "clear_body"
    assert held.response_body.response.body_mutation.clear_body is True
    assert log.last_seq == 0
    released = on_wire(processor.handle(body_chunk(b"tial\n\ndata: b", end_of_stream=False)))
    assert client_bytes(b"", released) == f"id: {log.session_id}:1\ndata: partial\n\n".encode()
    assert log.last_seq == 1
    flushed = on_wire(processor.handle(body_chunk(b"\n\n", end_of_stream=True)))
    assert client_bytes(b"", flushed) == f"id: {log.session_id}:2\ndata: b\n\n".encode()
    assert log.state is EndState.DONE


def test_truncated_stream_fails_the_session_and_passes_the_tail() -> None:
    data = load("truncated-last-event.sse")
    processor = new_processor()
    log = start_stream(processor)
    out = b"".join(send_body(processor, [data]))
    _, tail = reference_blocks(data)
    assert tail.startswith(b"data: ") and not tail.endswith(b"\n")
    assert out.endswith(tail)
    assert out == reference(data, log.session_id)[0]
    assert (log.state, log.reason) == (EndState.FAILED, "upstream ended mid-event")
    assert log.last_seq == 3


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12))
def test_ndjson_is_logged_and_passed_unchanged(cuts: list[int]) -> None:
    data = load("ollama-chat.ndjson")
    processor = new_processor()
    log = start_stream(processor, "application/x-ndjson")
    out = b"".join(send_body(processor, split_at(data, cuts)))
    assert out == data
    assert logged(log) == data.splitlines(keepends=True)
    assert log.last_seq == 5
    assert log.state is EndState.DONE


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12))
def test_frame_over_the_limit_fails_the_session_and_passes_the_rest(cuts: list[int]) -> None:
    small = b"data: small\n\n"
    big = b"event: big\ndata: " + b"x" * 3000 + b"\n\n"
    data = small * 2 + big + small * 2
    processor = new_processor(max_frame_bytes=1024)
    log = start_stream(processor)
    out = b"".join(send_body(processor, split_at(data, cuts)))

    sid = log.session_id
    tagged = f"id: {sid}:1\ndata: small\n\nid: {sid}:2\ndata: small\n\n".encode()
    assert out == tagged + big + small * 2
    assert logged(log) == [f"id: {sid}:{n}\ndata: small\n\n".encode() for n in (1, 2)]
    assert (log.state, log.reason) == (EndState.FAILED, "event larger than 1024 bytes")


def test_frame_over_the_limit_across_many_chunks_loses_nothing() -> None:
    big = b"data: " + b"x" * 5000 + b"\n\n"
    data = b"data: a\n\n" + big + b"data: b\n\n"
    processor = new_processor(max_frame_bytes=1024)
    log = start_stream(processor)
    out = send_body(processor, [data[i : i + 100] for i in range(0, len(data), 100)])
    assert b"".join(out) == f"id: {log.session_id}:1\n".encode() + data
    assert log.state is EndState.FAILED


def test_finish_cancelled_after_a_partial_stream() -> None:
    data = load("openai-chat-usage.sse")
    store = new_store()
    processor = new_processor(store)
    log = start_stream(processor)
    blocks, _ = reference_blocks(data)
    send_body(processor, [b"".join(blocks[:4]), blocks[4][:10]], end=False)
    processor.finish(EndState.CANCELLED, "client disconnected")
    assert (log.state, log.reason) == (EndState.CANCELLED, "client disconnected")
    assert logged(log) == reference(b"".join(blocks[:4]), log.session_id)[1]
    processor.finish(EndState.DONE)  # the first cause wins
    assert log.state is EndState.CANCELLED
    assert store.get(log.session_id) is log  # still resumable until its TTL


def test_finish_after_a_normal_end_changes_nothing() -> None:
    processor = new_processor()
    log = start_stream(processor)
    send_body(processor, [b"data: 1\n\n"])
    processor.finish(EndState.CANCELLED, "client disconnected")
    assert (log.state, log.reason) == (EndState.DONE, "")


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12))
def test_session_log_limit_mid_stream_leaves_the_rest_untagged(cuts: list[int]) -> None:
    data = load("openai-chat-usage.sse")
    store = new_store(StoreLimits(store_max_bytes=1 << 20, session_max_bytes=2048))
    processor = new_processor(store)
    log = start_stream(processor)

    first_block = len(reference_blocks(data)[0][0])  # alone in its chunk, so it fits
    out = b"".join(send_body(processor, split_at(data, [*cuts, first_block])))

    kept = log.last_seq
    assert 0 < kept < SSE_FIXTURES["openai-chat-usage.sse"]  # the limit hit mid-stream
    expected_out, expected_events = reference(data, log.session_id, tag_first=kept)
    assert out == expected_out
    assert logged(log) == expected_events
    assert (log.state, log.reason) == (EndState.FAILED, "log_limit_exceeded")


def test_log_limit_with_one_event_per_chunk() -> None:
    data = load("openai-chat-usage.sse")
    store = new_store(StoreLimits(store_max_bytes=1 << 20, session_max_bytes=2048))
    processor = new_processor(store)
    log = start_stream(processor)
    blocks, _ = reference_blocks(data)
    out = send_body(processor, blocks)
    _, events = reference(data, log.session_id)
    sizes = itertools.accumulate(len(e) + EVENT_OVERHEAD_BYTES for e in events)
    kept = sum(1 for size in sizes if LOG_OVERHEAD_BYTES + size <= 2048)
    assert log.last_seq == kept
    assert logged(log) == events[:kept]
    assert (log.state, log.reason) == (EndState.FAILED, "log_limit_exceeded")
    assert out[:kept] == events[:kept]  # every block of this fixture is an event
    assert out[kept:] == blocks[kept:]


@pytest.mark.parametrize(
    "size", [0, 1, *range(118, 134), 280, *range(16_370, 16_390), 2_097_151, 2_097_152]
)
def test_body_reply_wire_bytes_are_the_messages_serialization(size: int) -> None:
    """The body reply is hand-encoded (processor._body); it must be byte for byte what the
    protobuf class serializes, across every varint length boundary of the nested fields."""
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    message = ProcessingResponse()
    if data:
        message.response_body.response.body_mutation.body = data
    else:
        message.response_body.response.body_mutation.clear_body = True
    assert processor_module._body(data) == message.SerializeToString()


def test_other_phases_continue_unchanged() -> None:
    processor = new_processor()
    assert on_wire(processor.handle(ProcessingRequest(request_body=HttpBody()))).HasField(
        "request_body"
    )
    trailers = HttpTrailers()
    reply = on_wire(processor.handle(ProcessingRequest(request_trailers=trailers)))
    assert reply.HasField("request_trailers")
    reply = on_wire(processor.handle(ProcessingRequest(response_trailers=trailers)))
    assert reply.HasField("response_trailers")
    assert processor.handle(ProcessingRequest()) is None


# --- ownership and the per-identity session limit ------------------------------------------


def test_inline_sessions_belong_to_envoys_identity_and_a_full_quota_gets_429() -> None:
    store, quota = new_store(), SessionQuota(2)
    owned = []
    for _ in range(2):
        processor = new_processor(store, quota=quota, route=WritePath.INLINE)
        reply = on_wire(processor.handle(request_headers({"x-relay-identity": "key:alice"})))
        assert reply.WhichOneof("response") == "request_headers"
        processor.handle(response_headers(200, "text/event-stream"))
        assert processor.session is not None
        assert processor.session.owner == owner_key("key:alice", None)
        owned.append(processor)

    third = new_processor(store, quota=quota, route=WritePath.INLINE)
    refused = on_wire(third.handle(request_headers({"x-relay-identity": "key:alice"})))
    assert refused.WhichOneof("response") == "immediate_response"
    assert refused.immediate_response.status.code == 429
    assert json.loads(refused.immediate_response.body)["error"]["code"] == "limit_exceeded"
    assert third.session is None

    folded = new_processor(store, quota=quota, route=WritePath.INLINE)
    refused = on_wire(folded.handle(request_headers({"x-relay-identity": "key:alice "})))
    assert refused.immediate_response.status.code == 401  # never read as key:alice
    assert json.loads(refused.immediate_response.body)["error"]["code"] == "invalid_identity"

    other = new_processor(store, quota=quota, route=WritePath.INLINE)
    reply = on_wire(other.handle(request_headers({"x-relay-identity": "key:bob"})))
    assert reply.WhichOneof("response") == "request_headers"  # another identity's own quota

    owned[0].handle(body_chunk(b"data: 1\n\n", end_of_stream=True))  # a session ends: room again
    again = new_processor(store, quota=quota, route=WritePath.INLINE)
    reply = on_wire(again.handle(request_headers({"x-relay-identity": "key:alice"})))
    assert reply.WhichOneof("response") == "request_headers"


def test_the_quota_holds_when_every_request_header_arrives_before_any_response() -> None:
    """The race of a check at the request and a count at the response: 20 generations of one
    caller whose headers all arrive first. The slot is taken with the check, so 2 pass."""
    store, quota = new_store(), SessionQuota(2)
    processors = [new_processor(store, quota=quota, route=WritePath.INLINE) for _ in range(20)]
    replies = [
        on_wire(p.handle(request_headers({"x-relay-identity": "key:alice"}))) for p in processors
    ]
    passed = [p for p, r in zip(processors, replies, strict=True) if r.HasField("request_headers")]
    assert len(passed) == 2
    assert sum(r.immediate_response.status.code == 429 for r in replies) == 18
    for processor in passed:
        processor.handle(response_headers(200, SSE))
    assert len(store) == 2
    for processor in processors:  # every ext_proc stream ends: every slot comes back
        processor.finish(EndState.CANCELLED, "client disconnected")
    assert quota.open(owner_key("key:alice", None)) == 0


def test_a_stream_on_another_route_takes_its_slot_at_the_response() -> None:
    store, quota = new_store(), SessionQuota(1)
    first = new_processor(store, quota=quota)  # no route metadata: not a generation route
    first.handle(request_headers({"x-relay-identity": "key:alice"}))
    assert quota.open(owner_key("key:alice", None)) == 0  # a GET /v1/models takes nothing
    first.handle(response_headers(200, SSE))
    assert first.session is not None
    second = new_processor(store, quota=quota)
    second.handle(request_headers({"x-relay-identity": "key:alice"}))
    refused = on_wire(second.handle(response_headers(200, SSE)))
    assert refused.immediate_response.status.code == 429
    assert second.session is None and len(store) == 1


@pytest.mark.parametrize(
    ("name", "content_type", "model", "prompt", "completion"),
    [
        ("openai-chat-usage.sse", SSE, "gpt-fixture", 12, 9),
        ("openai-responses.sse", SSE, "unknown", 8, 3),
        # message_start reports 15 in, 1 out so far; message_delta's 5 out is the running
        # total (Anthropic's usage is cumulative), and names no model.
        ("anthropic-messages.sse", SSE, "claude-fixture", 15, 5),
        ("ollama-chat.ndjson", "application/x-ndjson", "llama-fixture", 10, 4),
    ],
)
def test_tokens_are_counted_once_per_response_whatever_the_vendor(
    name: str, content_type: str, model: str, prompt: int, completion: int
) -> None:
    metrics = RelayMetrics()
    processor = StreamProcessor(
        new_store(), SessionQuota(), max_event_bytes=MAX_FRAME_BYTES, on_usage=metrics.count_tokens
    )
    start_stream(processor, content_type)
    send_body(processor, [load(name)])
    counted = {
        (sample.labels["model"], sample.labels["kind"]): sample.value
        for family in metrics.collect()
        if family.name == "relay_tokens"
        for sample in family.samples
        if sample.name == "relay_tokens_total"
    }
    assert counted == {(model, "prompt"): prompt, (model, "completion"): completion}


def test_running_usage_totals_count_only_what_each_report_adds() -> None:
    """Servers that report usage on every chunk send running totals, never increments."""
    metrics = RelayMetrics()
    processor = StreamProcessor(
        new_store(), SessionQuota(), max_event_bytes=MAX_FRAME_BYTES, on_usage=metrics.count_tokens
    )
    start_stream(processor)
    chunks = [
        b'data: {"model": "m", "usage": {"prompt_tokens": 7, "completion_tokens": %d}}\n\n' % n
        for n in (1, 2, 3)
    ]
    send_body(processor, chunks)
    sample = metrics.registry.get_sample_value
    assert sample("relay_tokens_total", {"model": "m", "kind": "prompt"}) == 7
    assert sample("relay_tokens_total", {"model": "m", "kind": "completion"}) == 3
