"""Readers end to end through Envoy: SSE, WebSocket (`websockets`) and gRPC (`grpcio`) read the
same log with the same cursor format; live tail, late joiners, multicast, cancel, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import grpc
import httpx
import pytest
from conftest import FIXTURES, make_stack
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from extproc.ops.supervisor import Stack
from extproc.proto.relay.v1 import relay_pb2_grpc
from extproc.proto.relay.v1.relay_pb2 import SubscribeRequest
from extproc.readers.cursors import event_fields
from extproc.session.framing import SseFramer
from extproc.session.log import SessionLog, WritePath

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30
SSE_HEADERS = {"content-type": "text/event-stream"}


class Ev(NamedTuple):
    id: str
    event: str | None
    data: str


Read = tuple[list[Ev], dict[str, object]]  # the events, then how the session ended


def chat(max_tokens: int = 12, prompt: str = "hello readers") -> dict[str, object]:
    messages = [{"role": "user", "content": prompt}]
    return {"model": "demo-llm", "messages": messages, "max_tokens": max_tokens, "stream": True}


def _ev(e: ServerSentEvent) -> Ev:
    return Ev(e.id, None if e.event == "message" else e.event, e.data)


@contextlib.asynccontextmanager
async def generation(
    stack: Stack, max_tokens: int = 12, rate: float | None = None
) -> AsyncIterator[tuple[str, AsyncIterator[ServerSentEvent]]]:
    """A streamed POST: the session id and the original client's events, as they come."""
    headers = {} if rate is None else {"x-demo-rate": str(rate)}
    url = f"{stack.base_url}/v1/chat/completions"
    async with (
        httpx.AsyncClient(timeout=TIMEOUT_S) as client,
        aconnect_sse(client, "POST", url, json=chat(max_tokens), headers=headers) as source,
    ):
        assert source.response.status_code == 200
        yield source.response.headers["x-relay-session"], source.aiter_sse()


async def finished(stack: Stack, max_tokens: int = 12) -> tuple[str, list[Ev]]:
    async with generation(stack, max_tokens) as (session, original):
        return session, [_ev(e) async for e in original]


async def read_sse(stack: Stack, session: str, last_event_id: str = "") -> Read:
    url = f"{stack.base_url}/relay/v1/sessions/{session}/events"
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    async with (
        httpx.AsyncClient(timeout=TIMEOUT_S) as client,
        aconnect_sse(client, "GET", url, headers=headers) as source,
    ):
        events = [e async for e in source.aiter_sse()]
    assert events[-1].event == "relay.end"
    return [_ev(e) for e in events[:-1]], json.loads(events[-1].data)


def ws_url(stack: Stack, session: str, after: str = "") -> str:
    base = stack.base_url.replace("http://", "ws://", 1)
    return f"{base}/relay/v1/sessions/{session}/ws" + (f"?after={after}" if after else "")


async def read_ws(
    stack: Stack, session: str, after: str = "", *, started: asyncio.Event | None = None
) -> Read:
    events: list[Ev] = []
    message: dict[str, Any] = {}
    async with ws_connect(ws_url(stack, session, after)) as conn:
        async for text in conn:  # ends at a normal close (1000); raises on any other
            if started is not None:
                started.set()
            message = json.loads(text)
            if message["type"] != "event":
                break
            assert message["id"] == f"{session}:{message['seq']}"
            events.append(Ev(message["id"], message["event"], message["data"]))
        await conn.wait_closed()
        assert conn.close_code == 1000
        assert message["type"] == "end"
    return events, message


def grpc_target(stack: Stack) -> str:
    return str(urlsplit(stack.base_url).netloc)  # Envoy serves h2c on the same listener


async def read_grpc(
    stack: Stack, session: str, after: str = "", *, started: asyncio.Event | None = None
) -> Read:
    events: list[Ev] = []
    end: dict[str, object] = {}
    async with grpc.aio.insecure_channel(grpc_target(stack)) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Subscribe(
            SubscribeRequest(session=session, after=after)
        )
        async for response in call:
            if started is not None:
                started.set()
            assert not end, "nothing may follow End"
            if response.WhichOneof("kind") == "event":
                e = response.event
                assert e.id.rpartition(":")[2] == str(e.seq)
                events.append(Ev(e.id, e.event or None, e.data))
            else:
                end = {
                    "state": response.end.state,
                    "reason": response.end.reason,
                    "last_seq": response.end.last_seq,
                }
        assert await call.code() == grpc.StatusCode.OK
    return events, end


async def grpc_error(
    stack: Stack, session: str, started: asyncio.Event | None = None, *, after: str = ""
) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(grpc_target(stack)) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Subscribe(
            SubscribeRequest(session=session, after=after)
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in call:
                if started is not None:
                    started.set()
    return failure.value.code()


async def ws_refusal(url: str) -> tuple[int, str]:
    """The HTTP status and error code of a WebSocket handshake the relay refused."""
    with pytest.raises(InvalidStatus) as refused:
        async with ws_connect(url):
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}")["error"]["code"]


async def session_info(stack: Stack, session: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        return dict((await client.get(f"{stack.base_url}/relay/v1/sessions/{session}")).json())


async def readers_of(stack: Stack, session: str) -> int:
    return int(str((await session_info(stack, session))["readers"]))


async def until_readers(stack: Stack, session: str, expected: int) -> None:
    """Poll (bounded by the caller's timeout) until the relay counts `expected` readers: the
    one thing a client cannot be told, because the reader it left is what would tell it."""
    while await readers_of(stack, session) != expected:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


def ending(read: Read) -> tuple[object, object]:
    return read[1]["state"], read[1]["last_seq"]


async def test_full_read_over_ws_and_grpc_equals_sse(stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        session, original = await finished(stack)
        sse, ws, rpc = await asyncio.gather(
            read_sse(stack, session), read_ws(stack, session), read_grpc(stack, session)
        )
    assert len(original) == 15 and original[-1].data == "[DONE]"  # role + 12 + finish + DONE
    assert [e.id for e in original] == [f"{session}:{n}" for n in range(1, 16)]
    assert sse[0] == ws[0] == rpc[0] == original
    assert ending(sse) == ending(ws) == ending(rpc) == ("done", 15)


async def test_after_resumes_mid_session(stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        session, events = await finished(stack)
        for k in (0, 1, 7, len(events)):
            after = f"{session}:{k}"
            ws, rpc = await asyncio.gather(
                read_ws(stack, session, after), read_grpc(stack, session, after)
            )
            assert ws[0] == rpc[0] == events[k:], k
            assert ending(ws) == ending(rpc) == ("done", len(events))


async def test_one_cursor_for_all_protocols(stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        session, events = await finished(stack)
        from_sse = (await read_sse(stack, session))[0][3].id  # an id received over SSE
        ws, rpc = await asyncio.gather(
            read_ws(stack, session, from_sse), read_grpc(stack, "", from_sse)
        )
        assert ws[0] == rpc[0] == events[4:]
        from_grpc = (await read_grpc(stack, session))[0][8].id  # an id received over gRPC
        sse, ws = await asyncio.gather(
            read_sse(stack, session, last_event_id=from_grpc), read_ws(stack, session, from_grpc)
        )
        assert sse[0] == ws[0] == events[9:]


async def test_live_tail_and_multicast(stack: Stack) -> None:
    """Nine readers (3 WS, 3 gRPC, 3 SSE) of one live session see the identical sequence."""
    async with asyncio.timeout(TIMEOUT_S):
        async with generation(stack, max_tokens=20, rate=20) as (session, original):
            assert (await session_info(stack, session))["state"] == "open"
            readers = asyncio.gather(
                *(read(stack, session) for read in (read_ws, read_grpc, read_sse) for _ in "abc")
            )
            own = [_ev(e) async for e in original]
            reads = await readers
    assert len(own) == 23
    for read in reads:
        assert read[0] == own
        assert ending(read) == ("done", 23)


async def test_late_joiner_gets_history_then_live(stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        async with generation(stack, max_tokens=20, rate=20) as (session, original):
            head = [_ev(await anext(original)) for _ in range(5)]
            assert (await session_info(stack, session))["state"] == "open"
            readers = asyncio.gather(read_ws(stack, session), read_grpc(stack, session))
            rest = [_ev(e) async for e in original]
            ws, rpc = await readers
    assert len(rest) == 18  # the readers joined while most of it was still to come
    assert ws[0] == rpc[0] == head + rest
    assert ending(ws) == ending(rpc) == ("done", 23)


async def test_errors_are_typed_before_the_upgrade_and_as_grpc_codes(stack: Stack) -> None:
    unknown = "A" * 22
    async with asyncio.timeout(TIMEOUT_S):
        session, _ = await finished(stack)
        assert await ws_refusal(ws_url(stack, unknown)) == (404, "session_not_found")
        for after in ("nonsense", f"{session}:x", f"{unknown}:1"):  # the last: another session's
            assert await ws_refusal(ws_url(stack, session, after)) == (400, "malformed_event_id")
        path_id = await ws_refusal(ws_url(stack, "short"))  # a bad path id, not an event id
        assert path_id == (400, "invalid_argument")
        assert await grpc_error(stack, unknown) == grpc.StatusCode.NOT_FOUND
        assert await grpc_error(stack, "", after=f"{unknown}:3") == grpc.StatusCode.NOT_FOUND
        assert (
            await grpc_error(stack, session, after="nonsense") == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            await grpc_error(stack, session, after=f"{unknown}:1")
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await grpc_error(stack, "short") == grpc.StatusCode.INVALID_ARGUMENT


async def test_dropped_session_is_said_out_loud(tmp_path: Path) -> None:
    """Readers waiting on a log the store evicts get session_gone (WS close 1011, gRPC
    NOT_FOUND); later readers get 410 before the upgrade."""
    limits = ("--store-max-bytes", str(1 << 20), "--session-max-bytes", str(1 << 20))
    small = await asyncio.to_thread(make_stack, tmp_path, relay_args=limits)
    try:
        async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            quiet = {"x-demo-rate": "0.01"}  # one event now, the next in 100 s
            async with client.stream(
                "POST", f"{small.base_url}/v1/chat/completions", json=chat(), headers=quiet
            ) as original:
                session = original.headers["x-relay-session"]
                async with ws_connect(ws_url(small, session)) as ws:
                    assert json.loads(await ws.recv())["seq"] == 1  # attached
                    rpc = asyncio.create_task(
                        grpc_error(small, session, attached := asyncio.Event())
                    )
                    await attached.wait()
                    for prompt in ("fill", "the store"):  # two big sessions evict the quiet one
                        big = chat(max_tokens=2500, prompt=prompt)
                        url = f"{small.base_url}/v1/chat/completions"
                        await client.post(url, json=big, headers={"x-demo-rate": "0"})
                    message = json.loads(await ws.recv())
                    assert message["type"] == "error" and message["code"] == "session_gone"
                    await ws.wait_closed()
                    assert ws.close_code == 1011
                assert await rpc == grpc.StatusCode.NOT_FOUND
            assert await ws_refusal(ws_url(small, session)) == (410, "session_gone")
            assert await grpc_error(small, session) == grpc.StatusCode.NOT_FOUND
    finally:
        await asyncio.to_thread(small.stop)


async def test_cancelled_detached_session_ends_cancelled(detached_stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        async with generation(detached_stack, max_tokens=400, rate=20) as (session, original):
            await anext(original)
            attached = [asyncio.Event(), asyncio.Event()]
            ws = asyncio.create_task(read_ws(detached_stack, session, started=attached[0]))
            rpc = asyncio.create_task(read_grpc(detached_stack, session, started=attached[1]))
            await asyncio.gather(*(e.wait() for e in attached))
            cancel = await client.delete(f"{detached_stack.base_url}/relay/v1/sessions/{session}")
        assert cancel.status_code == 200 and cancel.json()["state"] == "cancelled"
        for read in await asyncio.gather(ws, rpc):
            assert read[1]["state"] == "cancelled"
            assert read[1]["last_seq"] == len(read[0]) < 403
            assert [e.id for e in read[0]] == [f"{session}:{n}" for n in range(1, len(read[0]) + 1)]


async def test_readers_that_leave_stop_at_once(stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        async with generation(stack, max_tokens=60, rate=20) as (session, original):
            await anext(original)
            info = await session_info(stack, session)
            alone = 1 if info["write_path"] == "detached" else 0  # the first client reads too
            await until_readers(stack, session, alone)
            async with ws_connect(ws_url(stack, session)) as ws:
                await ws.recv()  # attached: it sends
                await until_readers(stack, session, alone + 1)
                async with asyncio.timeout(2):  # the relay answers the close frame promptly
                    await ws.close()
            await until_readers(stack, session, alone)
            async with grpc.aio.insecure_channel(grpc_target(stack)) as channel:
                call = relay_pb2_grpc.RelayStub(channel).Subscribe(
                    SubscribeRequest(session=session)
                )
                await anext(aiter(call))
                await until_readers(stack, session, alone + 1)
                call.cancel()
            await until_readers(stack, session, alone)


async def test_reflection_and_health_through_envoy(stack: Stack) -> None:
    async with asyncio.timeout(TIMEOUT_S), grpc.aio.insecure_channel(grpc_target(stack)) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="relay.v1.Relay"),
        ]
        listed, found = [r async for r in reflect.ServerReflectionInfo(iter(requests))]
        names = {s.name for s in listed.list_services_response.service}
        assert {"relay.v1.Relay", "grpc.health.v1.Health"} <= names
        files = found.file_descriptor_response.file_descriptor_proto
        assert (
            descriptor_pb2.FileDescriptorProto.FromString(files[0]).name == "relay/v1/relay.proto"
        )
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_ndjson_events_are_lines(stack: Stack) -> None:
    body = {"model": "demo-llm", "messages": [{"role": "user", "content": "lines"}],
            "options": {"num_predict": 6}}  # fmt: skip
    async with asyncio.timeout(TIMEOUT_S), httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        response = await client.post(f"{stack.base_url}/api/chat", json=body)
        session = response.headers["x-relay-session"]
        lines = response.content.decode().splitlines()
        sse, ws, rpc = await asyncio.gather(
            read_sse(stack, session), read_ws(stack, session), read_grpc(stack, session)
        )
    expected = [Ev(f"{session}:{n}", None, line) for n, line in enumerate(lines, 1)]
    assert len(expected) == 7 and sse[0] == ws[0] == rpc[0] == expected


@pytest.mark.parametrize(
    "fixture", ["anthropic-messages.sse", "openai-responses.sse", "crlf-comments-multiline.sse"]
)
def test_event_fields_agree_with_a_standard_sse_parser(fixture: str) -> None:
    """The `event` and `data` that WS and gRPC readers get are what httpx-sse makes of the block."""
    raw = (FIXTURES / fixture).read_bytes()
    framer = SseFramer()
    frames = [*framer.feed(raw), *filter(None, [framer.close()])]
    log = SessionLog("A" * 22, content_type="text/event-stream", write_path=WritePath.DETACHED)
    ours = [event_fields(log, f.raw) for f in frames if f.is_event]
    ok = httpx.MockTransport(lambda _: httpx.Response(200, content=raw, headers=SSE_HEADERS))
    with httpx.Client(transport=ok) as client, connect_sse(client, "GET", "http://x/") as source:
        theirs = [(e.event, e.data) for e in source.iter_sse() if e.data or e.retry is None]
    assert len(ours) >= 3
    assert [(name or "message", data) for name, data in ours] == theirs


def test_generated_code_is_what_protoc_makes_of_the_proto(tmp_path: Path) -> None:
    """Regenerate as extproc/proto/__init__.py says; the committed files must not drift."""
    pytest.importorskip("grpc_tools.protoc")
    from grpc_tools import grpc_version

    generated = ROOT / "extproc/proto/relay/v1"
    made_with = re.search(
        r"GRPC_GENERATED_VERSION = '(.+)'", (generated / "relay_pb2_grpc.py").read_text()
    )
    if made_with is None or made_with.group(1) != grpc_version.VERSION:
        pytest.skip(f"grpcio-tools {grpc_version.VERSION} is not the version that made the code")
    outs = [f"--{kind}_out={tmp_path}" for kind in ("python", "pyi", "grpc_python")]
    protoc = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iproto",
        *outs,
        "proto/relay/v1/relay.proto",
    ]
    subprocess.run(protoc, cwd=ROOT, check=True, timeout=60)
    fresh = tmp_path / "relay/v1"
    stub = fresh / "relay_pb2_grpc.py"
    stub.write_text(
        re.sub(
            r"(?m)^from relay\.v1 import", "from extproc.proto.relay.v1 import", stub.read_text()
        )
    )
    for name in ("relay_pb2.py", "relay_pb2.pyi", "relay_pb2_grpc.py"):
        assert (fresh / name).read_bytes() == (generated / name).read_bytes(), name
