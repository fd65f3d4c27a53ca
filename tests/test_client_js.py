"""The JS client (clients/js, npm `stream-relay-client`) against a real stack, through cuts.

Node runs `clients/js/e2e/stack.mjs` (no npm dependencies needed) through the chaos
proxy: whatever the cuts, the events the client yields must be exactly those of the uncut
replay (`Last-Event-ID: <session>:0`), from one LLM call. The client's own unit tests
(`node --test clients/js/test/`, a fake fetch) run here too.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chaos_proxy import ChaosProxy, CutPlan
from conftest import run_to_end
from test_chaos import (
    CUT_ERRORS,
    HEAD_BYTES_MAX,
    STREAM_BYTES,
    EventParser,
    envoy_port,
    llm_calls,
    no_reuse_client,
    reference_events,
)
from test_e2e import chat

from extproc.ops.supervisor import Stack

JS_DIR = Path(__file__).parent.parent / "clients" / "js"
E2E = JS_DIR / "e2e" / "stack.mjs"
SCRIPT_TIMEOUT_S = 30
SEEDS = range(6)
MAX_TOKENS = 60
EVENTS = MAX_TOKENS + 3  # role + tokens + finish + [DONE]


@pytest.fixture(scope="session")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("node is not on PATH (scripts/test installs it)")
    return found


@dataclass
class Run:
    returncode: int
    result: dict[str, Any]
    stderr: str


async def run_e2e(node: str, *args: str) -> Run:
    returncode, out, err = await run_to_end(node, str(E2E), *args, kill_after_s=SCRIPT_TIMEOUT_S)
    lines = out.decode().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {out!r}; stderr: {err.decode()}"
    return Run(returncode, json.loads(lines[0]), err.decode())


def text_of(data: list[str]) -> str:
    text = ""
    for item in data:
        if item != "[DONE]":
            text += json.loads(item)["choices"][0]["delta"].get("content") or ""
    return text


async def uncut_replay(stack: Stack, session: str) -> list[tuple[str, str, str]]:
    """The whole stream from the log: the original request with `Last-Event-ID: <s>:0`."""
    async with no_reuse_client(stack.base_url) as direct:
        whole = await direct.post(
            "/v1/chat/completions",
            json=chat(max_tokens=MAX_TOKENS, prompt="a js client through chaos"),
            headers={"Last-Event-ID": f"{session}:0"},
        )
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-relay-session"] == session
    return [(e.id, e.event, e.data) for e in EventParser().feed(whole.content)]


def test_unit_tests_pass(node: str) -> None:
    done = subprocess.run(
        [node, "--test", "test/"],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", done.stdout, re.MULTILINE)
    assert passed is not None and int(passed.group(1)) >= 20, done.stdout[-2000:]
    assert re.search(r"^# fail 0$", done.stdout, re.MULTILINE)


@pytest.mark.parametrize("seed", SEEDS)
async def test_resumable_fetch_through_cuts(detached_stack: Stack, node: str, seed: int) -> None:
    stack = detached_stack
    calls_before = await llm_calls(stack)
    plan = CutPlan(
        seed=seed,
        low=0,  # resumed connections may be cut anywhere, the response head included
        high=STREAM_BYTES,
        keep_probability=0.25,
        always_cut=2,
        first_low=HEAD_BYTES_MAX,  # the first response must carry its session before a cut
    )
    async with ChaosProxy(envoy_port(stack), plan) as proxy:
        run = await run_e2e(node, "post", proxy.url, "--rate", "300", "--max-tokens", "60")
    assert run.returncode == 0, run.result
    got = run.result
    session = got["session"]
    expected = await uncut_replay(stack, session)

    assert proxy.cuts >= 1
    assert got["reconnects"] == len(proxy.connections) - 1  # one connection per attempt
    assert len(got["lastEventIds"]) == got["reconnects"]
    assert [e["id"] for e in got["events"]] == [f"{session}:{n}" for n in range(1, EVENTS + 1)]
    assert [(e["id"], e["event"], e["data"]) for e in got["events"]] == expected
    assert got["text"] == text_of([data for _, _, data in expected]) != ""
    assert got["done"] is True
    assert await llm_calls(stack) == calls_before + 1  # however many cuts, one generation


@pytest.mark.parametrize("seed", range(4))
async def test_subscribe_through_cuts(detached_stack: Stack, node: str, seed: int) -> None:
    """A second viewer joins the live session through cuts; it ends at relay.end."""
    stack = detached_stack
    plan = CutPlan(seed=seed, low=0, high=STREAM_BYTES, keep_probability=0.25, always_cut=1)
    async with (
        ChaosProxy(envoy_port(stack), plan) as proxy,
        no_reuse_client(stack.base_url) as direct,
        direct.stream(
            "POST",
            "/v1/chat/completions",
            json=chat(max_tokens=MAX_TOKENS, prompt="a js viewer"),
            headers={"x-demo-rate": "150"},  # ~0.4 s: the viewer joins while it is live
        ) as original,
    ):
        session = original.headers["x-relay-session"]
        first_client = asyncio.create_task(original.aread())
        run = await run_e2e(node, "subscribe", proxy.url, session)
        await first_client
    assert run.returncode == 0, run.result
    expected = await reference_events(stack, session)
    *messages, end = expected
    assert end.event == "relay.end"
    got = run.result
    assert proxy.cuts >= 1
    assert got["reconnects"] == len(proxy.connections) - 1
    assert got["events"] == [{"id": e.id, "event": e.event, "data": e.data} for e in messages]
    assert [e["id"] for e in got["events"]] == [f"{session}:{n}" for n in range(1, EVENTS + 1)]
    assert got["end"] == {"state": "done", "reason": "", "last_seq": EVENTS}
    assert got["text"] == text_of([e.data for e in messages]) != ""


async def test_subscribe_after_the_end_reports_the_end_state(
    detached_stack: Stack, node: str
) -> None:
    stack = detached_stack
    async with no_reuse_client(stack.base_url) as direct:
        done = await direct.post("/v1/chat/completions", json=chat(max_tokens=3))
    session = done.headers["x-relay-session"]
    run = await run_e2e(node, "subscribe", stack.base_url, session, "--after", f"{session}:6")
    assert run.returncode == 0, run.result
    assert run.result["events"] == []
    assert run.result["end"] == {"state": "done", "reason": "", "last_seq": 6}


@pytest.mark.parametrize(
    ("after", "error", "status", "code"),
    [
        (None, "SessionNotFound", 404, "session_not_found"),
        ("garbage", "RelayClientError", 400, "malformed_event_id"),
    ],
)
async def test_typed_errors_from_the_relay(
    detached_stack: Stack, node: str, after: str | None, error: str, status: int, code: str
) -> None:
    stack = detached_stack
    if after is None:
        session = "A" * 22  # well-formed, unknown
        args = ("subscribe", stack.base_url, session)
    else:
        async with no_reuse_client(stack.base_url) as direct:
            done = await direct.post("/v1/chat/completions", json=chat(max_tokens=3))
        session = done.headers["x-relay-session"]
        args = ("subscribe", stack.base_url, session, "--after", after)
    run = await run_e2e(node, *args)
    assert run.returncode == 1
    assert run.result["error"] == error
    assert run.result["typed"] is True
    assert (run.result["status"], run.result["code"]) == (status, code)


async def test_a_cancelled_session_exhausts_the_retry_budget(
    detached_stack: Stack, node: str
) -> None:
    """A session that did not end `done` is cut on every resume: never a short success."""
    stack = detached_stack
    async with no_reuse_client(stack.base_url) as direct:
        async with direct.stream(
            "POST",
            "/v1/chat/completions",
            json=chat(max_tokens=MAX_TOKENS, prompt="a js client through chaos"),
            headers={"x-demo-rate": "20"},  # ~3 s: cancelled long before its end
        ) as original:
            session = original.headers["x-relay-session"]
            cancelled = await direct.delete(f"/relay/v1/sessions/{session}")
            assert cancelled.status_code == 200, cancelled.text
            with pytest.raises(CUT_ERRORS):
                await original.aread()  # the first reader is cut too
        assert cancelled.json()["state"] == "cancelled"
    run = await run_e2e(
        node,
        "post",
        stack.base_url,
        "--last-event-id",
        f"{session}:0",
        "--max-reconnects",
        "3",
    )
    assert run.returncode == 1, run.result
    assert run.result["error"] == "RetryBudgetExhausted"
    assert run.result["lastEventIds"][0].startswith(f"{session}:")
    assert len(run.result["lastEventIds"]) == 3
