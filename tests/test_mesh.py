"""The relay added to the Envoy a platform team already runs, end to end: for Envoy Gateway,
Istio and a hand-written front proxy, the Envoy config that platform would run is built from
our manifests (tests/mesh/), and a real Envoy runs it in front of a real relay node (configured
by deploy/kubernetes/relay.toml) and the demo LLM.

Platforms: `envoy-gateway` (deploy/envoy-gateway as is: no per-route metadata, so the node's
write-path = "detached" from relay.toml decides), `envoy-gateway-inline` (the same with
`--write-path inline`, for a cluster without the egress Gateway: the ext_proc stream then lives
as long as the answer, through Envoy Gateway's fixed 10 s gRPC timeout), `istio` and `plain`.
The streams longer than 60 s run concurrently in the background from the start, so the suite
pays ~65 s once. Each detached platform also runs a second Envoy of its config whose ext_proc
service refuses connections: resumes are Envoy's decision and must hold there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from mesh import envoy_gateway, istio, plain
from mesh.clients import (
    TIMEOUT_S,
    chat,
    headers,
    post,
    read_grpc,
    read_sse,
    read_ws,
    session_info,
    stream,
)
from mesh.harness import MeshStack, Ports, start, start_without_processor
from test_e2e import ID_LINE, events_of

DETACHED = ("envoy-gateway", "istio", "plain")
ALL = (*DETACHED, "envoy-gateway-inline")
LONG_RATE = 1.0  # events/s of the long streams
LONG_TOKENS = 63  # role + 63 tokens + finish + [DONE]: the last event ~64 s after the first
LONG_MIN_S = 60.0


def _direct_egress(ports: Ports) -> str:
    return f"http://127.0.0.1:{ports.llm}"  # Istio: the relay's sidecar hop is not modelled


SPECS = {
    "envoy-gateway": (
        envoy_gateway.build,
        envoy_gateway.listener_name(),
        "llm.example.com",
        (),
        None,
    ),
    "envoy-gateway-inline": (
        envoy_gateway.build,
        envoy_gateway.listener_name(),
        "llm.example.com",
        ("--write-path", "inline"),
        None,
    ),
    "istio": (istio.build, istio.LISTENER, istio.HOST, (), _direct_egress),
    "plain": (plain.build, plain.LISTENER, plain.HOST, (), None),
}


@dataclass
class LongStream:
    seconds: float
    response: httpx.Response
    body: bytes


def _long_stream(stack: MeshStack) -> LongStream:
    started = time.monotonic()
    timeout = httpx.Timeout(TIMEOUT_S, read=TIMEOUT_S)
    with httpx.Client(timeout=timeout) as client:
        response = client.post(
            f"{stack.base_url}/v1/chat/completions",
            json=chat(LONG_TOKENS, "a long answer"),
            headers=headers(stack, **{"x-demo-rate": str(LONG_RATE)}),
        )
    return LongStream(time.monotonic() - started, response, response.content)


@dataclass
class Mesh:
    stacks: dict[str, MeshStack]
    long: dict[str, Future[LongStream]]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    stacks: dict[str, MeshStack] = {}
    pool = ThreadPoolExecutor(max_workers=len(SPECS))
    try:
        for name, (build, listener, host, flags, egress) in SPECS.items():
            stacks[name] = start(
                name,
                tmp_path_factory.mktemp(name),
                build,
                listener=listener,
                host=host,
                relay_flags=flags,
                egress_url=egress,
            )
        for name in DETACHED:  # envoy-gateway-inline has the same Envoy config
            start_without_processor(stacks[name], SPECS[name][0])
        long = {name: pool.submit(_long_stream, stack) for name, stack in stacks.items()}
        for stack in stacks.values():  # counted before any test counts LLM calls
            deadline = time.monotonic() + TIMEOUT_S
            while stack.llm_calls() < 1:
                assert time.monotonic() < deadline, f"{stack.name}: the long stream never started"
                time.sleep(0.05)  # polling the demo LLM process, bounded by the deadline
        yield Mesh(stacks, long)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for stack in stacks.values():
            stack.stop()


def sse_events(body: bytes) -> list[tuple[str, str]]:
    """(id, data) of each event of a tagged body as the demo LLM writes them."""
    out = []
    for block in events_of(body):
        fields = dict(line.split(": ", 1) for line in block.decode().strip().split("\n"))
        out.append((fields["id"], fields["data"]))
    return out


def read_until(chunks: Iterator[bytes], events: int) -> bytes:
    seen = b""
    while len(events_of(seen)) < events or not seen.endswith(b"\n\n"):
        seen += next(chunks)
    return seen


def wait_for_state(stack: MeshStack, session: str, state: str) -> dict[str, object]:
    deadline = time.monotonic() + TIMEOUT_S
    while (info := session_info(stack, session))["state"] != state:
        assert time.monotonic() < deadline, f"session {session} still {info['state']}"
        time.sleep(0.05)  # polling the relay process's state, bounded by the deadline
    return info


@pytest.mark.parametrize("platform", ALL)
def test_generations_are_tagged(mesh: Mesh, platform: str) -> None:
    stack = mesh.stacks[platform]
    response = post(stack, chat(12, f"tag me on {platform}"))
    assert response.status_code == 200, response.text
    session = response.headers["x-relay-session"]
    ids = ID_LINE.findall(response.content)
    assert [s.decode() for s, _ in ids] == [session] * 15  # role + 12 tokens + finish + [DONE]
    assert [int(n) for _, n in ids] == list(range(1, 16))
    expected = "inline" if platform.endswith("inline") else "detached"
    assert session_info(stack, session)["write_path"] == expected
    if platform == "plain":  # the front proxy's own filters still run (and gzip)
        assert response.headers["x-front-proxy"] == "yes"
        assert response.headers["content-encoding"] == "gzip"


@pytest.mark.parametrize("platform", ALL)
def test_resume_replays_exactly_the_rest_without_the_llm(mesh: Mesh, platform: str) -> None:
    stack = mesh.stacks[platform]
    payload = chat(20, f"resume on {platform}")
    full = post(stack, payload)
    session = full.headers["x-relay-session"]
    events = events_of(full.content)
    calls = stack.llm_calls()
    for k in (0, 3, len(events) - 1):
        resumed = post(stack, payload, **{"Last-Event-ID": f"{session}:{k}"})
        assert resumed.status_code == 200, resumed.text
        assert b"".join(events[:k]) + resumed.content == full.content
    assert stack.llm_calls() == calls


@pytest.mark.parametrize("platform", ALL)
def test_a_resume_reaches_the_relay_with_its_query_string(mesh: Mesh, platform: str) -> None:
    """The resume rewrite keeps the query: with one added, the relay sees another request than
    the one that created the session and refuses it."""
    stack = mesh.stacks[platform]
    payload = chat(4, f"whose query on {platform}")
    session = post(stack, payload).headers["x-relay-session"]
    calls = stack.llm_calls()
    path = "/v1/chat/completions?stream=1"
    other = post(stack, payload, path, **{"Last-Event-ID": f"{session}:0"})
    assert other.status_code == 409, other.text
    assert f"path {path}, but the session was created on" in other.json()["error"]["message"]
    assert stack.llm_calls() == calls


@pytest.mark.parametrize("platform", DETACHED)
def test_a_resume_is_replayed_while_the_processor_is_down(mesh: Mesh, platform: str) -> None:
    """Through an Envoy of the same platform config whose ext_proc service refuses connections
    (the relay's HTTP front and the LLM up): a resume gets the rest from the relay's log with
    no LLM call, because Envoy's route table decides it; a new generation there fails open."""
    stack = mesh.stacks[platform]
    payload = chat(10, f"resume without the processor on {platform}")
    full = post(stack, payload)
    session = full.headers["x-relay-session"]
    events = events_of(full.content)
    calls = stack.llm_calls()
    url = f"{stack.no_processor_url}/v1/chat/completions"
    resumed = httpx.post(
        url,
        json=payload,
        headers=headers(stack, **{"Last-Event-ID": f"{session}:4"}),
        timeout=TIMEOUT_S,
    )
    assert resumed.status_code == 200, resumed.text
    assert b"".join(events[:4]) + resumed.content == full.content
    assert stack.llm_calls() == calls
    # The processor really is down for this Envoy: a generation reaches the LLM untagged.
    fresh = httpx.post(url, json=payload, headers=headers(stack), timeout=TIMEOUT_S)
    assert fresh.status_code == 200, fresh.text
    assert "x-relay-session" not in fresh.headers and not ID_LINE.findall(fresh.content)
    assert stack.llm_calls() == calls + 1


@pytest.mark.parametrize("platform", DETACHED)
def test_detached_generation_survives_its_client(mesh: Mesh, platform: str) -> None:
    stack = mesh.stacks[platform]
    payload = chat(30, f"keep going without me on {platform}")
    calls = stack.llm_calls()
    with httpx.Client(timeout=TIMEOUT_S) as client:
        chunks = stream(client, stack, payload, **{"x-demo-rate": "15"})
        session = next(chunks).decode()
        head = read_until(chunks, 3)
        chunks.close()  # the client drops about 0.2 s into a ~2 s answer
    assert session_info(stack, session)["state"] == "open"
    ended = wait_for_state(stack, session, "done")  # the generation went on without it
    assert ended["last_seq"] == 33
    last_id = sse_events(head)[-1][0]
    rest = post(stack, payload, **{"Last-Event-ID": last_id})
    whole = post(stack, payload, **{"Last-Event-ID": f"{session}:0"})
    assert b"".join(events_of(head)) + rest.content == whole.content
    assert whole.content.endswith(b"data: [DONE]\n\n")
    assert stack.llm_calls() == calls + 1  # one LLM call for the generation and both resumes


@pytest.mark.parametrize("platform", ALL)
async def test_multicast_on_every_reader_protocol(mesh: Mesh, platform: str) -> None:
    stack = mesh.stacks[platform]
    async with (
        asyncio.timeout(TIMEOUT_S),
        httpx.AsyncClient(timeout=TIMEOUT_S) as client,
        client.stream(
            "POST",
            f"{stack.base_url}/v1/chat/completions",
            json=chat(40, f"watch me on {platform}"),
            headers=headers(stack, **{"x-demo-rate": "40"}),
        ) as original,
    ):
        session = original.headers["x-relay-session"]
        readers = asyncio.gather(
            read_sse(stack, session), read_ws(stack, session), read_grpc(stack, session)
        )
        body = b"".join([chunk async for chunk in original.aiter_bytes()])
        reads = await readers
    own = sse_events(body)
    assert len(own) == 43
    for events, end in reads:  # SSE, WebSocket, gRPC: the same events, ids and end
        assert events == own
        assert (end["state"], end["last_seq"]) == ("done", 43)


@pytest.mark.parametrize("platform", ALL)
def test_a_client_cannot_route_itself_to_the_relay(mesh: Mesh, platform: str) -> None:
    stack = mesh.stacks[platform]
    models = httpx.get(f"{stack.upstream_url}/v1/models", timeout=TIMEOUT_S).content
    for extra in ({}, {"x-forwarded-for": "10.0.0.1"}):  # "detached": the only value routed
        response = httpx.get(
            f"{stack.base_url}/v1/models",
            headers=headers(stack, **{"x-relay-target": "detached"}, **extra),
            timeout=TIMEOUT_S,
        )
        assert response.status_code == 200, response.text
        assert response.content == models  # the LLM answered, not the relay


@pytest.mark.parametrize("platform", ALL)
def test_a_client_cannot_claim_an_identity(mesh: Mesh, platform: str) -> None:
    """The identity headers are stripped before the processor: were one to reach the relay, it
    would own the session as that caller (or, malformed as here, refuse it 401)."""
    stack = mesh.stacks[platform]
    for forged in ({"x-relay-identity": "key:not one"}, {"x-relay-jwt-payload": "not-base64!"}):
        response = post(stack, chat(2, f"who am I on {platform}"), **forged)
        assert response.status_code == 200, response.text
        assert response.headers["x-relay-session"]  # tagged by the relay, which saw neither


def test_the_front_proxys_other_routes_never_reach_the_relay(mesh: Mesh) -> None:
    stack = mesh.stacks["plain"]
    started = "http.ingress_http.ext_proc.streams_started"
    before = stack.stats()[started]
    status = httpx.get(f"{stack.base_url}/status", headers=headers(stack), timeout=TIMEOUT_S)
    assert status.text == "front proxy ok"
    echoed = httpx.get(
        f"{stack.base_url}/app/echo-headers", headers=headers(stack), timeout=TIMEOUT_S
    )
    assert echoed.status_code == 200 and echoed.headers["x-front-proxy"] == "yes"
    assert stack.stats()[started] == before  # the filter is off on the other app's routes
    post(stack, chat(3, "counted"))
    assert stack.stats()[started] == before + 1


@pytest.mark.parametrize("platform", ALL)
def test_a_stream_longer_than_60s_stays_whole_and_tagged(mesh: Mesh, platform: str) -> None:
    long = mesh.long[platform].result(timeout=LONG_TOKENS / LONG_RATE + 2 * TIMEOUT_S)
    assert long.response.status_code == 200
    assert long.seconds > LONG_MIN_S
    session = long.response.headers["x-relay-session"]
    events = sse_events(long.body)
    assert [e[0] for e in events] == [f"{session}:{n}" for n in range(1, LONG_TOKENS + 4)]
    assert events[-1][1] == "[DONE]"
    stack = mesh.stacks[platform]
    assert session_info(stack, session)["state"] == "done"
    stats = stack.stats()
    assert not any(
        v
        for k, v in stats.items()
        if k.endswith(("ext_proc.message_timeouts", "ext_proc.failure_mode_allowed"))
    )


@pytest.mark.parametrize("platform", ALL)
def test_with_the_relay_down_the_llm_still_answers(mesh: Mesh, platform: str) -> None:
    """Last for each stack: it kills the relay node."""
    stack = mesh.stacks[platform]
    stack.kill_relay()
    response = post(stack, chat(8, f"relay down on {platform}"))
    assert response.status_code == 200
    assert "x-relay-session" not in response.headers
    assert not ID_LINE.findall(response.content)
    assert events_of(response.content)[-1] == b"data: [DONE]\n\n"
    allowed = [v for k, v in stack.stats().items() if k.endswith("ext_proc.failure_mode_allowed")]
    assert sum(allowed) >= 1
