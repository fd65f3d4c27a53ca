"""Backpressure end to end: a reader that stops reading is held back by flow control, never
buffered without bound, and never slows the producer or the other readers.

The stalled clients speak HTTP/2 with the default 64 KiB stream window and acknowledge
nothing, so Envoy may send them one window whatever the kernel's socket buffers would take:
the rest must wait in Envoy's bounded buffer, which raises its watermark.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
from conftest import envoy_stats, make_stack
from test_detached import wait_for
from test_e2e import chat, events_of

from extproc.ops.supervisor import Stack

BIG = 4096  # the demo upstream's largest answer: ~1 MB of events
# ~2 s of generation: the upstream is still sending when the stalled client's window and
# Envoy's buffer are full, so there is an upstream read to pause (at rate 0 it could finish
# into Envoy's buffers first and leave nothing to pause).
LIVE = {"x-demo-rate": "2000"}


class StalledH2Client:
    """A raw HTTP/2 client with the protocol's default 64 KiB stream window that, after the
    response headers, acknowledges nothing until told to read: Envoy may send it one window
    and no more. (httpx opens a 16 MiB window per stream, which hides any backpressure.)"""

    def __init__(
        self,
        stack: Stack,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        host, port = stack.base_url.removeprefix("http://").split(":")
        self._sock = socket.create_connection((host, int(port)), timeout=30)
        self._h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self._h2.initiate_connection()
        request = [
            (":method", method),
            (":path", path),
            (":scheme", "http"),
            (":authority", f"{host}:{port}"),
            *(headers or {}).items(),
        ]
        if body:
            request.append(("content-type", "application/json"))
        self._stream = self._h2.get_next_available_stream_id()
        self._h2.send_headers(self._stream, request, end_stream=not body)
        if body:
            self._h2.send_data(self._stream, body, end_stream=True)
        self._sock.sendall(self._h2.data_to_send())
        self.headers: dict[str, str] = {}
        self._body = bytearray()
        self._ended = False
        while not self.headers:
            self._pump(acknowledge=False)

    def _pump(self, *, acknowledge: bool) -> None:
        data = self._sock.recv(1 << 16)
        assert data, "connection closed"
        for event in self._h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                self._body += event.data
                if acknowledge:
                    self._h2.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, h2.events.StreamEnded):
                self._ended = True
        self._sock.sendall(self._h2.data_to_send())

    def read_all(self) -> bytes:
        """Now read: open the window as data arrives, until the stream ends."""
        self._h2.acknowledge_received_data(len(self._body), self._stream)
        self._sock.sendall(self._h2.data_to_send())
        while not self._ended:
            self._pump(acknowledge=True)
        return bytes(self._body)

    def close(self) -> None:
        self._sock.close()


@contextmanager
def stalled_stream(
    stack: Stack, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Iterator[StalledH2Client]:
    client = StalledH2Client(stack, method, path, body, headers)
    try:
        assert client.headers[":status"] == "200"
        yield client
    finally:
        client.close()


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
            stack, "POST", "/v1/chat/completions", json.dumps(payload).encode(), LIVE
        ) as response:
            # Envoy's watermark stops it reading the LLM instead of buffering the answer.
            wait_for_pause(stack, "llm")
            body = response.read_all()
        events = events_of(body)
        assert len(events) == BIG + 3  # and nothing was lost on the way
        assert events[-1].endswith(b"data: [DONE]\n\n")
    finally:
        stack.stop()


def test_a_stalled_reader_neither_blocks_nor_slows_the_others(detached_stack: Stack) -> None:
    stack = detached_stack
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{stack.base_url}/v1/chat/completions",
            headers=LIVE,
            json=chat(max_tokens=BIG, prompt="one slow, one fast"),
        ) as first,
    ):
        session = first.headers["x-relay-session"]  # the generation goes on without it
    path = f"/relay/v1/sessions/{session}/events"
    with stalled_stream(stack, "GET", path) as slow:
        # While the slow reader has read nothing, a fast one gets the whole session.
        fast = httpx.get(f"{stack.base_url}{path}", timeout=60)
        assert fast.status_code == 200
        assert fast.content.count(b"\nid: ") + 1 == BIG + 4  # the events and relay.end
        wait_for_pause(stack, "relay_http")
        late = slow.read_all()  # and the slow one still gets every event, identical
    assert late == fast.content
