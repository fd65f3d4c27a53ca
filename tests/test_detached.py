"""The detached write path end to end: disconnect is not cancel, grace, cancel, multicast."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import envoy_stats, make_stack, upstream_stats
from httpx_sse import connect_sse
from test_e2e import chat, events_of

from extproc.ops.supervisor import Stack

SLOW = {"x-demo-rate": "20"}  # 20 events/s: a generation that outlives the test's actions


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling another process's state, bounded by the deadline


def session_state(stack: Stack, session: str) -> dict[str, object]:
    response = httpx.get(f"{stack.base_url}/relay/v1/sessions/{session}", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def open_stream(
    client: httpx.Client, stack: Stack, payload: dict[str, object], **headers: str
) -> Iterator[bytes]:
    """Yield raw body chunks of a streamed generation (the caller may stop any time)."""
    with client.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json=payload, headers=headers
    ) as response:
        assert response.status_code == 200
        yield response.headers["x-relay-session"].encode()
        yield from response.iter_raw()


def read_events(chunks: Iterator[bytes], count: int) -> bytes:
    seen = b""
    while len(events_of(seen)) < count or not seen.endswith(b"\n\n"):
        seen += next(chunks)
    return seen


def test_disconnect_is_not_cancel(detached_stack: Stack) -> None:
    stack = detached_stack
    calls = envoy_stats(stack)["cluster.llm.upstream_rq_total"]
    payload = chat(max_tokens=30, prompt="keep going without me")
    with httpx.Client(timeout=30) as client:
        chunks = open_stream(client, stack, payload, **{"x-demo-rate": "60"})
        session = next(chunks).decode()
        head = read_events(chunks, 3)
        chunks.close()  # the client drops mid-answer
    # The generation keeps going; the client comes back for the rest, in one piece.
    last = events_of(head)[-1]
    last_id = last.split(b"\n", 1)[0].removeprefix(b"id: ").decode()
    resumed = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json=payload,
        timeout=30,
        headers={"Last-Event-ID": last_id},
    )
    assert resumed.status_code == 200
    whole = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json=payload,
        timeout=30,
        headers={"Last-Event-ID": f"{session}:0"},
    )
    assert b"".join(events_of(head)) + resumed.content == whole.content
    assert whole.content.endswith(b"data: [DONE]\n\n")
    assert len(events_of(whole.content)) == 33
    assert session_state(stack, session)["state"] == "done"
    assert envoy_stats(stack)["cluster.llm.upstream_rq_total"] == calls + 1  # one LLM call


def test_generation_is_cancelled_after_the_grace_period(detached_stack: Stack) -> None:
    stack = detached_stack
    with httpx.Client(timeout=30) as client:
        chunks = open_stream(client, stack, chat(max_tokens=400, prompt="nobody waits"), **SLOW)
        session = next(chunks).decode()
        read_events(chunks, 1)
        chunks.close()
    wait_for("the grace period to end it", lambda: session_state(stack, session)["state"] != "open")
    state = session_state(stack, session)
    assert state["state"] == "cancelled"
    assert "no reader" in str(state["reason"])
    assert int(str(state["last_seq"])) < 402  # stopped early: the upstream call was cancelled
    wait_for("the upstream stream to close", lambda: upstream_stats(stack)["active_streams"] == 0)


def test_an_attached_reader_keeps_the_generation_alive(detached_stack: Stack) -> None:
    stack = detached_stack
    with httpx.Client(timeout=30) as client:
        chunks = open_stream(
            client, stack, chat(max_tokens=40, prompt="watch it"), **{"x-demo-rate": "40"}
        )  # ~1 s, longer than the 0.5 s grace
        session = next(chunks).decode()
        with connect_sse(
            client, "GET", f"{stack.base_url}/relay/v1/sessions/{session}/events"
        ) as source:
            events = source.iter_sse()
            first = next(events)
            chunks.close()  # the original client leaves; the viewer stays
            rest = list(events)
    assert first.id == f"{session}:1"
    assert rest[-1].event == "relay.end"
    assert json.loads(rest[-1].data)["state"] == "done"
    assert [e.id for e in rest[:-1]] == [f"{session}:{n}" for n in range(2, 44)]


def test_owner_cancels_with_delete(detached_stack: Stack) -> None:
    stack = detached_stack
    base = f"{stack.base_url}/relay/v1/sessions"
    with httpx.Client(timeout=30) as client:
        chunks = open_stream(client, stack, chat(max_tokens=400, prompt="stop me"), **SLOW)
        session = next(chunks).decode()
        read_events(chunks, 2)
        cancelled = client.delete(f"{base}/{session}")
        assert cancelled.status_code == 200
        assert cancelled.json()["state"] == "cancelled"
        assert cancelled.json()["reason"] == "cancelled by owner"
        with pytest.raises(httpx.RemoteProtocolError):  # the first client's stream is cut
            for _ in chunks:
                pass
    again = httpx.delete(f"{base}/{session}")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "session_conflict"
    assert httpx.delete(f"{base}/{'A' * 22}").status_code == 404
    assert httpx.delete(f"{base}/not-an-id").status_code == 400
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(client, "GET", f"{base}/{session}/events") as source,
    ):
        events = list(source.iter_sse())
    assert events[-1].event == "relay.end"
    assert json.loads(events[-1].data)["state"] == "cancelled"


def test_sse_reader_endpoint_resume_and_end(detached_stack: Stack) -> None:
    stack = detached_stack
    full = httpx.post(f"{stack.base_url}/v1/chat/completions", json=chat(max_tokens=10), timeout=30)
    session = full.headers["x-relay-session"]
    url = f"{stack.base_url}/relay/v1/sessions/{session}/events"
    with httpx.Client(timeout=30) as client:
        with connect_sse(client, "GET", url) as source:
            everything = list(source.iter_sse())
        with connect_sse(client, "GET", f"{url}?after={session}:5") as source:
            after_five = list(source.iter_sse())
        # An EventSource reconnecting sends Last-Event-ID while its URL still has ?after=.
        with connect_sse(
            client, "GET", f"{url}?after={session}:2", headers={"Last-Event-ID": f"{session}:9"}
        ) as source:
            after_nine = list(source.iter_sse())
        # A reader cut before relay.end hears the end again; one that saw it (its id is one
        # past the last event) gets 204.
        with connect_sse(client, "GET", url, headers={"Last-Event-ID": f"{session}:13"}) as s:
            only_end = list(s.iter_sse())
        done = client.get(url, headers={"Last-Event-ID": f"{session}:14"})
    ids = [e.id for e in everything[:-1]]
    assert ids == [f"{session}:{n}" for n in range(1, 14)]
    assert [e.data for e in everything[:-1]] == [
        b.split(b"data: ", 1)[1].rstrip(b"\n").decode() for b in events_of(full.content)
    ]
    assert [e.id for e in after_five[:-1]] == ids[5:]
    assert [e.id for e in after_nine[:-1]] == ids[9:]
    assert json.loads(everything[-1].data) == {"state": "done", "reason": "", "last_seq": 13}
    assert [(e.id, e.event) for e in only_end] == [(f"{session}:14", "relay.end")]
    assert everything[-1].id == f"{session}:14"
    assert done.status_code == 204  # nothing left: an EventSource stops reconnecting
    wrong = httpx.get(url, params={"after": f"{'B' * 22}:1"})
    assert wrong.status_code == 400


def test_many_readers_one_upstream_call(detached_stack: Stack) -> None:
    stack = detached_stack
    calls = upstream_stats(stack)["chat_completions"]
    readers = 20
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=readers + 2)) as client:
        chunks = open_stream(
            client, stack, chat(max_tokens=30, prompt="for everyone"), **{"x-demo-rate": "60"}
        )
        session = next(chunks).decode()
        url = f"{stack.base_url}/relay/v1/sessions/{session}/events"
        sources = [connect_sse(client, "GET", url) for _ in range(readers)]
        streams = [s.__enter__() for s in sources]
        try:
            seen = [[(e.id, e.data) for e in s.iter_sse()] for s in streams]
        finally:
            for s in sources:
                s.__exit__(None, None, None)
        original = b"".join(chunks)
    assert all(s == seen[0] for s in seen)
    assert len(seen[0]) == 34  # 33 events and relay.end
    assert upstream_stats(stack)["chat_completions"] == calls + 1
    assert len(events_of(original)) == 33  # and the first client got all of it


def test_reader_limit_is_a_typed_429(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, relay_args=("--max-readers-per-session", "2"))
    try:
        with httpx.Client(timeout=30) as client:
            chunks = open_stream(client, stack, chat(max_tokens=200, prompt="crowded"), **SLOW)
            session = next(chunks).decode()  # reader 1: the original client
            url = f"{stack.base_url}/relay/v1/sessions/{session}/events"
            with client.stream("GET", url) as second:
                assert second.status_code == 200
                third = client.get(url)
                assert third.status_code == 429
                assert third.json()["error"]["code"] == "limit_exceeded"
            chunks.close()
    finally:
        stack.stop()


def test_large_request_bodies_arrive_whole_and_the_limit_is_typed(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, relay_args=("--max-request-bytes", str(1 << 20)))
    try:
        words = 60_000  # ~400 KB of prompt: many TCP segments on the way to the relay
        body = chat(max_tokens=3, prompt="word " * words, stream_options={"include_usage": True})
        response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200
        usage = [e for e in events_of(response.content) if b'"usage":{' in e]
        assert len(usage) == 1
        assert f'"prompt_tokens":{words}'.encode() in usage[0]  # the upstream saw all of it
        too_big = chat(prompt="word " * 300_000)  # 1.5 MB > the 1 MiB limit
        refused = httpx.post(f"{stack.base_url}/v1/chat/completions", json=too_big, timeout=60)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "limit_exceeded"
    finally:
        stack.stop()
