"""End to end through a real Envoy, on both write paths: tagging, pass-through, resume, errors,
relay down."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import httpx
from conftest import envoy_stats, make_stack, upstream_stats
from httpx_sse import connect_sse

from extproc.ops.supervisor import Stack

ID_LINE = re.compile(rb"^id: ([A-Za-z0-9_-]{22}):(\d+)$", re.MULTILINE)


def chat(max_tokens: int = 12, prompt: str = "hello relay", **extra: object) -> dict[str, object]:
    return {
        "model": "demo-llm",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        **extra,
    }


def events_of(body: bytes) -> list[bytes]:
    """Split an LF-framed SSE body (the demo upstream's) into its event blocks."""
    return [block + b"\n\n" for block in body.split(b"\n\n") if block]


def stream_bytes(stack: Stack, payload: dict[str, object], **headers: str) -> httpx.Response:
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=payload, headers=headers, timeout=30
    )
    response.read()
    return response


def test_stream_is_tagged_with_session_and_dense_ids(stack: Stack) -> None:
    first = stream_bytes(stack, chat(prompt="tag me"))
    second = stream_bytes(stack, chat(prompt="tag me"))
    assert first.status_code == 200
    session = first.headers["x-relay-session"]
    assert second.headers["x-relay-session"] != session
    ids = ID_LINE.findall(first.content)
    assert [s.decode() for s, _ in ids] == [session] * len(ids)
    assert [int(n) for _, n in ids] == list(range(1, len(ids) + 1))
    # role chunk + 12 tokens + finish chunk + [DONE]
    assert len(ids) == 15 == len(events_of(first.content))
    assert "content-length" not in first.headers


def test_events_parse_with_a_standard_sse_client(stack: Stack) -> None:
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(client, "POST", f"{stack.base_url}/v1/chat/completions", json=chat()) as source,
    ):
        session = source.response.headers["x-relay-session"]
        events = list(source.iter_sse())
    assert [e.id for e in events] == [f"{session}:{n}" for n in range(1, len(events) + 1)]
    assert events[-1].data == "[DONE]"


def test_non_streaming_and_errors_pass_through_byte_identical(stack: Stack) -> None:
    body = chat(stream=False)
    direct = httpx.post(f"{stack.upstream_url}/v1/chat/completions", json=body, timeout=30)
    relayed = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)
    assert relayed.status_code == 200
    assert relayed.content == direct.content
    assert "x-relay-session" not in relayed.headers

    failing = {"x-demo-status": "500"}
    direct = httpx.post(
        f"{stack.upstream_url}/v1/chat/completions", json=chat(), headers=failing, timeout=30
    )
    relayed = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=chat(), headers=failing, timeout=30
    )
    assert relayed.status_code == 500
    assert relayed.content == direct.content
    assert "x-relay-session" not in relayed.headers

    models = httpx.get(f"{stack.base_url}/v1/models", timeout=30)
    assert models.content == httpx.get(f"{stack.upstream_url}/v1/models").content


def test_resume_of_a_finished_session_replays_exactly_the_rest(stack: Stack) -> None:
    full = stream_bytes(stack, chat(max_tokens=20, prompt="resume finished"))
    events = events_of(full.content)
    session = full.headers["x-relay-session"]
    calls_before = upstream_stats(stack)["chat_completions"]
    for k in (0, 1, 7, len(events) - 1, len(events)):
        resumed = stream_bytes(
            stack,
            chat(max_tokens=20, prompt="resume finished"),
            **{"Last-Event-ID": f"{session}:{k}"},
        )
        assert resumed.status_code == 200, resumed.text
        assert resumed.headers["x-relay-session"] == session
        assert b"".join(events[:k]) + resumed.content == full.content
    assert upstream_stats(stack)["chat_completions"] == calls_before  # no second LLM call


def test_resume_of_a_live_session_read_slowly(stack: Stack) -> None:
    payload = chat(max_tokens=40, prompt="live and slow")
    headers = {"x-demo-rate": "40"}  # ~1 s of generation: the resume starts while it is live
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", f"{stack.base_url}/v1/chat/completions", json=payload, headers=headers
        ) as original,
    ):
        session = original.headers["x-relay-session"]
        seen = b""
        raw = original.iter_raw()
        while len(events_of(seen)) < 3 or not seen.endswith(b"\n\n"):
            seen += next(raw)
        head = events_of(seen)
        last_id = f"{session}:{len(head)}"
        with client.stream(
            "POST",
            f"{stack.base_url}/v1/chat/completions",
            json=payload,
            headers={"Last-Event-ID": last_id},
        ) as resumed:
            assert resumed.status_code == 200
            tail = b""
            for piece in resumed.iter_raw(64):  # a slow reader: small reads
                tail += piece
        rest_of_original = b"".join(raw)
    full = seen + rest_of_original
    assert b"".join(head) + tail == full
    assert ID_LINE.findall(full)[-1][1] == b"43"  # role + 40 tokens + finish + [DONE]


def test_resume_errors_are_typed_json(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    for foreign in ("nonsense", "x" * 300, "AAAAAAAAAAAAAAAAAAAAAA:-1", "AAAAAAAAAAAAAAAAAAAAAA"):
        # Not a relay id, so not a resume: the upstream's business (tests/test_resume_routing.py)
        response = httpx.post(url, json=chat(), headers={"Last-Event-ID": foreign}, timeout=30)
        assert response.status_code == 200, foreign
    for bad in ("nonsense", "AAAAAAAAAAAAAAAAAAAAAA:-1"):  # where the id is the relay's
        response = httpx.get(
            f"{stack.base_url}/relay/v1/sessions/{'A' * 22}/events",
            headers={"Last-Event-ID": bad},
            timeout=30,
        )
        assert response.status_code == 400, bad
        assert response.json()["error"]["code"] == "malformed_event_id"
    unknown = httpx.post(url, json=chat(), headers={"Last-Event-ID": "A" * 22 + ":3"}, timeout=30)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "session_not_found"


def test_evicted_session_is_410_not_404(tmp_path: Path) -> None:
    # A 1 MiB store holds one ~700 KB session: the second one evicts the first.
    limits = ("--store-max-bytes", str(1 << 20), "--session-max-bytes", str(1 << 20))
    small = make_stack(tmp_path, relay_args=limits)
    try:
        big = chat(max_tokens=2500, prompt="fill the store")
        first = stream_bytes(small, big, **{"x-demo-rate": "0"})
        second = stream_bytes(
            small, dict(big, messages=[{"role": "user", "content": "more"}]), **{"x-demo-rate": "0"}
        )
        assert second.status_code == 200
        gone = httpx.post(
            f"{small.base_url}/v1/chat/completions",
            json=big,
            timeout=30,
            headers={"Last-Event-ID": f"{first.headers['x-relay-session']}:1"},
        )
        assert gone.status_code == 410, gone.text
        assert gone.json()["error"]["code"] == "session_gone"
        kept = stream_bytes(
            small,
            dict(big, messages=[{"role": "user", "content": "more"}]),  # its own request
            **{"Last-Event-ID": f"{second.headers['x-relay-session']}:2500"},
        )
        assert kept.status_code == 200
    finally:
        small.stop()


def test_client_cannot_route_itself_to_the_relay(stack: Stack) -> None:
    calls = upstream_stats(stack)["chat_completions"]
    response = stream_bytes(stack, chat(), **{"x-relay-target": "resume"})
    assert response.status_code == 200
    assert upstream_stats(stack)["chat_completions"] == calls + 1  # went to the LLM


def test_ndjson_is_logged_and_resumable_but_not_rewritten(stack: Stack) -> None:
    body = {
        "model": "demo-llm",
        "messages": [{"role": "user", "content": "lines"}],
        "options": {"num_predict": 6},
    }
    direct = httpx.post(f"{stack.upstream_url}/api/chat", json=body, timeout=30)
    relayed = httpx.post(f"{stack.base_url}/api/chat", json=body, timeout=30)
    assert relayed.status_code == 200
    assert relayed.content == direct.content  # NDJSON parsers see exactly the upstream's lines
    lines = relayed.content.splitlines(keepends=True)
    assert len(lines) == 7  # 6 tokens + the final done line
    session = relayed.headers["x-relay-session"]
    resumed = httpx.post(
        f"{stack.base_url}/api/chat",
        json=body,
        timeout=30,
        headers={"Last-Event-ID": f"{session}:2"},
    )
    assert resumed.status_code == 200
    assert resumed.headers["content-type"].startswith("application/x-ndjson")
    assert resumed.content == b"".join(lines[2:])


def test_openai_sdk_streams_through_the_relay(stack: Stack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model="demo-llm",
        messages=[{"role": "user", "content": "sdk"}],
        max_tokens=8,
        stream=True,
    ) as response:
        assert len(response.headers["x-relay-session"]) == 22
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8


def test_relay_down_fails_open_untagged_then_recovers(own_stack: Stack) -> None:
    relay = next(c for c in own_stack.children if c.name == "relay")
    relay.process.send_signal(signal.SIGKILL)
    relay.process.wait(timeout=10)

    response = stream_bytes(own_stack, chat(prompt="relay is down"))
    assert response.status_code == 200
    assert "x-relay-session" not in response.headers
    assert not ID_LINE.findall(response.content)
    assert events_of(response.content)[-1] == b"data: [DONE]\n\n"
    assert envoy_stats(own_stack)["http.relay.ext_proc.failure_mode_allowed"] >= 1

    # The node started again at the same addresses (Unix sockets), as `up` restarts it.
    own_stack.respawn(relay)
    deadline = time.monotonic() + 20
    tagged = None
    while time.monotonic() < deadline:
        response = stream_bytes(own_stack, chat(prompt="relay is back"))
        if "x-relay-session" in response.headers:
            tagged = response
            break
    assert tagged is not None, "relay restarted but responses were never tagged again"
    assert len(ID_LINE.findall(tagged.content)) == len(events_of(tagged.content))
