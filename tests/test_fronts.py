"""The reader fronts in process (layer 3 without Envoy): the node's real aiohttp app and gRPC
servicer on port 0 over a memory store, driven by real clients. Cursor arithmetic, how each
protocol ends, error mapping and share-token cuts are checked here, in milliseconds; the
end-to-end tiers check the same fronts behind a real Envoy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from aiohttp import web
from multidict import CIMultiDict

from extproc.access.grants import Access
from extproc.access.quota import UNCOUNTED, SessionQuota
from extproc.detached.generations import DetachSettings, Generations
from extproc.errors import RelayUnavailable, SessionNotFound
from extproc.node.metrics import RelayMetrics
from extproc.proto.relay.v1 import relay_pb2_grpc
from extproc.proto.relay.v1.relay_pb2 import SubscribeRequest, SubscribeResponse
from extproc.readers import grpc_relay
from extproc.readers.app import make_app
from extproc.readers.http import Node
from extproc.readers.registry import SHARE_CHECK_S, ReaderLimits, ReaderRegistry
from extproc.session.framing import framing_of, new_framer
from extproc.session.log import Cursor, EndState, SessionLog, WritePath
from extproc.session.writer import SessionWriter
from extproc.store import MemoryStore
from extproc.vocabulary import ReaderProtocol

TIMEOUT_S = 10.0
ALICE = {"x-relay-identity": "key:alice"}
BOB = {"x-relay-identity": "key:bob"}


@dataclass
class Relay:
    node: Node
    http: str
    grpc: str
    changed: asyncio.Event  # set whenever a session's reader count changes

    async def readers_become(self, session_id: str, count: int) -> None:
        """Wait (event-driven) until `session_id` has `count` readers on this node."""
        while self.node.readers.readers(session_id) != count:
            self.changed.clear()
            await self.changed.wait()

    def session(
        self, body: bytes, *, content_type: str = "text/event-stream", owner: str = ""
    ) -> SessionLog:
        """A session written as the writer does it (tagged), left open."""
        store = self.node.store
        log = store.create(content_type=content_type, write_path=WritePath.INLINE, owner=owner)
        framing = framing_of(content_type)
        assert framing is not None
        writer = SessionWriter(store, log, new_framer(framing), on_usage=lambda usage: None)
        writer.feed(body)
        return log

    def finish(self, log: SessionLog, body: bytes = b"") -> None:
        self.node.store.append(log, [body]) if body else None
        self.node.store.end(log, EndState.DONE)


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    metrics = RelayMetrics()
    store = MemoryStore(metrics=metrics)
    generations = Generations(store, DetachSettings(), metrics, max_event_bytes=1 << 20)
    changed = asyncio.Event()
    readers = ReaderRegistry(
        ReaderLimits(max_readers_per_session=3),
        metrics,
        on_change=lambda session_id, count: changed.set(),
    )
    node = Node(store, readers, generations, SessionQuota(), metrics)
    runner = web.AppRunner(make_app(node), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = grpc.aio.server()
    grpc_relay.add_to_server(grpc_relay.RelayServicer(store, readers, metrics), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    watcher = asyncio.create_task(readers.watch_shares(store.valid_shares))
    try:
        http = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield Relay(node, http, f"127.0.0.1:{grpc_port}", changed)
    finally:
        watcher.cancel()
        await server.stop(0)
        await runner.cleanup()
        await generations.close()


def sse_events(n: int, start: int = 1) -> bytes:
    return b"".join(b'data: {"n": %d}\n\n' % i for i in range(start, start + n))


async def get(relay: Relay, path: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(relay.http + path, headers=headers) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


async def subscribe(relay: Relay, **fields: str) -> list[SubscribeResponse]:
    async with grpc.aio.insecure_channel(relay.grpc) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Subscribe(SubscribeRequest(**fields))
        return [message async for message in call]


def ids(body: bytes) -> list[str]:
    return [line[4:].decode() for line in body.splitlines() if line.startswith(b"id: ")]


async def test_events_resume_after_an_id_and_end_one_past_the_last(relay: Relay) -> None:
    log = relay.session(sse_events(5))
    relay.finish(log)
    sid = log.session_id
    status, body, headers = await get(relay, f"/relay/v1/sessions/{sid}/events?after={sid}:2")
    assert status == 200 and headers["x-relay-session"] == sid
    assert ids(body) == [f"{sid}:3", f"{sid}:4", f"{sid}:5", f"{sid}:6"]  # 6: relay.end
    end = body.split(b"\n\n")[-2]
    assert b"event: relay.end" in end
    assert json.loads(end.rsplit(b"data: ", 1)[1]) == {
        "state": "done",
        "reason": "",
        "last_seq": 5,
    }
    # Last-Event-ID wins over ?after=; the end's own id says "nothing more": 204.
    status, body, _ = await get(
        relay, f"/relay/v1/sessions/{sid}/events?after={sid}:0", **{"Last-Event-ID": f"{sid}:4"}
    )
    assert ids(body) == [f"{sid}:5", f"{sid}:6"]
    assert (await get(relay, f"/relay/v1/sessions/{sid}/events?after={sid}:6"))[0] == 204
    # Past the end of an ended session: that history is not here.
    status, body, _ = await get(relay, f"/relay/v1/sessions/{sid}/events?after={sid}:7")
    assert (status, json.loads(body)["error"]["code"]) == (410, "session_gone")


async def test_an_id_not_yet_sent_or_of_another_session_is_malformed(relay: Relay) -> None:
    log, other = relay.session(sse_events(2)), relay.session(sse_events(1))
    sid = log.session_id
    for after in (f"{sid}:3", f"{other.session_id}:1", "nonsense", f"{sid}:-1"):
        status, body, _ = await get(relay, f"/relay/v1/sessions/{sid}/events?after={after}")
        assert (status, json.loads(body)["error"]["code"]) == (400, "malformed_event_id"), after


@pytest.mark.parametrize("content_type", ["text/event-stream", "Text/Event-Stream; charset=utf-8"])
async def test_every_protocol_reads_an_sse_session_as_events_whatever_the_case(
    relay: Relay, content_type: str
) -> None:
    """The framing is recorded on the log once: a media type in another case is the same."""
    log = relay.session(
        b"event: delta\ndata: one\n\ndata: two\ndata: lines\n\n", content_type=content_type
    )
    relay.finish(log)
    sid = log.session_id
    _, body, _ = await get(relay, f"/relay/v1/sessions/{sid}/events")
    assert body.count(b"id: ") == 3 and b"data: id:" not in body  # not wrapped a second time
    messages = await subscribe(relay, session=sid)
    events = [(m.event.event, m.event.data) for m in messages if m.WhichOneof("kind") == "event"]
    assert events == [("delta", "one"), ("", "two\nlines")]
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(relay.http.replace("http", "ws") + f"/relay/v1/sessions/{sid}/ws") as ws,
    ):
        received = [json.loads(m.data) async for m in ws]
    assert [(m.get("event"), m.get("data")) for m in received[:2]] == [
        ("delta", "one"),
        (None, "two\nlines"),
    ]
    assert received[-1] == {"type": "end", "state": "done", "reason": "", "last_seq": 2}


async def test_ndjson_lines_are_wrapped_as_sse_events_with_relay_ids(relay: Relay) -> None:
    log = relay.session(b'{"a": 1}\n{"b": 2}\r\n', content_type="application/x-ndjson")
    relay.finish(log)
    sid = log.session_id
    _, body, _ = await get(relay, f"/relay/v1/sessions/{sid}/events")
    assert body.startswith(
        f'id: {sid}:1\ndata: {{"a": 1}}\n\nid: {sid}:2\ndata: {{"b": 2}}\n\n'.encode()
    )


async def test_errors_are_mapped_once_per_protocol(relay: Relay) -> None:
    unknown = "Q" * 22
    cases = {
        "/relay/v1/sessions/short/events": (400, "invalid_argument"),
        f"/relay/v1/sessions/{unknown}/events": (404, "session_not_found"),
        f"/relay/v1/sessions/{unknown}": (404, "session_not_found"),
    }
    for path, expected in cases.items():
        status, body, headers = await get(relay, path)
        assert (status, json.loads(body)["error"]["code"]) == expected, path
        assert headers["Content-Type"].startswith("application/json")
    log = relay.session(sse_events(1))
    long_token = {"x-relay-share": "t" * 129}
    status, body, _ = await get(relay, f"/relay/v1/sessions/{log.session_id}", **long_token)
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_argument")
    async with aiohttp.ClientSession() as client:
        url = f"{relay.http}/relay/v1/sessions/{log.session_id}/share?ttl=never"
        async with client.post(url) as response:
            assert response.status == 400  # a bad ttl is a bad argument, not a limit
            assert (await response.json())["error"]["code"] == "invalid_argument"
    for fields, code in (
        ({"session": "short"}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"session": unknown}, grpc.StatusCode.NOT_FOUND),
        ({"after": "nonsense"}, grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await subscribe(relay, **fields)
        assert refused.value.code() == code, fields


async def test_a_session_that_did_not_end_done_is_cut_on_the_original_endpoint(
    relay: Relay,
) -> None:
    log = relay.session(sse_events(2))
    relay.node.store.end(log, EndState.FAILED, "upstream ended mid-event")
    async with aiohttp.ClientSession() as client:
        response = await client.post(
            f"{relay.http}/_relay/resume/v1/chat/completions",
            headers={"Last-Event-ID": f"{log.session_id}:1"},
        )
        with pytest.raises(aiohttp.ClientPayloadError):  # no final chunk: an incomplete body
            await response.read()


async def test_readers_per_session_are_limited_with_a_typed_429(relay: Relay) -> None:
    log = relay.session(sse_events(1))  # open: readers stay attached
    path = f"{relay.http}/relay/v1/sessions/{log.session_id}/events"
    async with aiohttp.ClientSession() as client:
        held = [await client.get(path) for _ in range(3)]
        try:
            async with client.get(path) as refused:
                assert refused.status == 429
                assert (await refused.json())["error"]["code"] == "limit_exceeded"
        finally:
            for response in held:
                response.close()


async def _mint(relay: Relay, session: str, ttl: float = 600) -> dict[str, str]:
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{relay.http}/relay/v1/sessions/{session}/share?ttl={ttl}", headers=ALICE
        ) as response,
    ):
        assert response.status == 201, await response.text()
        return dict(await response.json())


async def _first_event_then_end(stream: aiohttp.StreamReader) -> bytes:
    """Read until the first event has arrived, then everything until the server ends it."""
    head = await stream.readuntil(b"\n\n")
    return head + await stream.read()


@pytest.mark.parametrize("protocol", list(ReaderProtocol.__members__.values())[1:])
async def test_revoking_a_share_token_cuts_its_attached_readers(
    relay: Relay, protocol: ReaderProtocol
) -> None:
    log = relay.session(sse_events(1), owner=_owner("key:alice"))
    sid = log.session_id
    token = await _mint(relay, sid)
    bob = BOB | {"x-relay-share": token["token"]}
    readers = relay.node.readers
    async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as client:
        reading = asyncio.create_task(_read_as(relay, client, protocol, sid, bob))
        await relay.readers_become(sid, 1)
        async with client.delete(
            f"{relay.http}/relay/v1/sessions/{sid}/share/{token['token_id']}", headers=ALICE
        ) as revoked:
            assert revoked.status == 204
        revoked_at = asyncio.get_running_loop().time()
        outcome = await reading
        assert asyncio.get_running_loop().time() - revoked_at < 1.0  # the bound: under 1 s
    relay.node.store.append(log, [b"id: x\ndata: after\n\n"])  # nothing more reaches bob
    assert outcome == "cut", outcome
    assert readers.readers(sid) == 0


async def test_an_expiring_share_token_cuts_its_reader_within_a_second(relay: Relay) -> None:
    log = relay.session(sse_events(1), owner=_owner("key:alice"))
    sid = log.session_id
    token = await _mint(relay, sid, ttl=0.3)
    bob = BOB | {"x-relay-share": token["token"]}
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT_S), aiohttp.ClientSession() as client:
        started = loop.time()
        assert await _read_as(relay, client, ReaderProtocol.SSE, sid, bob) == "cut"
    assert loop.time() - started < 0.3 + SHARE_CHECK_S + 0.5


def _owner(identity: str) -> str:
    from extproc.access.identity import owner_key

    return owner_key(identity, None)


async def _read_as(
    relay: Relay,
    client: aiohttp.ClientSession,
    protocol: ReaderProtocol,
    session: str,
    headers: dict[str, str],
) -> str:
    """Attach as a reader and report how it ended: "cut" when the relay stopped it."""
    if protocol is ReaderProtocol.SSE:
        async with client.get(
            f"{relay.http}/relay/v1/sessions/{session}/events", headers=headers
        ) as response:
            assert response.status == 200
            try:
                body = await _first_event_then_end(response.content)
            except aiohttp.ClientPayloadError:
                return "cut"
            return "cut" if b": relay: no session" in body else f"ended: {body!r}"
    if protocol is ReaderProtocol.WS:
        url = relay.http.replace("http", "ws") + f"/relay/v1/sessions/{session}/ws"
        async with client.ws_connect(url, headers=headers) as ws:
            messages = [json.loads(m.data) async for m in ws]
        error = messages[-1]
        return (
            "cut"
            if error
            == {"type": "error", "code": "session_not_found", "message": f"no session {session}"}
            else repr(messages)
        )
    metadata = tuple(headers.items())
    async with grpc.aio.insecure_channel(relay.grpc) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Subscribe(
            SubscribeRequest(session=session), metadata=metadata
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return "cut" if error.code() == grpc.StatusCode.NOT_FOUND else repr(error)
        return "ended"


@dataclass
class Upstream:
    url: str
    gone: asyncio.Event  # set once the relay's upstream request has gone away


@pytest.fixture
async def endless_upstream() -> AsyncIterator[Upstream]:
    """An LLM that opens with one event too large for the relay, then streams on for ~10 s."""
    gone = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(b"data: " + b"x" * 2048 + b"\n\n")
            for n in range(200):
                await asyncio.sleep(0.05)
                await response.write(b'data: {"n": %d}\n\n' % n)
        finally:
            gone.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Upstream(f"http://127.0.0.1:{runner.addresses[0][1]}", gone)
    finally:
        await runner.cleanup()


async def test_a_detached_generation_stops_once_its_log_has_ended(
    endless_upstream: Upstream,
) -> None:
    """A log the writer failed (an event over the limit here; the log limit alike) takes no more
    events: the LLM call stops at once, not a grace later, and its quota slot is free."""
    metrics = RelayMetrics()
    store = MemoryStore(metrics=metrics)
    settings = DetachSettings(egress_url=endless_upstream.url)
    generations = Generations(store, settings, metrics, max_event_bytes=1024)
    quota = SessionQuota()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            response = await generations.open("POST", "/v1/chat/completions", CIMultiDict(), b"{}")
            slot = quota.reserve("alice")
            log = generations.start(response, owner="alice", slot=slot, request_key="")
            assert log is not None
            await endless_upstream.gone.wait()  # ~10 s if the generation reads on
        assert log.state is EndState.FAILED
        assert generations.running == 0 and quota.open("alice") == 0
    finally:
        await generations.close()


async def test_a_stopping_node_starts_no_generation(endless_upstream: Upstream) -> None:
    """A request still on its way in when the node begins to stop gets a typed 503: no new LLM
    call, and one already answered is closed instead of logged by nobody."""
    metrics = RelayMetrics()
    generations = Generations(
        MemoryStore(metrics=metrics),
        DetachSettings(egress_url=endless_upstream.url),
        metrics,
        max_event_bytes=1024,
    )
    async with asyncio.timeout(TIMEOUT_S):
        response = await generations.open("POST", "/v1/chat/completions", CIMultiDict(), b"{}")
        await generations.close()
        slot = SessionQuota().reserve("alice")
        with pytest.raises(RelayUnavailable, match="relay node stopping"):
            generations.start(response, owner="alice", slot=slot, request_key="")
        assert response.closed and generations.running == 0
        await endless_upstream.gone.wait()  # the LLM call was cut, not left streaming
        with pytest.raises(RelayUnavailable, match="relay node stopping"):
            await generations.open("POST", "/v1/chat/completions", CIMultiDict(), b"{}")


class _SlowRemoteReaders(MemoryStore):
    """A shared store's reader count: answered only once the test says so."""

    def __init__(self, metrics: RelayMetrics) -> None:
        super().__init__(metrics=metrics)
        self.asked, self.answer = asyncio.Event(), asyncio.Event()

    async def remote_readers(self, session_id: str) -> int:
        self.asked.set()
        await self.answer.wait()
        return 0


async def test_a_reader_that_comes_and_goes_during_the_grace_check_gets_a_full_grace(
    endless_upstream: Upstream,
) -> None:
    """The grace ran out and other nodes are being asked; a reader attaches and leaves
    meanwhile: its leaving starts a new grace, which the pending check must not cut short."""
    metrics = RelayMetrics()
    store = _SlowRemoteReaders(metrics)
    grace_s = 1.0
    settings = DetachSettings(egress_url=endless_upstream.url, detach_grace=grace_s)
    generations = Generations(store, settings, metrics, max_event_bytes=1 << 20)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            response = await generations.open("POST", "/v1/chat/completions", CIMultiDict(), b"{}")
            log = generations.start(response, owner="", slot=UNCOUNTED, request_key="")
            assert log is not None
            await store.asked.wait()  # the first grace is over: asking the other nodes
            generations.readers_changed(log.session_id, 1)
            generations.readers_changed(log.session_id, 0)  # left again: a new grace
            store.answer.set()  # no reader elsewhere
            await asyncio.sleep(grace_s / 4)
            assert log.state is EndState.OPEN, log.reason
            while log.state is EndState.OPEN:  # until the new grace runs out
                await log.wait_beyond(log.last_seq)
        assert (log.state, log.reason) == (EndState.CANCELLED, f"no reader for {grace_s:g}s")
    finally:
        await generations.close()


async def test_a_share_check_that_fails_unexpectedly_does_not_end_the_watch() -> None:
    """One failed check (a bug, a record the store cannot parse) says nothing either way; the
    next one still cuts a reader whose token was revoked. A dead watch would cut no one, ever."""
    metrics = RelayMetrics()
    log = MemoryStore(metrics=metrics).create(
        content_type="text/event-stream", write_path=WritePath.INLINE, owner=_owner("key:alice")
    )
    registry = ReaderRegistry(ReaderLimits(), metrics)
    checks = 0

    async def revoked_after_a_failure(shares: set[tuple[str, str]]) -> set[tuple[str, str]]:
        nonlocal checks
        checks += 1
        if checks == 1:
            raise ValueError("could not convert string to float: 'garbage'")
        return set()  # revoked meanwhile, on another node

    bob = Access.of(_owner("key:bob"), "tokenid.secret")
    with registry.attach(Cursor(log, 0), ReaderProtocol.SSE, bob) as reader:
        watcher = asyncio.create_task(registry.watch_shares(revoked_after_a_failure))
        try:
            async with asyncio.timeout(TIMEOUT_S):
                with pytest.raises(SessionNotFound):
                    async for _ in reader.batches():
                        pass
        finally:
            watcher.cancel()
    assert checks == 2


async def test_an_ndjson_session_cut_on_the_events_endpoint_says_why(relay: Relay) -> None:
    """/events speaks SSE whatever the session's framing, so its cut carries the SSE comment."""
    log = relay.session(b'{"a": 1}\n', content_type="application/x-ndjson")
    received = b""
    async with (
        asyncio.timeout(TIMEOUT_S),
        aiohttp.ClientSession() as client,
        client.get(f"{relay.http}/relay/v1/sessions/{log.session_id}/events") as response,
    ):
        await relay.readers_become(log.session_id, 1)
        log.drop("evicted")  # the store let go of it: the reader is cut
        with pytest.raises(aiohttp.ClientPayloadError):  # no final chunk
            async for chunk in response.content.iter_any():
                received += chunk
    assert received.endswith(f": relay: session {log.session_id} was evicted\n\n".encode())
