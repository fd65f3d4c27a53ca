"""Tests for extproc.inline.service and extproc.node.process (layer 3): a real relay node on
port 0, spoken to over a real grpc.aio channel the way Envoy's ext_proc filter does: one
message, one reply, in order. Waits are on the session log itself (which wakes on its end)
under a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.access.quota import SessionQuota
from extproc.inline import service
from extproc.node.config import NodeSettings
from extproc.node.metrics import RelayMetrics
from extproc.node.process import RunningNode, start_node
from extproc.session.log import EndState, SessionLog
from extproc.store import MemoryStore
from extproc.vocabulary import WritePath

DEADLINE_S = 5.0
SSE_BODY = b"".join(f'data: {{"n": {n}}}\n\n'.encode() for n in range(1, 7))


@pytest.fixture
async def node() -> AsyncIterator[RunningNode]:
    running = await start_node(NodeSettings())
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture
async def channel(node: RunningNode) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.grpc_port}") as opened:
        yield opened


class ExtProcStream:
    """One ext_proc gRPC stream driven like Envoy in STREAMED mode: send, then read the reply."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._outbox: asyncio.Queue[ProcessingRequest | None] = asyncio.Queue()
        self.call = ExternalProcessorStub(channel).Process(self._requests())

    async def _requests(self) -> AsyncIterator[ProcessingRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    async def exchange(self, request: ProcessingRequest) -> ProcessingResponse:
        await self._outbox.put(request)
        async with asyncio.timeout(DEADLINE_S):
            reply = await self.call.read()
        assert isinstance(reply, ProcessingResponse)
        return reply

    async def half_close(self) -> grpc.StatusCode:
        """Envoy closes its side (it needs nothing more); the server ends the call."""
        await self._outbox.put(None)
        async with asyncio.timeout(DEADLINE_S):
            assert await self.call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
            code: grpc.StatusCode = await self.call.code()
        return code


def headers(pairs: dict[str, str]) -> HttpHeaders:
    values = [HeaderValue(key=key, raw_value=value.encode()) for key, value in pairs.items()]
    return HttpHeaders(headers=HeaderMap(headers=values))


def request_headers() -> ProcessingRequest:
    return ProcessingRequest(request_headers=headers({":method": "POST", ":path": "/v1/chat"}))


def response_headers(content_type: str) -> ProcessingRequest:
    return ProcessingRequest(
        response_headers=headers({":status": "200", "content-type": content_type})
    )


def body(data: bytes, *, end_of_stream: bool = False) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=data, end_of_stream=end_of_stream))


def replied_body(reply: ProcessingResponse) -> bytes:
    mutation = reply.response_body.response.body_mutation
    if mutation.WhichOneof("mutation") == "clear_body":
        assert mutation.clear_body is True
        return b""
    assert mutation.WhichOneof("mutation") == "body"
    return bytes(mutation.body)


async def open_session(stream: ExtProcStream, node: RunningNode) -> SessionLog:
    """Request and response headers of a 200 event stream; returns the session it opened."""
    reply = await stream.exchange(request_headers())
    assert reply.WhichOneof("response") == "request_headers"
    reply = await stream.exchange(response_headers("text/event-stream"))
    assert reply.WhichOneof("response") == "response_headers"
    (option,) = reply.response_headers.response.header_mutation.set_headers
    assert option.header.key == "x-relay-session"
    return node.store.get(option.header.raw_value.decode())


async def wait_for_end(log: SessionLog) -> None:
    """Return once the log has ended (its waiters wake on end), or fail at the deadline."""
    async with asyncio.timeout(DEADLINE_S):
        while log.state is EndState.OPEN and not log.gone_reason:
            await log.wait_beyond(log.last_seq)


async def test_stream_is_tagged_and_logged_through_grpc(
    node: RunningNode, channel: grpc.aio.Channel
) -> None:
    stream = ExtProcStream(channel)
    log = await open_session(stream, node)
    chunks = [SSE_BODY[:5], SSE_BODY[5:40], SSE_BODY[40:-3], SSE_BODY[-3:]]
    out = []
    for n, chunk in enumerate(chunks):
        reply = await stream.exchange(body(chunk, end_of_stream=n == len(chunks) - 1))
        assert reply.WhichOneof("response") == "response_body"
        out.append(replied_body(reply))
    assert out[0] == b""  # a partial event is held back with an empty reply
    sid = log.session_id
    expected = b"".join(f'id: {sid}:{n}\ndata: {{"n": {n}}}\n\n'.encode() for n in range(1, 7))
    assert b"".join(out) == expected
    assert b"".join(log.events_after(0, 100)) == expected
    assert log.state is EndState.DONE
    assert await stream.half_close() is grpc.StatusCode.OK
    assert log.state is EndState.DONE  # the stream's end does not override a normal end


async def test_non_stream_response_opens_no_session(
    node: RunningNode, channel: grpc.aio.Channel
) -> None:
    stream = ExtProcStream(channel)
    await stream.exchange(request_headers())
    reply = await stream.exchange(response_headers("application/json"))
    assert not reply.response_headers.HasField("response")
    reply = await stream.exchange(body(b'{"ok": true}', end_of_stream=True))
    assert not reply.response_body.HasField("response")
    assert await stream.half_close() is grpc.StatusCode.OK
    assert len(node.store) == 0


async def test_cancelled_call_ends_the_session_cancelled(
    node: RunningNode, channel: grpc.aio.Channel
) -> None:
    stream = ExtProcStream(channel)
    log = await open_session(stream, node)
    await stream.exchange(body(SSE_BODY[:30]))
    assert log.last_seq == 1 and log.state is EndState.OPEN
    stream.call.cancel()  # Envoy resets the gRPC stream: the client went away mid-stream
    await wait_for_end(log)
    assert (log.state, log.reason) == (EndState.CANCELLED, "client disconnected")
    assert log.last_seq == 1
    assert node.store.get(log.session_id) is log  # kept for resuming until its TTL


async def test_envoy_closing_early_ends_an_open_session_cancelled(
    node: RunningNode, channel: grpc.aio.Channel
) -> None:
    stream = ExtProcStream(channel)
    log = await open_session(stream, node)
    await stream.exchange(body(SSE_BODY[:30]))
    assert await stream.half_close() is grpc.StatusCode.OK
    await wait_for_end(log)
    assert log.state is EndState.CANCELLED


async def test_concurrent_streams_get_their_own_sessions(
    node: RunningNode, channel: grpc.aio.Channel
) -> None:
    async def one_stream(n: int) -> SessionLog:
        stream = ExtProcStream(channel)
        log = await open_session(stream, node)
        data = f"data: stream {n}\n\n".encode()
        reply = await stream.exchange(body(data, end_of_stream=True))
        assert replied_body(reply) == f"id: {log.session_id}:1\n".encode() + data
        assert await stream.half_close() is grpc.StatusCode.OK
        return log

    logs = await asyncio.gather(*(one_stream(n) for n in range(5)))
    assert len({log.session_id for log in logs}) == 5
    assert len(node.store) == 5
    assert all(log.state is EndState.DONE for log in logs)


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(DEADLINE_S):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


class HeldDoneStore(MemoryStore):
    """Holds every `done`, as a shared store does until Redis has it (here: never)."""

    def __init__(self) -> None:
        super().__init__(metrics=RelayMetrics())
        self.created: list[SessionLog] = []

    def create(self, *, content_type: str, write_path: WritePath, owner: str = "") -> SessionLog:
        log = super().create(content_type=content_type, write_path=write_path, owner=owner)
        self.created.append(log)
        return log

    def end(self, log: SessionLog, state: EndState, reason: str = "") -> None:
        if state is not EndState.DONE:
            super().end(log, state, reason)


class NoMetadata:
    """The servicer context of a route that sends no ext_proc metadata."""

    def invocation_metadata(self) -> tuple[()]:
        return ()


@pytest.mark.timeout(10)  # the bug this guards against spun without ever yielding
async def test_a_settling_session_the_store_drops_cuts_the_client() -> None:
    """The last reply waits for the store to record `done`; if the store evicts the log
    meanwhile, it never will: the client is cut at once, and the node does not hang."""
    store = HeldDoneStore()
    servicer = service.ExternalProcessor(
        store, SessionQuota(), RelayMetrics(), max_event_bytes=1 << 20
    )

    async def envoy() -> AsyncIterator[ProcessingRequest]:
        yield request_headers()
        yield response_headers("text/event-stream")
        yield body(b"data: 1\n\n", end_of_stream=True)

    replies = servicer.Process(envoy(), NoMetadata())
    async with asyncio.timeout(DEADLINE_S):
        await anext(replies)  # request headers
        await anext(replies)  # response headers: the session opens
        last = asyncio.create_task(anext(replies))
        await asyncio.sleep(0)  # the last reply waits for `done`
        assert not last.done()
        (session,) = store.created
        session.drop("evicted")
        reply = await last
        await replies.aclose()
    assert isinstance(reply, ProcessingResponse)
    assert reply.immediate_response.details == "relay_session_cut"
