"""Backpressure end to end: a reader that stops reading is held back by flow control, never
buffered without bound, and never slows the producer or the other readers.

The stalled clients speak HTTP/2 and never acknowledge data, so Envoy may send them at most
one stream window (64 KiB, envoy/envoy.yaml) whatever the kernel's socket buffers would take:
the rest must wait in Envoy's bounded buffer, which raises its watermark.
"""

from __future__ import annotations

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
def stalled_stream(
    stack: Stack, method: str, path: str, **kwargs: object
) -> Iterator[httpx.Response]:
    """An HTTP/2 response whose body nobody reads yet (no WINDOW_UPDATE is sent for it)."""
    with (
        httpx.Client(http1=False, http2=True, timeout=60) as client,
        client.stream(
            method,
            f"{stack.base_url}{path}",
            **kwargs,  # type: ignore[arg-type]
        ) as response,
    ):
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        yield response


def wait_for_pause(stack: Stack, cluster: str) -> None:
    stat = f"cluster.{cluster}.upstream_flow_control_paused_reading_total"
    try:
        wait_for(f"Envoy to pause reading {cluster}", lambda: envoy_stats(stack)[stat] > 0)
    except AssertionError:  # say what Envoy saw, to tell flow from timing
        flow = {k: v for k, v in envoy_stats(stack).items() if "flow_control" in k}
        raise AssertionError(f"Envoy never paused {cluster}; flow control: {flow}") from None


def test_inline_client_that_stops_reading_pauses_the_upstream(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, write_path="inline")
    try:
        payload = chat(max_tokens=BIG, prompt="flood a slow client")
        with stalled_stream(
            stack, "POST", "/v1/chat/completions", json=payload, headers={"x-demo-rate": "0"}
        ) as response:
            # Envoy's watermark stops it reading the LLM instead of buffering the answer.
            wait_for_pause(stack, "llm")
            body = response.read()
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
    with stalled_stream(stack, "GET", path) as slow:
        # While the slow reader has read nothing, a fast one gets the whole session.
        fast = httpx.get(f"{stack.base_url}{path}", timeout=60)
        assert fast.status_code == 200
        assert fast.content.count(b"\nid: ") + 1 == BIG + 4  # the events and relay.end
        wait_for_pause(stack, "relay_http")
        late = slow.read()  # and the slow one still gets every event, identical
    assert late == fast.content
