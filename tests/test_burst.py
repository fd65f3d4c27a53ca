"""A burst of readers opened at once on one session, through a real Envoy and relay node: every
one gets the relay's answer, a 200 event stream up to the per-session limit and a typed JSON
429 beyond it, never Envoy's plain-text 503 (listen backlog, connect timeout and circuit
breakers sized for it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import make_stack
from test_e2e import chat
from test_observability import relay_value, wait_for

from extproc.ops.supervisor import Stack

# --max-readers-per-session: above the 1,024 requests of Envoy's default circuit breakers
LIMIT = 1030
BURST = 1050  # readers opened at once
BURST_TIMEOUT_S = 60.0


@pytest.fixture
def burst_stack(tmp_path: Path) -> Iterator[Stack]:
    running = make_stack(
        tmp_path,
        # The generation outlives its first client by far, so the burst reads a live session.
        relay_args=("--max-readers-per-session", str(LIMIT), "--detach-grace", "120"),
    )
    yield running
    running.stop()


def start_session(stack: Stack) -> str:
    """A slow detached generation whose first client leaves at once (it keeps running)."""
    payload = chat(max_tokens=2000, prompt="a long one")
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{stack.base_url}/v1/chat/completions",
            json=payload,
            headers={"x-demo-rate": "2"},
        ) as response,
    ):
        assert response.status_code == 200
        return response.headers["x-relay-session"]


class Tally:
    """Counts readers that have their answer; `all_in` once every one has."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.all_in = asyncio.Event()
        self.release = asyncio.Event()  # set: the readers holding a 200 may close

    def arrived(self) -> None:
        self.count += 1
        if self.count == self.expected:
            self.all_in.set()


async def open_reader(host: str, port: int, path: str, tally: Tally) -> str:
    """One reader: its status and whether the relay answered it (a 200 event stream, or the
    typed JSON error); a reader with a 200 stays attached until `tally.release`."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status = int(head.split(" ", 2)[1])
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, value in (line.split(":", 1) for line in head.split("\r\n")[1:] if line)
        )
        if status == 200:
            typed = headers.get("content-type", "").startswith("text/event-stream")
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            try:
                typed = json.loads(body)["error"]["code"] == "limit_exceeded"
            except (ValueError, KeyError, TypeError):
                typed = False
        tally.arrived()
        if status == 200:
            await tally.release.wait()
        return f"{status} {'relay' if typed else 'other: ' + head.splitlines()[0]}"
    except OSError as exc:
        tally.arrived()
        return f"error: {exc!r}"
    finally:
        writer.close()


async def burst(stack: Stack, session: str) -> tuple[Counter[str], float]:
    """Every reader's answer, and how many readers the relay had attached at the peak."""
    url = urlsplit(stack.base_url)
    assert url.hostname is not None and url.port is not None
    path = f"/relay/v1/sessions/{session}/events"
    tally = Tally(BURST)
    tasks = [
        asyncio.create_task(open_reader(url.hostname, url.port, path, tally)) for _ in range(BURST)
    ]
    peak = 0.0
    with contextlib.suppress(TimeoutError):  # those without an answer are counted below
        async with asyncio.timeout(BURST_TIMEOUT_S):
            await tally.all_in.wait()
            peak = await asyncio.to_thread(
                relay_value, stack, "relay_readers_active", protocol="sse"
            )
            tally.release.set()
            await asyncio.wait(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    return Counter(t.result() if not t.cancelled() else "no answer" for t in tasks), peak


def test_a_burst_of_readers_gets_200s_up_to_the_limit_and_typed_429s_beyond(
    burst_stack: Stack,
) -> None:
    session = start_session(burst_stack)
    answers, peak = asyncio.run(burst(burst_stack, session))
    assert answers == {"200 relay": LIMIT, "429 relay": BURST - LIMIT}, answers
    assert peak == LIMIT
    wait_for(  # every reader left
        "the readers to detach",
        lambda: relay_value(burst_stack, "relay_readers_active", protocol="sse") == 0,
    )
