"""The Python client (clients/python): resume state machine, transports, iterators, errors.

Unit tests drive the transports with `httpx.MockTransport`; end-to-end tests run the OpenAI
SDK and the event iterators through the chaos proxy against a real detached stack.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import pytest
from chaos_proxy import ChaosProxy, CutPlan
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam
from stream_relay_client import (
    AsyncResumingTransport,
    Event,
    Forbidden,
    RelayClientError,
    ResumeState,
    ResumingTransport,
    RetryBudgetExhausted,
    RetryPolicy,
    SessionExpired,
    SessionNotFound,
    astream_events,
    stream_events,
)
from test_chaos import FAST, HEAD_BYTES_MAX, STREAM_BYTES, envoy_port, llm_calls
from test_e2e import chat

from extproc.ops.supervisor import Stack

SESSION = "S" * 22
QUICK = RetryPolicy(max_reconnects=60, base=0.001, cap=0.01)  # chaos: many cuts, short waits
PER_SEED_TIMEOUT_S = 15.0


# --- the sans-IO state machine -------------------------------------------------------------

MIXED = (
    b"id: s:1\ndata: a\n\n"
    b"id: s:2\r\ndata: b\r\n\r\n"
    b"id: s:3\rdata: c\r\r"
    b": a comment\n\n"
    b"retry: 250\r\n\n"
    b"id: s:4\r\r\n"  # CR, then CRLF: a blank line that ends after the LF
)
MIXED_BLOCKS = [
    b"id: s:1\ndata: a\n\n",
    b"id: s:2\r\ndata: b\r\n\r\n",
    b"id: s:3\rdata: c\r\r",
    b": a comment\n\n",
    b"retry: 250\r\n\n",
    b"id: s:4\r\r\n",
]
PARTIAL = b"id: s:5\ndata: half"


def test_state_frames_every_line_ending_at_every_split() -> None:
    stream = MIXED + PARTIAL
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1, 7):
            state = ResumeState("s")
            blocks = state.feed(stream[:i]) + state.feed(stream[i:j]) + state.feed(stream[j:])
            rest, tail = state.finish()
            assert blocks + rest == MIXED_BLOCKS, (i, j)
            assert tail == PARTIAL
            assert state.last_event_id == "s:4"
            assert state.retry_ms == 250


def test_state_holds_a_trailing_cr_until_it_knows_it_is_not_a_crlf() -> None:
    state = ResumeState("s")
    assert state.feed(b"id: s:1\r\n\r") == []
    assert state.feed(b"\n") == [b"id: s:1\r\n\r\n"]
    assert state.feed(b"id: s:2\r\r") == []
    assert state.finish() == ([b"id: s:2\r\r"], b"")  # at the end, a CR is a CR


def test_reconnect_drops_the_partial_event_and_names_the_last_whole_one() -> None:
    state = ResumeState("s")
    assert state.reconnect() == "s:0"  # nothing seen yet: from the start of the session
    assert state.feed(b"id: s:1\ndata: a\n\nid: s:2\ndata: b") == [b"id: s:1\ndata: a\n\n"]
    assert state.reconnect() == "s:1"
    assert state.feed(b"id: s:2\ndata: b\n\n") == [b"id: s:2\ndata: b\n\n"]
    assert state.last_event_id == "s:2"


def test_backoff_is_full_jitter_capped_and_floored_by_retry() -> None:
    import random

    policy = RetryPolicy(base=0.1, cap=5.0)
    rng = random.Random(1)
    for attempt in range(12):
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        bound = min(5.0, 0.1 * 2**attempt)
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8  # the whole range is used, not a fixed step
        assert all(policy.delay(attempt, 7000, rng) == 7.0 for _ in range(20))  # above the cap


# --- transports against a scripted server ----------------------------------------------------


def sse(first: int, last: int, session: str = SESSION) -> bytes:
    return b"".join(f"id: {session}:{n}\ndata: {n}\n\n".encode() for n in range(first, last + 1))


FULL = sse(1, 20) + b"data: [DONE]\n\n"  # the last event carries no id of its own


class CutStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that yields `chunks`, then breaks like a dropped connection (or ends)."""

    def __init__(self, chunks: list[bytes], cut: bool) -> None:
        self.chunks, self.cut = chunks, cut

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.cut:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.cut:
            raise httpx.ReadError("connection reset")


@dataclass
class Server:
    """Answers with the rest of FULL after the request's Last-Event-ID, cut per `cuts`.

    `cuts[n]` is where connection n breaks (an offset into what it sends, None: no cut); a
    connection past the list uses `then` (a status for an error answer, or None: the rest)."""

    cuts: Sequence[int | None]
    then: int | None = None
    retry_ms: int | None = None
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        n = len(self.requests)
        self.requests.append(request)
        if n >= len(self.cuts) and self.then is not None:
            error = {"message": "nope", "type": "relay_error", "code": f"c{self.then}"}
            return httpx.Response(self.then, json={"error": error})
        after = request.headers.get("last-event-id")
        seq = int(after.rsplit(":", 1)[1]) if after else 0
        body = (f"retry: {self.retry_ms}\n\n".encode() if self.retry_ms else b"") + FULL[
            FULL.index(f"id: {SESSION}:{seq + 1}\n".encode()) :
        ]
        cut = self.cuts[n] if n < len(self.cuts) else None
        sent = body if cut is None else body[:cut]
        chunks = [sent[i : i + 7] for i in range(0, len(sent), 7)]  # small reads
        headers = {"content-type": "text/event-stream", "x-relay-session": SESSION}
        return httpx.Response(200, headers=headers, stream=CutStream(chunks, cut is not None))


def sync_client(server: Server, policy: RetryPolicy, sleeps: list[float]) -> httpx.Client:
    transport = ResumingTransport(
        httpx.MockTransport(server), policy=policy, sleep=sleeps.append, seed=0
    )
    return httpx.Client(transport=transport, base_url="http://relay")


def post_body(client: httpx.Client) -> bytes:
    with client.stream("POST", "/v1/chat/completions", json={"stream": True}) as response:
        return b"".join(response.iter_bytes())


def test_transport_splices_cut_connections_into_the_uncut_body() -> None:
    server = Server(cuts=[30, 5, 0, 61, 200])  # mid-event, mid-line, before any byte …
    sleeps: list[float] = []
    with sync_client(server, RetryPolicy(), sleeps) as client:
        assert post_body(client) == FULL
    assert len(server.requests) == 6
    assert [r.headers.get("last-event-id") for r in server.requests] == [
        None,
        f"{SESSION}:0",  # cut inside event 1 (38 bytes each): from the start of the session
        f"{SESSION}:0",
        f"{SESSION}:0",
        f"{SESSION}:1",  # 61 bytes: event 1 and most of 2
        f"{SESSION}:6",  # 200 bytes after event 1: events 2 to 6
    ]
    for request in server.requests:  # the same request again, body and all
        assert (request.method, request.url.path) == ("POST", "/v1/chat/completions")
        assert json.loads(request.content) == {"stream": True}
    assert len(sleeps) == 5
    assert all(0 <= s <= min(5.0, 0.1 * 2**n) for n, s in enumerate(sleeps))


@pytest.mark.parametrize(
    ("status", "error"),
    [(410, SessionExpired), (404, SessionNotFound), (403, Forbidden), (401, Forbidden)],
)
def test_a_failed_resume_raises_its_typed_error(status: int, error: type[RelayClientError]) -> None:
    server = Server(cuts=[40], then=status)
    with sync_client(server, RetryPolicy(), []) as client, pytest.raises(error) as caught:
        post_body(client)
    assert caught.value.status_code == status
    assert caught.value.code == f"c{status}"
    assert caught.value.session == SESSION
    assert len(server.requests) == 2  # not retried


def test_retryable_statuses_count_against_the_budget_then_resume() -> None:
    server = Server(cuts=[40, None], then=None)
    answers = iter([httpx.Response(503, text="upstream connect error")])

    def handler(request: httpx.Request) -> httpx.Response:
        if len(server.requests) == 1 and (answer := next(answers, None)) is not None:
            return answer
        return server(request)

    sleeps: list[float] = []
    transport = ResumingTransport(httpx.MockTransport(handler), sleep=sleeps.append, seed=0)
    with httpx.Client(transport=transport, base_url="http://relay") as client:
        assert post_body(client) == FULL
    assert len(sleeps) == 2


def test_retry_budget_is_exhausted_when_every_reconnect_is_cut_early() -> None:
    server = Server(cuts=[40] + [3] * 50)
    sleeps: list[float] = []
    received = b""
    with (
        sync_client(server, RetryPolicy(max_reconnects=4), sleeps) as client,
        pytest.raises(RetryBudgetExhausted) as caught,
        client.stream("POST", "/v1/chat/completions", json={}) as response,
    ):
        for chunk in response.iter_bytes():
            received += chunk
    assert caught.value.reconnects == 4
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert len(server.requests) == 5
    assert received == sse(1, 1)  # only whole events ever reached the application


def test_backoff_honours_the_servers_retry_field() -> None:
    server = Server(cuts=[60, 30, 30, 30], retry_ms=3000)
    sleeps: list[float] = []
    with sync_client(server, RetryPolicy(), sleeps) as client:
        body = post_body(client)
    assert body.startswith(b"retry: 3000\n\n") and body.endswith(FULL[-100:])
    assert len(sleeps) == 4
    assert all(s >= 3.0 for s in sleeps)


def test_a_200_from_something_else_than_the_session_is_never_spliced_in() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            headers = {"content-type": "text/event-stream", "x-relay-session": SESSION}
            return httpx.Response(200, headers=headers, stream=CutStream([sse(1, 2)], True))
        # the relay is down: Envoy fails open and the LLM starts a new, untagged answer
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=FULL)

    transport = ResumingTransport(httpx.MockTransport(handler), sleep=lambda _: None)
    with httpx.Client(transport=transport) as client, pytest.raises(RelayClientError) as caught:
        post_body_url(client, "http://relay/v1/chat/completions")
    assert type(caught.value) is RelayClientError
    assert len(calls) == 2


def post_body_url(client: httpx.Client, url: str) -> bytes:
    with client.stream("POST", url, json={}) as response:
        return b"".join(response.iter_bytes())


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "text/event-stream"},  # no session: not the relay's
        {"content-type": "application/json", "x-relay-session": SESSION},
        {
            "content-type": "text/event-stream",
            "x-relay-session": SESSION,
            "content-encoding": "gzip",
        },
    ],
)
def test_other_responses_pass_through_untouched(headers: dict[str, str]) -> None:
    answer = httpx.Response(200, headers=headers, content=b"x")
    transport = ResumingTransport(httpx.MockTransport(lambda _: answer))
    assert transport.handle_request(httpx.Request("GET", "http://relay/")) is answer


async def test_async_transport_splices_and_raises_typed_errors() -> None:
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    server = Server(cuts=[33, 0, 90])
    transport = AsyncResumingTransport(httpx.MockTransport(server), sleep=sleep)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        async with client.stream("POST", "/v1/chat/completions", json={}) as response:
            assert b"".join([c async for c in response.aiter_bytes()]) == FULL
        assert len(sleeps) == 3

        server = Server(cuts=[33], then=410)
        client._transport = AsyncResumingTransport(httpx.MockTransport(server), sleep=sleep)
        with pytest.raises(SessionExpired):
            async with client.stream("POST", "/v1/chat/completions", json={}) as response:
                async for _ in response.aiter_bytes():
                    pass


def test_stream_events_parses_resumes_and_ends_on_204() -> None:
    body = sse(1, 3) + b"event: relay.end\nid: " + f"{SESSION}:4".encode() + b"\ndata: {}\n\n"
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {"content-type": "text/event-stream", "x-relay-session": SESSION}
        if len(requests) == 1:
            return httpx.Response(200, headers=headers, stream=CutStream([body], True))
        return httpx.Response(204)  # it saw relay.end: nothing is left

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        events = list(stream_events(client, "GET", "http://relay/events", sleep=lambda _: None))
    assert [e.id for e in events] == [f"{SESSION}:{n}" for n in range(1, 5)]
    assert events[-1] == Event(f"{SESSION}:4", "relay.end", "{}", None)
    assert requests[1].headers["last-event-id"] == f"{SESSION}:4"
    assert requests[0].headers["accept"] == "text/event-stream"


# --- end to end: real stack, chaos proxy -----------------------------------------------------

PAYLOAD = chat(max_tokens=60, prompt="client chaos")  # what the SDK sends, as JSON
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "client chaos"}]
EVENTS = 63  # role + 60 tokens + finish + [DONE]


def chaos_plan(seed: int) -> CutPlan:
    return CutPlan(
        seed=seed,
        low=0,
        high=STREAM_BYTES // 3,  # early in each connection: several cuts per answer
        keep_probability=0.25,
        always_cut=2,
        first_low=HEAD_BYTES_MAX,  # the session must be known before the first cut
    )


def one_connection_per_request() -> httpx.Limits:
    return httpx.Limits(max_keepalive_connections=0)  # each attempt meets a fresh cut offset


def deltas_of(body: bytes) -> list[str]:
    """The content deltas of a chat completion stream, in order, as raw SSE bytes."""
    out = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and (content := choices[0]["delta"].get("content")) is not None:
                    out.append(content)
    return out


async def replay_deltas(stack: Stack, session: str) -> list[str]:
    """The whole answer of `session`, from its log, uncut (read on the session's own SSE
    endpoint: a resume on the original endpoint must repeat the SDK's request byte for byte)."""
    async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as direct:
        whole = await direct.get(f"/relay/v1/sessions/{session}/events")
    assert whole.status_code == 200
    events = [block for block in whole.content.split(b"\n\n") if block]
    assert b"event: relay.end" in events[-1] and b'"state": "done"' in events[-1]
    return deltas_of(b"\n\n".join(events[:-1]))


def sync_openai_deltas(base_url: str) -> tuple[str, list[str]]:
    transport = ResumingTransport(
        httpx.HTTPTransport(limits=one_connection_per_request()), policy=QUICK
    )
    http = httpx.Client(transport=transport, timeout=10.0, trust_env=False)
    # openai>=3 is typed for httpx2 clients; it takes httpx ones at run time, as used here
    ai = OpenAI(base_url=f"{base_url}/v1", api_key="x", http_client=http, max_retries=0)  # type: ignore[arg-type]
    with ai:
        raw = ai.chat.completions.with_raw_response.create(
            model="demo-llm",
            messages=MESSAGES,
            max_tokens=60,
            stream=True,
            extra_headers=FAST,
        )
        session = raw.headers["x-relay-session"]
        deltas = [
            chunk.choices[0].delta.content
            for chunk in raw.parse()
            if chunk.choices and chunk.choices[0].delta.content is not None
        ]
    return session, deltas


@pytest.mark.parametrize("seed", range(15))
async def test_openai_sdk_through_cuts_reads_the_uncut_answer(
    detached_stack: Stack, seed: int
) -> None:
    calls_before = await llm_calls(detached_stack)
    async with (
        asyncio.timeout(PER_SEED_TIMEOUT_S),
        ChaosProxy(envoy_port(detached_stack), chaos_plan(seed)) as proxy,
    ):
        session, deltas = await asyncio.to_thread(sync_openai_deltas, proxy.url)
    assert proxy.cuts >= 2
    expected = await replay_deltas(detached_stack, session)
    assert len(expected) == 61  # the role chunk's "" + 60 tokens
    assert deltas == expected
    assert await llm_calls(detached_stack) == calls_before + 1  # resumes never call the LLM


@pytest.mark.parametrize("seed", range(100, 106))
async def test_async_openai_sdk_through_cuts_reads_the_uncut_answer(
    detached_stack: Stack, seed: int
) -> None:
    transport = AsyncResumingTransport(
        httpx.AsyncHTTPTransport(limits=one_connection_per_request()), policy=QUICK
    )
    async with (
        asyncio.timeout(PER_SEED_TIMEOUT_S),
        ChaosProxy(envoy_port(detached_stack), chaos_plan(seed)) as proxy,
        httpx.AsyncClient(transport=transport, timeout=10.0, trust_env=False) as http,
        AsyncOpenAI(
            base_url=f"{proxy.url}/v1",
            api_key="x",
            http_client=http,  # type: ignore[arg-type]
            max_retries=0,
        ) as ai,
    ):
        raw = await ai.chat.completions.with_raw_response.create(
            model="demo-llm",
            messages=MESSAGES,
            max_tokens=60,
            stream=True,
            extra_headers=FAST,
        )
        session = raw.headers["x-relay-session"]
        deltas = [
            chunk.choices[0].delta.content
            async for chunk in raw.parse()  # legacy raw response: parse() is sync
            if chunk.choices and chunk.choices[0].delta.content is not None
        ]
    assert proxy.cuts >= 2
    assert deltas == await replay_deltas(detached_stack, session)


def read_events(base_url: str) -> list[Event]:
    limits = one_connection_per_request()
    with httpx.Client(base_url=base_url, limits=limits, timeout=10.0, trust_env=False) as http:
        return list(
            stream_events(
                http, "POST", "/v1/chat/completions", json=PAYLOAD, headers=FAST, policy=QUICK
            )
        )


@pytest.mark.parametrize("seed", range(200, 204))
async def test_stream_events_through_cuts_yields_dense_ids_once(
    detached_stack: Stack, seed: int
) -> None:
    async with (
        asyncio.timeout(PER_SEED_TIMEOUT_S),
        ChaosProxy(envoy_port(detached_stack), chaos_plan(seed)) as proxy,
    ):
        events = await asyncio.to_thread(read_events, proxy.url)
    assert proxy.cuts >= 2
    session = events[0].id.split(":")[0]
    assert [e.id for e in events] == [f"{session}:{n}" for n in range(1, EVENTS + 1)]
    assert events[-1].data == "[DONE]"
    assert [json.loads(e.data)["choices"][0]["delta"].get("content") for e in events[1:-2]] == (
        await replay_deltas(detached_stack, session)
    )[1:]


@pytest.mark.parametrize("seed", range(300, 303))
async def test_astream_events_on_the_reader_endpoint_ends_with_relay_end(
    detached_stack: Stack, seed: int
) -> None:
    plan = CutPlan(seed=seed, low=0, high=STREAM_BYTES // 3, keep_probability=0.25, always_cut=2)
    limits = one_connection_per_request()
    async with (
        asyncio.timeout(PER_SEED_TIMEOUT_S),
        httpx.AsyncClient(base_url=detached_stack.base_url, trust_env=False) as direct,
        direct.stream("POST", "/v1/chat/completions", json=PAYLOAD, headers=FAST) as original,
        ChaosProxy(envoy_port(detached_stack), plan) as proxy,
        httpx.AsyncClient(base_url=proxy.url, limits=limits, trust_env=False) as client,
    ):
        session = original.headers["x-relay-session"]
        first_client = asyncio.create_task(original.aread())
        path = f"/relay/v1/sessions/{session}/events"
        events = [e async for e in astream_events(client, "GET", path, policy=QUICK)]
        await first_client
    assert proxy.cuts >= 2
    assert [e.id for e in events] == [f"{session}:{n}" for n in range(1, EVENTS + 2)]
    assert events[-1].event == "relay.end"
    assert json.loads(events[-1].data) == {"state": "done", "reason": "", "last_seq": EVENTS}


async def test_an_unknown_session_is_a_typed_error(detached_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=detached_stack.base_url, trust_env=False) as client:
        with pytest.raises(SessionNotFound) as caught:
            async for _ in astream_events(client, "GET", f"/relay/v1/sessions/{'Q' * 22}/events"):
                pass
    assert caught.value.code == "session_not_found"
