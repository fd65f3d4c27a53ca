"""Chaos: connections cut at random byte offsets between the client and Envoy.

A client that reconnects with `Last-Event-ID` after every cut must end up with exactly the
bytes (or events) of the uninterrupted stream, from one upstream call. On the inline path
the generation dies with the client: the loss must be reported as a cut, never as success.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from chaos_proxy import ChaosProxy, CutPlan
from conftest import envoy_stats
from httpx_sse import aconnect_sse
from test_e2e import chat, events_of

from extproc.ops.supervisor import Stack

SEEDS = range(30)
SSE_SEEDS = range(12)
PER_SEED_TIMEOUT_S = 15.0
MAX_ATTEMPTS = 60  # connections per stream before the test gives up
PAYLOAD = chat(max_tokens=60, prompt="chaos monkey")
FAST = {"x-demo-rate": "300"}  # 63 events in ~0.2 s
STREAM_BYTES = 15_100  # about one whole answer (63 events), without the response head
HEAD_BYTES_MAX = 1024  # an Envoy response head is ~250 bytes
DONE = b"data: [DONE]\n\n"
LAST_ID = re.compile(rb"^id: (\S+)$", re.MULTILINE)
CUT_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError)  # not timeouts: a hang fails


def envoy_port(stack: Stack) -> int:
    parts = urlsplit(stack.base_url)
    assert parts.hostname == "127.0.0.1" and parts.port is not None
    return parts.port


def no_reuse_client(base_url: str) -> httpx.AsyncClient:
    """One TCP connection per request, so that every attempt meets a fresh cut offset."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(10.0),
        limits=httpx.Limits(max_keepalive_connections=0),
        trust_env=False,
    )


async def llm_calls(stack: Stack) -> int:
    return (await asyncio.to_thread(envoy_stats, stack))["cluster.llm.upstream_rq_total"]


def complete_events(received: bytes) -> bytes:
    """The whole events at the start of `received`: a trailing partial event is dropped."""
    end = received.rfind(b"\n\n")
    return b"" if end < 0 else received[: end + 2]


@dataclass
class Resumed:
    body: bytes
    session: str
    attempts: int


async def post_until_done(client: httpx.AsyncClient, payload: dict[str, object]) -> Resumed:
    """POST a streamed chat; after every cut, repeat it with the last whole event's id."""
    body = b""
    session = ""
    last_id = ""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        headers = dict(FAST)
        if session:
            headers["Last-Event-ID"] = last_id
        elif attempt > 1:
            raise AssertionError("cut before the response head: the session is unknown")
        received = b""
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=payload, headers=headers
            ) as response:
                assert response.status_code == 200, await response.aread()
                if not session:
                    session = response.headers["x-relay-session"]
                    last_id = f"{session}:0"
                assert response.headers["x-relay-session"] == session
                async for chunk in response.aiter_raw():
                    received += chunk
        except CUT_ERRORS:
            whole = complete_events(received)
            body += whole
            if ids := LAST_ID.findall(whole):
                last_id = ids[-1].decode()
            continue
        body += received  # a clean end: it must be the real end, never a short success
        assert body.endswith(DONE), f"a clean response without [DONE]: {received[-200:]!r}"
        return Resumed(body, session, attempt)
    raise AssertionError(f"no clean end in {MAX_ATTEMPTS} connections")


@pytest.mark.parametrize("seed", SEEDS)
async def test_cut_and_resume_on_the_original_endpoint(detached_stack: Stack, seed: int) -> None:
    stack = detached_stack
    calls_before = await llm_calls(stack)
    plan = CutPlan(
        seed=seed,
        low=0,  # resumed connections may be cut anywhere, the response head included
        high=STREAM_BYTES,
        keep_probability=0.25,
        always_cut=1,
        first_low=HEAD_BYTES_MAX,  # the first client must learn its session before a cut
    )
    async with asyncio.timeout(PER_SEED_TIMEOUT_S), ChaosProxy(envoy_port(stack), plan) as proxy:
        async with no_reuse_client(proxy.url) as client:
            resumed = await post_until_done(client, PAYLOAD)
        async with no_reuse_client(stack.base_url) as direct:
            whole = await direct.post(
                "/v1/chat/completions",
                json=PAYLOAD,
                headers={"Last-Event-ID": f"{resumed.session}:0"},
            )
    assert proxy.cuts >= 1
    assert resumed.attempts == len(proxy.connections)
    assert whole.status_code == 200
    assert len(events_of(whole.content)) == 63  # role + 60 tokens + finish + [DONE]
    assert resumed.body == whole.content
    assert await llm_calls(stack) == calls_before + 1  # one LLM call, however many cuts


@dataclass(frozen=True)
class Event:
    id: str
    event: str
    data: str


class EventParser:
    """Incremental SSE parsing as the WHATWG spec (and httpx-sse) does it, for LF streams.

    The id persists from event to event (an event without `id:` carries the last one);
    comments and events without data dispatch nothing; a partial event is never returned.
    """

    def __init__(self) -> None:
        self.last_id = ""
        self._buffer = b""

    def reset(self) -> None:
        self._buffer = b""  # a new connection: a partial event of the old one is gone

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        out = []
        for block in blocks:
            name, data = "message", []
            for line in block.decode().split("\n"):
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "id" and "\0" not in value:
                    self.last_id = value
                elif field == "event":
                    name = value or "message"
                elif field == "data":
                    data.append(value)
            if data:
                out.append(Event(self.last_id, name, "\n".join(data)))
        return out


@dataclass
class ReadOutcome:
    events: list[Event]
    attempts: int
    no_content_without_end: bool  # 204 although this reader never saw relay.end


async def read_events_until_end(client: httpx.AsyncClient, path: str) -> ReadOutcome:
    """An EventSource, by hand: after a cut, GET again with Last-Event-ID; stop at relay.end
    (or at 204, which says the session ended and nothing is left)."""
    parser = EventParser()
    events: list[Event] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        headers = {"Accept": "text/event-stream"}
        if parser.last_id:
            headers["Last-Event-ID"] = parser.last_id
        parser.reset()
        try:
            async with client.stream("GET", path, headers=headers) as response:
                if response.status_code == 204:
                    ended = bool(events) and events[-1].event == "relay.end"
                    return ReadOutcome(events, attempt, no_content_without_end=not ended)
                assert response.status_code == 200, await response.aread()
                async for chunk in response.aiter_raw():
                    events += parser.feed(chunk)
        except CUT_ERRORS:
            continue
        assert events and events[-1].event == "relay.end", (
            f"a clean end without relay.end: {events}"
        )
        return ReadOutcome(events, attempt, no_content_without_end=False)
    raise AssertionError(f"no end in {MAX_ATTEMPTS} connections")


async def reference_events(stack: Stack, session: str) -> list[Event]:
    """What a standard SSE client reads from the reader endpoint with no cuts."""
    async with (
        no_reuse_client(stack.base_url) as direct,
        aconnect_sse(direct, "GET", f"/relay/v1/sessions/{session}/events") as source,
    ):
        return [Event(e.id, e.event, e.data) async for e in source.aiter_sse()]


@pytest.mark.parametrize("seed", SSE_SEEDS)
async def test_cut_and_resume_on_the_sse_reader_endpoint(detached_stack: Stack, seed: int) -> None:
    stack = detached_stack
    calls_before = await llm_calls(stack)
    plan = CutPlan(seed=seed, low=0, high=STREAM_BYTES, keep_probability=0.25, always_cut=1)
    async with asyncio.timeout(PER_SEED_TIMEOUT_S), ChaosProxy(envoy_port(stack), plan) as proxy:
        async with (
            no_reuse_client(stack.base_url) as direct,
            no_reuse_client(proxy.url) as client,
            direct.stream("POST", "/v1/chat/completions", json=PAYLOAD, headers=FAST) as original,
        ):
            session = original.headers["x-relay-session"]
            first_client = asyncio.create_task(original.aread())  # live while we read
            outcome = await read_events_until_end(client, f"/relay/v1/sessions/{session}/events")
            original_body = await first_client
        expected = await reference_events(stack, session)
    assert proxy.cuts >= 1
    assert outcome.attempts == len(proxy.connections)
    assert len(events_of(original_body)) == 63
    assert expected[-1].event == "relay.end"
    assert json.loads(expected[-1].data) == {"state": "done", "reason": "", "last_seq": 63}
    assert [e.id for e in expected[:-1]] == [f"{session}:{n}" for n in range(1, 64)]
    assert not outcome.no_content_without_end, "a reader got 204 without seeing relay.end"
    assert outcome.events == expected
    assert await llm_calls(stack) == calls_before + 1


async def test_a_reader_cut_inside_relay_end_still_learns_the_end_state(
    detached_stack: Stack,
) -> None:
    stack = detached_stack
    async with no_reuse_client(stack.base_url) as direct:
        done = await direct.post("/v1/chat/completions", json=chat(max_tokens=5), headers=FAST)
        session = done.headers["x-relay-session"]
        path = f"/relay/v1/sessions/{session}/events"
        measure = CutPlan(seed=0, low=0, high=0, keep_probability=1.0)  # never cuts
        async with ChaosProxy(envoy_port(stack), measure, record=True) as proxy:
            async with no_reuse_client(proxy.url) as client:
                assert (await client.get(path)).status_code == 200
            raw = proxy.connections[0].data
        at = raw.index(b"event: relay.end") + 10  # a cut inside the relay.end event
        async with (
            asyncio.timeout(PER_SEED_TIMEOUT_S),
            ChaosProxy(envoy_port(stack), CutPlan(seed=0, low=at, high=at, always_cut=1)) as cut,
            no_reuse_client(cut.url) as client,
        ):
            outcome = await read_events_until_end(client, path)
    assert cut.cuts == 1
    assert outcome.attempts == 2
    assert not outcome.no_content_without_end, "got 204 instead of relay.end"
    assert outcome.events == await reference_events(stack, session)


@pytest.mark.parametrize("stack", ["inline"], indirect=True)
async def test_inline_cut_is_lost_and_says_so(stack: Stack) -> None:
    """Inline: the client's cut stops the generation; a resume gets what was logged before
    it, and its response is cut too (incomplete chunked body), never a short success."""
    calls_before = await llm_calls(stack)
    slow = {"x-demo-rate": "40"}  # 63 events over ~1.6 s: the cut is mid-generation
    plan = CutPlan(seed=0, low=3000, high=3000, always_cut=1)  # after ~12 events
    received = b""
    async with asyncio.timeout(PER_SEED_TIMEOUT_S):
        async with ChaosProxy(envoy_port(stack), plan) as proxy, no_reuse_client(proxy.url) as c:
            with pytest.raises(CUT_ERRORS):
                async with c.stream(
                    "POST", "/v1/chat/completions", json=PAYLOAD, headers=slow
                ) as response:
                    session = response.headers["x-relay-session"]
                    async for chunk in response.aiter_raw():
                        received += chunk
        head = complete_events(received)
        last_id = LAST_ID.findall(head)[-1].decode()
        async with no_reuse_client(stack.base_url) as direct:
            (tail, tail_error), (log, log_error) = await asyncio.gather(
                read_cut_response(direct, last_id), read_cut_response(direct, f"{session}:0")
            )  # together: Envoy takes its delayed_close_timeout (1 s) to pass each cut on
            state = (await direct.get(f"/relay/v1/sessions/{session}")).json()
    assert proxy.cuts == 1
    # Cut, not ended: httpx says RemoteProtocolError (incomplete chunked body) when Envoy
    # closes, ReadError when it resets (seen ~1 in 20 when two such responses overlap).
    assert isinstance(tail_error, CUT_ERRORS), tail_error
    assert isinstance(log_error, CUT_ERRORS), log_error
    assert state["state"] == "cancelled"
    assert state["reason"] == "client disconnected"
    comment = b": relay: session cancelled: client disconnected\n\n"
    assert tail.endswith(comment) and log.endswith(comment)  # said out loud, for humans too
    logged = log.removesuffix(comment)
    assert head + tail.removesuffix(comment) == logged  # the rest of what was logged, exactly
    assert DONE not in logged
    assert len(events_of(head)) <= len(events_of(logged)) == state["last_seq"] < 63
    assert await llm_calls(stack) == calls_before + 1  # a resume never calls the LLM


async def read_cut_response(
    client: httpx.AsyncClient, last_event_id: str
) -> tuple[bytes, Exception | None]:
    """Resume on the original endpoint; the body read before the response ended, and how."""
    body = b""
    async with client.stream(
        "POST", "/v1/chat/completions", json=PAYLOAD, headers={"Last-Event-ID": last_event_id}
    ) as response:
        assert response.status_code == 200, await response.aread()
        try:
            async for chunk in response.aiter_raw():
                body += chunk
        except CUT_ERRORS as error:
            return body, error
    return body, None
