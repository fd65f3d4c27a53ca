"""A real EventSource (npm `eventsource`, run by Node) reads a session through cuts.

The chaos proxy cuts the reader's connection mid-stream; the EventSource reconnects on its own
with `Last-Event-ID`, and what it prints must be every event exactly once, in order: the same
list a standard SSE client reads from the same endpoint with no cuts.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from chaos_proxy import ChaosProxy, CutPlan
from conftest import npm_ci_unless_installed, run_to_end
from test_chaos import envoy_port, no_reuse_client, reference_events
from test_e2e import chat, events_of

from extproc.ops.supervisor import Stack

JS_DIR = Path(__file__).parent / "js"
READER = JS_DIR / "eventsource_reader.mjs"
NPM_CI_TIMEOUT_S = 180
READER_TIMEOUT_S = 20
RECONNECTS = re.compile(r'^relay_client_reconnects_total\{protocol="sse"\} (\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class Node:
    node: str
    reader: Path


@pytest.fixture(scope="session")
def node_reader() -> Iterator[Node]:
    """Node with tests/js installed (`npm ci` once, if node_modules is missing or stale)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH (CI installs them)")
    pinned = json.loads((JS_DIR / "package.json").read_text())["dependencies"]["eventsource"]
    npm_ci_unless_installed(npm, JS_DIR, "eventsource", pinned, timeout_s=NPM_CI_TIMEOUT_S)
    yield Node(node, READER)


@dataclass
class ReaderRun:
    returncode: int
    lines: list[dict[str, str]]
    stderr: str

    @property
    def connects(self) -> list[dict[str, str | None]]:
        records = [json.loads(line) for line in self.stderr.splitlines() if line.startswith("{")]
        return [r for r in records if "connect" in r]


async def run_reader(node: Node, url: str, *extra: str) -> ReaderRun:
    timeout_ms = str((READER_TIMEOUT_S - 5) * 1000)
    argv = (node.node, str(node.reader), url, "--timeout-ms", timeout_ms, *extra)
    returncode, out, err = await run_to_end(*argv, kill_after_s=READER_TIMEOUT_S)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    return ReaderRun(returncode, lines, err.decode())


async def sse_reconnects(stack: Stack) -> float:
    """The relay's own count of SSE readers that came back with an event id."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        text = (await client.get(stack.metrics_url)).text
    found = RECONNECTS.search(text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_eventsource_resumes_through_cuts(
    detached_stack: Stack, node_reader: Node, seed: int
) -> None:
    stack = detached_stack
    # Two cuts, both mid-stream: the first after a few events (so the reconnect carries an
    # id), the second early in the resumed stream; then no more.
    plan = CutPlan(seed=seed, low=200, high=4000, first_low=2000, always_cut=2, keep_probability=1)
    reconnects_before = await sse_reconnects(stack)
    payload = chat(max_tokens=60, prompt="an eventsource through chaos")
    async with (
        asyncio.timeout(READER_TIMEOUT_S + 10),
        ChaosProxy(envoy_port(stack), plan) as proxy,
        no_reuse_client(stack.base_url) as direct,
        direct.stream(
            "POST", "/v1/chat/completions", json=payload, headers={"x-demo-rate": "100"}
        ) as original,  # ~0.6 s of generation: the reader starts while it is live
    ):
        session = original.headers["x-relay-session"]
        first_client = asyncio.create_task(original.aread())
        run = await run_reader(
            node_reader, f"{proxy.url}/relay/v1/sessions/{session}/events", "--retry-ms", "50"
        )
        original_body = await first_client
    assert run.returncode == 0, run.stderr
    expected = await reference_events(stack, session)
    assert len(events_of(original_body)) == 63
    assert [e.id for e in expected[:-1]] == [f"{session}:{n}" for n in range(1, 64)]

    *messages, end = run.lines
    assert [(m["type"], m["id"], m["data"]) for m in messages] == [
        ("message", e.id, e.data) for e in expected[:-1]
    ]  # every event once, in order
    assert end["type"] == "relay.end"
    assert json.loads(end["data"]) == {"state": "done", "reason": "", "last_seq": 63}

    assert proxy.cuts == 2 and len(proxy.connections) == 3  # it did reconnect, twice
    sent = [c["lastEventId"] for c in run.connects]
    assert len(sent) == 3 and sent[0] is None
    printed = [m["id"] for m in messages]
    assert all(s in printed for s in sent[1:] if s is not None)
    assert sent[1] is not None  # the first cut came after some events: resumed with an id
    # Relay side: the reconnects that carried an id were counted as resumes of this session.
    resumed_with_id = sum(1 for s in sent[1:] if s is not None)
    assert await sse_reconnects(stack) - reconnects_before == resumed_with_id


async def test_eventsource_stops_at_204_and_reports_it(
    detached_stack: Stack, node_reader: Node
) -> None:
    """The script must fail loudly when the EventSource gives up, not exit 0 with nothing."""
    stack = detached_stack
    async with no_reuse_client(stack.base_url) as direct:
        done = await direct.post("/v1/chat/completions", json=chat(max_tokens=3))
    session = done.headers["x-relay-session"]
    past_end = len(events_of(done.content)) + 1  # the id of relay.end: nothing is left after it
    url = f"{stack.base_url}/relay/v1/sessions/{session}/events?after={session}:{past_end}"
    run = await run_reader(node_reader, url)
    assert run.returncode == 1
    assert run.lines == []
    assert "204" in run.stderr
