"""Backpressure end to end: a reader that stops reading is held back by flow control, never
buffered without bound, and never slows the producer or the other readers."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from conftest import envoy_stats, make_stack
from test_detached import wait_for
from test_e2e_inline import chat, events_of

from extproc.supervisor import Stack

BIG = 4096  # the demo upstream's largest answer: ~1 MB of events


@contextmanager
def stalled_client(stack: Stack, request: bytes) -> Iterator[socket.socket]:
    """A client with a tiny receive window that sends a request and then reads nothing."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    try:
        sock.sendall(request)
        yield sock
    finally:
        sock.close()


def read_all(sock: socket.socket) -> bytes:
    """Read a chunked HTTP/1.1 response to its end; return the decoded body."""
    raw = b""
    while not raw.endswith(b"\r\n0\r\n\r\n"):
        piece = sock.recv(1 << 16)
        assert piece, "connection closed before the end of the body"
        raw += piece
    body, rest = b"", raw.split(b"\r\n\r\n", 1)[1]
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


def post_request(path: str, payload: dict[str, object], **headers: str) -> bytes:
    body = json.dumps(payload).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: relay",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get_request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode()


def test_inline_client_that_stops_reading_pauses_the_upstream(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, write_path="inline")
    try:
        payload = chat(max_tokens=BIG, prompt="flood a slow client")
        request = post_request("/v1/chat/completions", payload, **{"x-demo-rate": "0"})
        with stalled_client(stack, request) as sock:
            # Envoy's watermark stops it reading the LLM instead of buffering the answer.
            wait_for(
                "Envoy to pause reading the upstream",
                lambda: (
                    envoy_stats(stack)["cluster.llm.upstream_flow_control_paused_reading_total"] > 0
                ),
            )
            body = read_all(sock)
        events = events_of(body)
        assert len(events) == BIG + 3  # and nothing was lost on the way
        assert events[-1].endswith(b"data: [DONE]\n\n")
    finally:
        stack.stop()


def test_a_stalled_reader_neither_blocks_nor_slows_the_others(detached_stack: Stack) -> None:
    stack = detached_stack
    first = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        timeout=60,
        json=chat(max_tokens=BIG, prompt="one slow, one fast"),
        headers={"x-demo-rate": "0"},
    )
    session = first.headers["x-relay-session"]
    path = f"/relay/v1/sessions/{session}/events"
    with stalled_client(stack, get_request(path)) as slow:
        # While the slow reader has read nothing, a fast one gets the whole session.
        fast = httpx.get(f"{stack.base_url}{path}", timeout=60)
        assert fast.status_code == 200
        assert fast.content.count(b"\nid: ") + fast.content.startswith(b"id: ") == BIG + 3
        paused = "cluster.relay_http.upstream_flow_control_paused_reading_total"
        try:
            wait_for(
                "Envoy to hold back the stalled reader", lambda: envoy_stats(stack)[paused] > 0
            )
        except AssertionError:  # say what the relay and Envoy saw, to tell flow from timing
            info = httpx.get(f"{stack.base_url}/relay/v1/sessions/{session}").text
            flow = {k: v for k, v in envoy_stats(stack).items() if "flow_control" in k}
            raise AssertionError(f"no pause; session {info}; flow control {flow}") from None
        late = read_all(slow)  # and the slow one still gets every event, identical
    assert late == fast.content
