"""`stream-relay status` against a running stack: its numbers are what the traffic did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import make_stack
from httpx_sse import connect_sse
from test_detached import open_stream, read_events
from test_e2e import chat, events_of
from test_observability import relay_value, wait_for

from extproc.ops.stack_state import StackState, publish, running_stacks
from extproc.ops.status import DEFAULT_METRICS_URL, default_url, parse, render, run, summarize
from extproc.ops.supervisor import Stack

CLI = [sys.executable, "-m", "extproc.ops.cli", "status"]
STORE_BYTES = 1024 * 1024
LIVE_RATE = 20.0  # events/s of the generation that runs while status measures


@pytest.fixture(scope="module")
def status_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = make_stack(
        tmp_path_factory.mktemp("status"),
        relay_args=("--store-max-bytes", str(STORE_BYTES), "--detach-grace", "0.5"),
    )
    yield running
    running.stop()


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def line(output: str, topic: str) -> str:
    found = [text for text in output.splitlines() if text.split()[:1] == [topic]]
    assert len(found) == 1, output
    return found[0].split(None, 1)[1]


def post(stack: Stack, payload: dict[str, object], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=payload, headers=headers, timeout=30
    )


def test_status_shows_what_the_traffic_did(status_stack: Stack) -> None:
    stack = status_stack
    # Two large sessions: the second evicts the first from the 1 MiB store.
    big = chat(max_tokens=2400, prompt="large")
    evicted = post(stack, big, **{"x-demo-rate": "0"}).headers["x-relay-session"]
    post(stack, big, **{"x-demo-rate": "0"})
    # Three complete sessions that report usage: 2 prompt words, 5 completion tokens each.
    usage = chat(max_tokens=5, prompt="status check", stream_options={"include_usage": True})
    for _ in range(3):
        assert post(stack, usage).status_code == 200
    # A client drops mid-answer and resumes; the generation outlives it (grace 0.5 s).
    payload = chat(max_tokens=20, prompt="drop me")
    with httpx.Client(timeout=30) as client:
        chunks = open_stream(client, stack, payload, **{"x-demo-rate": "100"})
        next(chunks)
        head = read_events(chunks, 3)
        chunks.close()
    last_id = events_of(head)[-1].split(b"\n", 1)[0].removeprefix(b"id: ").decode()
    assert post(stack, payload, **{"Last-Event-ID": last_id}).status_code == 200
    # Resumes that miss: an unknown session, a malformed id, the evicted session.
    assert post(stack, chat(), **{"Last-Event-ID": f"{'Z' * 22}:1"}).status_code == 404
    events = f"{stack.base_url}/relay/v1/sessions/{evicted}/events"
    assert httpx.get(events, params={"after": "garbage"}, timeout=30).status_code == 400
    assert post(stack, chat(), **{"Last-Event-ID": f"{evicted}:1"}).status_code == 410
    wait_for(
        "the dropped session to end",
        lambda: relay_value(stack, "relay_sessions_active", write_path="detached") == 0,
    )
    # Each stream: its tokens, a role chunk, a finish chunk, [DONE] (and a usage chunk).
    before_live = 2 * (2400 + 3) + 3 * (5 + 4) + (20 + 3)
    assert relay_value(stack, "relay_events_total", write_path="detached") == before_live

    # While status measures: one live generation, read by its client and an SSE viewer.
    live = chat(max_tokens=400, prompt="still going")
    with httpx.Client(timeout=30) as client:
        chunks = open_stream(client, stack, live, **{"x-demo-rate": f"{LIVE_RATE:g}"})
        session = next(chunks).decode()
        read_events(chunks, 1)
        url = f"{stack.base_url}/relay/v1/sessions/{session}/events"
        with connect_sse(client, "GET", url) as source:
            viewer = source.iter_sse()  # held: a dropped generator closes the stream
            next(viewer)
            wait_for(
                "both readers to attach",
                lambda: relay_value(stack, "relay_readers_active", protocol="sse") == 1,
            )
            result = status("--metrics-url", stack.metrics_url, "--interval", "1")
        chunks.close()

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert len(out.splitlines()) <= 12  # one screen
    assert stack.metrics_url in out.splitlines()[0]
    assert line(out, "sessions") == (
        "1 open (detached 1, inline 0), 7 started, 6 ended (done 6, cancelled 0, failed 0)"
    )
    assert line(out, "generations") == "1 detached upstream calls running"
    assert line(out, "readers") == "2 attached: http 1, sse 1, ws 0, grpc 0"
    events = re.fullmatch(r"([\d.]+)/s appended, (\d+) in total", line(out, "events"))
    assert events is not None, out
    assert 0.4 * LIVE_RATE <= float(events[1]) <= 2 * LIVE_RATE
    assert (
        before_live
        < int(events[2])
        <= relay_value(stack, "relay_events_total", write_path="detached")
    )
    assert line(out, "clients") == "1 disconnects, 1 reconnects"
    assert line(out, "resumes") == (
        "hit 1, unknown 1, expired 1, forbidden 0, malformed 1, conflict 0"
    )
    store = re.fullmatch(
        r"([\d.]+) KiB of 1\.0 MiB \(([\d.]+)%\), 6 sessions, 1 evicted, 0 expired",
        line(out, "store"),
    )
    assert store is not None, out
    assert 50 < float(store[2]) < 100  # the second large session fills most of it
    assert line(out, "tokens") == "prompt 6, completion 15"


def test_status_of_an_unreachable_relay_is_one_line_and_status_1() -> None:
    result = status("--metrics-url", "http://127.0.0.1:9/metrics", "--interval", "0.1")
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot read relay metrics at http://127.0.0.1:9/metrics" in result.stderr


def test_status_refuses_what_is_not_a_relay(status_stack: Stack) -> None:
    stack = status_stack
    result = status("--metrics-url", f"{stack.admin_url}/stats/prometheus", "--interval", "0.1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"stream-relay: no relay metrics at {stack.admin_url}/stats/prometheus: "
        "is it a relay node's /metrics?"
    ]


def test_rates_survive_a_restarted_node() -> None:
    before = parse('# TYPE relay_events_total counter\nrelay_events_total{write_path="x"} 90\n')
    after = parse('# TYPE relay_events_total counter\nrelay_events_total{write_path="x"} 5\n')
    summary = summarize(before, after, 1.0, "http://relay/metrics")
    assert summary.events_per_s == 0.0
    assert "0.0/s appended" in render(summary)


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-user state directory of this test's own (stream-relay up's state files)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "stream-relay"


def test_status_without_a_url_reads_the_stack_up_runs(
    runtime_dir: Path, status_stack: Stack
) -> None:
    stack = status_stack
    publish(StackState(os.getpid(), stack.base_url, stack.admin_url, (stack.metrics_url,)))
    lines: list[str] = []
    assert run(None, 0.1, out=lines.append, err=lines.append) == 0
    assert lines[0].startswith(f"stream-relay status  {stack.metrics_url}  ")


def test_status_ignores_the_state_of_an_up_that_is_gone(runtime_dir: Path) -> None:
    gone = subprocess.Popen(["true"])  # a pid that has exited (and been reaped)
    gone.wait()
    path = publish(StackState(gone.pid, "http://x", "http://y", ("http://127.0.0.1:9/metrics",)))
    assert running_stacks() == []
    assert not path.exists()  # cleaned up
    assert default_url() == DEFAULT_METRICS_URL


def test_status_asks_which_stack_when_several_are_up(runtime_dir: Path) -> None:
    for pid in (os.getpid(), os.getppid()):
        publish(StackState(pid, "http://b", "http://a", (f"http://127.0.0.1:{pid}/metrics",)))
    lines: list[str] = []
    assert run(None, 0.1, out=lines.append, err=lines.append) == 1
    assert len(lines) == 1
    assert lines[0].startswith("stream-relay: 2 stacks are up; pass --metrics-url, one of: ")
