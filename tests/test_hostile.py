"""Hostile input through a real stack: an upstream that sends garbage, clients that send
garbage, and Envoy's limits (body size, header size, header timeout, connection count).
Whatever happens, the relay keeps running and a normal stream next to the hostile ones is
untouched. Load is bounded: a few MB, a few thousand small requests, a handful of sockets."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from conftest import envoy_stats, make_stack
from hypothesis import given
from hypothesis import strategies as st

from extproc.errors import MalformedEventId, SessionNotFound
from extproc.ops.envoy_security import EnvoySecurity
from extproc.ops.supervisor import Stack
from extproc.session.framing import FrameTooLarge, NdjsonFramer, SseFramer
from extproc.session.ids import format_event_id, new_session_id, parse_event_id

MAX_EVENT_BYTES = 64 * 1024  # the relay's --max-event-bytes in this module's stack
MAX_REQUEST_BYTES = 32 * 1024  # generation bodies: Envoy (declared length) and the relay
MAX_HEADERS_KB = 8
HEADERS_TIMEOUT_S = 1.0
NORMAL_EVENTS = 40
TIMEOUT_S = 30.0


# --- the hostile upstream --------------------------------------------------------------------


def _sse_event(n: int) -> bytes:
    return b"data: " + json.dumps({"n": n}).encode() + b"\n\n"


async def _normal(resp: web.StreamResponse) -> None:
    for n in range(NORMAL_EVENTS):
        await resp.write(_sse_event(n))
        await asyncio.sleep(0.005)  # pacing, so it runs alongside the hostile streams
    await resp.write(b"data: [DONE]\n\n")


async def _no_newline(resp: web.StreamResponse) -> None:
    await resp.write(_sse_event(0))
    for _ in range(16):  # 1 MiB, 16x the event limit, without a single line end
        await resp.write(b"x" * 65536)


async def _huge_event(resp: web.StreamResponse) -> None:
    await resp.write(_sse_event(0))
    await resp.write(b"data: " + b"y" * (2 * MAX_EVENT_BYTES) + b"\n\n")
    await resp.write(_sse_event(2))


async def _binary_junk(resp: web.StreamResponse) -> None:
    await resp.write(b"data: \xff\xfe\xc3\x28 invalid utf-8\n\n")
    await resp.write(b"data: nul \x00 inside\n\n")
    await resp.write(b"data: a bare CR\rid: forged-id\r\n\r\n")  # CR ends a line in SSE
    await resp.write(b"id: upstream-id\nevent: x\x00y\ndata: z\n\n")
    await resp.write(b"data: [DONE]\n\n")


async def _tiny_events(resp: web.StreamResponse) -> None:
    await resp.write(b"data: x\n\n" * 5000)  # 5,000 events in one write


STREAMS: dict[str, Callable[[web.StreamResponse], Awaitable[None]]] = {
    "normal": _normal,
    "no-newline": _no_newline,
    "huge-event": _huge_event,
    "binary-junk": _binary_junk,
    "tiny-events": _tiny_events,
}


async def _chat(request: web.Request) -> web.StreamResponse:
    """The model name picks the stream: the hostile server is the stack's only upstream."""
    body = await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await STREAMS[body["model"]](resp)
    await resp.write_eof()
    return resp


@pytest.fixture(scope="module")
def hostile_upstream() -> Iterator[str]:
    """The server runs on its own event loop thread: the stack outlives each test's loop."""
    import threading

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    runner = web.AppRunner(app, handler_cancellation=True)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = int(runner.addresses[0][1])
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture(scope="module")
def hostile(hostile_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = make_stack(
        tmp_path_factory.mktemp("hostile"),
        upstream=hostile_upstream,
        relay_args=(
            *("--max-event-bytes", str(MAX_EVENT_BYTES)),
            *("--max-request-bytes", str(MAX_REQUEST_BYTES)),
        ),
        security=EnvoySecurity(
            max_request_bytes=MAX_REQUEST_BYTES,
            max_request_headers_kb=MAX_HEADERS_KB,
            request_headers_timeout_s=HEADERS_TIMEOUT_S,
        ),
    )
    yield stack
    try:
        assert stack.dead_child() is None, "a child died during the hostile tests"
    finally:
        stack.stop()


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True}


async def stream(client: httpx.AsyncClient, model: str) -> tuple[str, bytes, dict[str, object]]:
    """One generation read to its end (or its cut); its session id, bytes and final state."""
    body = b""
    async with client.stream("POST", "/v1/chat/completions", json=chat(model)) as response:
        assert response.status_code == 200
        session = response.headers["x-relay-session"]
        try:
            async for chunk in response.aiter_raw():
                body += chunk
        except httpx.RemoteProtocolError:
            pass  # a session that did not end done is cut, never passed off as complete
    info = (await client.get(f"/relay/v1/sessions/{session}")).json()
    return session, body, info


async def assert_normal_stream(client: httpx.AsyncClient) -> None:
    session, body, info = await stream(client, "normal")
    assert info["state"] == "done", info
    ids = [line for line in body.split(b"\n") if line.startswith(b"id: ")]
    expected = [f"id: {format_event_id(session, n)}".encode() for n in range(1, NORMAL_EVENTS + 2)]
    assert ids == expected


@pytest.fixture
async def client(hostile: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hostile.base_url, timeout=TIMEOUT_S) as c:
        yield c


# --- a hostile upstream ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "state", "reason"),
    [
        ("no-newline", "failed", f"event larger than {MAX_EVENT_BYTES} bytes"),
        ("huge-event", "failed", f"event larger than {MAX_EVENT_BYTES} bytes"),
        ("binary-junk", "done", ""),
        ("tiny-events", "done", ""),
    ],
)
async def test_hostile_stream_ends_as_documented_and_a_normal_one_is_untouched(
    client: httpx.AsyncClient, model: str, state: str, reason: str
) -> None:
    (session, body, info), _ = await asyncio.gather(
        stream(client, model), assert_normal_stream(client)
    )
    assert info["state"] == state, info
    assert info["reason"] == reason
    assert body.startswith(f"id: {session}:1\n".encode())
    if model == "tiny-events":
        assert info["last_seq"] == 5000
        assert body.count(b"\nid: ") + 1 == 5000
    if model == "binary-junk":
        # Every byte but the replaced upstream id lines arrives as sent.
        assert b"\xff\xfe\xc3\x28" in body
        assert b"x\x00y" in body
        assert b"upstream-id" not in body and b"forged-id" not in body
        assert info["last_seq"] == 5


# --- hostile clients -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "last_event_id",
    ["garbage", "a" * 300, f"{new_session_id()}:-1", f"{new_session_id()}:1e3", ":::", "x y:1"],
)
async def test_malformed_last_event_ids_get_a_typed_400(
    client: httpx.AsyncClient, last_event_id: str
) -> None:
    """Where Last-Event-ID is the relay's (its reader endpoints), an id it never issued is a
    typed 400; on a generation route it is not a relay id, so not a resume: a new answer."""
    response = await client.get(
        f"/relay/v1/sessions/{new_session_id()}/events", headers={"last-event-id": last_event_id}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "malformed_event_id"
    generation = await client.post(
        "/v1/chat/completions", json=chat("normal"), headers={"last-event-id": last_event_id}
    )
    assert generation.status_code == 200, generation.text
    assert f"id: {generation.headers['x-relay-session']}:1\n" in generation.text


async def test_an_overlong_header_is_refused_by_envoy(
    hostile: Stack, client: httpx.AsyncClient
) -> None:
    """Envoy's codec refuses it before any filter runs. Its 431 local reply does not reach the
    client: ext_proc (response headers SEND) is still processing that reply when the codec
    closes the connection, so HTTP/1.1 clients see a close and HTTP/2 clients a stream reset
    (SECURITY.md). Either way nothing reaches the relay or the LLM."""
    before = envoy_stats(hostile)
    overlong = "x" * (MAX_HEADERS_KB * 1024 + 1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await client.post(
            "/v1/chat/completions", json=chat("normal"), headers={"last-event-id": overlong}
        )
    async with httpx.AsyncClient(http1=False, http2=True, timeout=TIMEOUT_S) as h2:
        with pytest.raises(httpx.RemoteProtocolError, match="StreamReset"):
            await h2.get(f"{hostile.base_url}/v1/models", headers={"x-big": overlong})
    after = envoy_stats(hostile)
    for counter in ("http.relay.downstream_cx_protocol_error", "http.relay.downstream_rq_rx_reset"):
        assert after[counter] > before.get(counter, 0), counter
    for counter in ("cluster.relay_http.upstream_rq_total", "cluster.llm.upstream_rq_total"):
        assert after.get(counter, 0) == before.get(counter, 0), counter
    await assert_normal_stream(client)


async def test_a_declared_body_over_the_limit_gets_413_from_envoy(
    hostile: Stack, client: httpx.AsyncClient
) -> None:
    body = chat("normal") | {"padding": "p" * MAX_REQUEST_BYTES}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    # Refused on the headers alone: no byte of the body needs to be sent.
    head = raw_request(
        hostile,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
        b"content-length: %d\r\n\r\n" % (MAX_REQUEST_BYTES + 1),
    )
    assert head.startswith(b"HTTP/1.1 413 ")
    # Chunked (no content-length): the relay's own limit, same number, answers 429.
    data = json.dumps(body).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    response = await client.post("/v1/chat/completions", content=chunked())
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "limit_exceeded"
    await assert_normal_stream(client)


def raw_request(stack: Stack, request: bytes) -> bytes:
    """Send raw bytes (CR/LF and all, which httpx refuses to send) and read until close."""
    host, port = httpx.URL(stack.base_url).host, httpx.URL(stack.base_url).port
    assert port is not None
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_header_injection_through_last_event_id_is_inert(hostile: Stack) -> None:
    """On the relay's reader endpoint, where Last-Event-ID is the relay's."""
    injected = [
        # A second line smuggles internal headers: Envoy strips them (internal_only_headers).
        b"Last-Event-ID: x\r\nx-relay-target: detached\r\nx-relay-identity: key:admin",
        # A bare CR is no line end for Envoy: it stays in the value, which the relay refuses.
        b"Last-Event-ID: x\rx-relay-target: detached",
        # NUL or DEL in a value: Envoy's codec drops the request and closes the connection.
        b"Last-Event-ID: x\x00y",
        b"Last-Event-ID: x\x7fy",
    ]
    statuses = []
    reader = f"/relay/v1/sessions/{new_session_id()}/events".encode()
    for header in injected:
        answer = raw_request(
            hostile,
            b"GET " + reader + b" HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n"
            + header
            + b"\r\n\r\n",
        )  # fmt: skip
        statuses.append(answer.split(b" ", 2)[1] if answer else b"closed")
        if answer:
            assert b'"malformed_event_id"' in answer  # the relay refused the id, nothing else
    assert statuses == [b"400", b"400", b"closed", b"closed"]
    assert hostile.dead_child() is None


async def test_thousands_of_random_session_ids_are_all_the_same_typed_404(
    client: httpx.AsyncClient,
) -> None:
    ids = [secrets.token_urlsafe(16) for _ in range(2000)]
    gate = asyncio.Semaphore(32)

    async def lookup(session: str) -> tuple[str, int, bytes]:
        async with gate:
            response = await client.get(f"/relay/v1/sessions/{session}")
            return session, response.status_code, response.content

    for session, status, body in await asyncio.gather(*(lookup(s) for s in ids)):
        assert status == 404
        # Byte for byte the body the store's one not-found path builds: nothing else varies.
        assert body == SessionNotFound(f"no session {session}").json_body()
    await assert_normal_stream(client)


def test_slowloris_sockets_are_closed_by_the_header_timeout(hostile: Stack) -> None:
    host, port = httpx.URL(hostile.base_url).host, httpx.URL(hostile.base_url).port
    assert port is not None
    before = envoy_stats(hostile).get("http.relay.downstream_rq_header_timeout", 0)
    sockets = [socket.create_connection((host, port), timeout=TIMEOUT_S) for _ in range(4)]
    try:
        for sock in sockets:  # headers started, one byte at a time, then never finished
            for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: r":
                sock.send(bytes([byte]))
        for sock in sockets:  # recv blocks until Envoy answers and closes (or TIMEOUT_S)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        for sock in sockets:
            sock.close()
    after = envoy_stats(hostile)["http.relay.downstream_rq_header_timeout"]
    assert after - before == len(sockets)


def test_the_relay_survived_and_still_streams(hostile: Stack) -> None:
    assert hostile.dead_child() is None

    async def check() -> None:
        async with httpx.AsyncClient(base_url=hostile.base_url, timeout=TIMEOUT_S) as c:
            await assert_normal_stream(c)

    asyncio.run(check())


# --- the connection limit (a stack of its own: the count is global) -------------------------


def test_connections_beyond_the_limit_are_refused_and_the_others_keep_working(
    hostile_upstream: str, tmp_path: Path
) -> None:
    limit = 5
    stack = make_stack(
        tmp_path, upstream=hostile_upstream, security=EnvoySecurity(max_connections=limit)
    )
    host, port = httpx.URL(stack.base_url).host, httpx.URL(stack.base_url).port
    assert port is not None
    open_connections: list[http.client.HTTPConnection] = []

    def get(conn: http.client.HTTPConnection) -> int:
        conn.request("GET", f"/relay/v1/sessions/{new_session_id()}")
        response = conn.getresponse()
        response.read()
        return response.status

    try:
        for _ in range(limit):
            conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
            assert get(conn) == 404  # accepted, and kept alive
            open_connections.append(conn)
        extra = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            get(extra)  # Envoy accepts the socket and closes it at once
        extra.close()
        assert all(get(conn) == 404 for conn in open_connections)  # the others keep working
        overflow = [
            v for k, v in envoy_stats(stack).items() if k.endswith("downstream_global_cx_overflow")
        ]
        assert sum(overflow) >= 1
        # A freed slot is usable again once Envoy has seen the close.
        open_connections.pop().close()
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            again = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
            try:
                assert get(again) == 404
                break
            except (http.client.RemoteDisconnected, ConnectionResetError):
                again.close()
                assert time.monotonic() < deadline, "the freed slot never came back"
        again.close()
    finally:
        for conn in open_connections:
            conn.close()
        stack.stop()


# --- properties of the framer and the id parser ----------------------------------------------


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_with_a_small_limit_no_byte_is_lost_or_invented(data: bytes, cuts: list[int]) -> None:
    """Any bytes, any chunking, a tiny limit: frames plus the refused rest are the input."""
    for cls in (SseFramer, NdjsonFramer):
        framer = cls(max_frame_bytes=64)
        out = b""
        points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
        try:
            for start, end in itertools.pairwise(points):
                out += b"".join(f.raw for f in framer.feed(data[start:end]))
            last = framer.close()
            out += last.raw if last is not None else b""
        except FrameTooLarge as exc:
            out += b"".join(f.raw for f in exc.frames) + exc.rest
            assert data.startswith(out)  # what is not yet fed is the caller's
            continue
        assert out == data


@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_an_event_id_are_refused_or_round_trip(raw: bytes) -> None:
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        parsed = parse_event_id(text)
    except MalformedEventId:
        return
    assert format_event_id(parsed.session, parsed.seq) == text
