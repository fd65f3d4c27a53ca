"""The relay's own metrics move with the traffic, with bounded labels."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from test_detached import open_stream, read_events
from test_e2e import chat

from extproc.ops.supervisor import Stack


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every relay node's samples, summed: a request may have gone to any node."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for url in stack.relay_http_urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_sessions_resumes_drops_and_usage(detached_stack: Stack) -> None:
    stack = detached_stack
    before = scrape(stack)
    body = chat(max_tokens=5, prompt="count me", stream_options={"include_usage": True})
    full = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)
    session = full.headers["x-relay-session"]
    url = f"{stack.base_url}/v1/chat/completions"
    httpx.post(url, json=body, headers={"Last-Event-ID": f"{session}:2"}, timeout=30)
    events = f"{stack.base_url}/relay/v1/sessions/{session}/events"
    assert httpx.get(events, params={"after": "garbage"}, timeout=30).status_code == 400
    httpx.post(url, json=body, headers={"Last-Event-ID": f"{'Z' * 22}:1"}, timeout=30)
    other = body | {"max_tokens": 6}  # not the request that created the session: 409
    httpx.post(url, json=other, headers={"Last-Event-ID": f"{session}:2"}, timeout=30)
    with httpx.Client(timeout=30) as client:  # a client that drops mid-answer
        chunks = open_stream(
            client, stack, chat(max_tokens=200, prompt="drop"), **{"x-demo-rate": "50"}
        )
        next(chunks)
        read_events(chunks, 2)
        chunks.close()
    after = scrape(stack)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("relay_sessions_started_total", write_path="detached") == 2
    assert grew("relay_sessions_ended_total", write_path="detached", state="done") >= 1
    assert grew("relay_events_total", write_path="detached") >= 9  # 5 tokens + 4 framing events
    assert grew("relay_resumes_total", outcome="hit") == 1
    assert grew("relay_resumes_total", outcome="malformed") == 1
    assert grew("relay_resumes_total", outcome="unknown") == 1
    assert grew("relay_resumes_total", outcome="conflict") == 1
    assert grew("relay_client_reconnects_total", protocol="http") == 1
    assert grew("relay_client_disconnects_total", protocol="http") == 1
    assert grew("relay_resume_replay_events_count") >= 1
    assert grew("relay_time_to_first_event_seconds_count", write_path="detached") == 2
    prompt_words = 2
    assert grew("relay_tokens_total", model="demo-llm", kind="completion") == 5
    assert grew("relay_tokens_total", model="demo-llm", kind="prompt") == prompt_words
    assert value(after, "relay_store_bytes") > 0
    assert value(after, "relay_store_capacity_bytes") == 256 * 1024 * 1024 * len(
        stack.relay_http_urls
    )
    assert value(after, "process_resident_memory_bytes") > 0
    text = httpx.get(stack.metrics_url, timeout=10).text
    assert session not in text  # never a session id as a label


def test_inline_processor_is_timed_per_phase(stack: Stack) -> None:
    before = scrape(stack)
    body = chat(max_tokens=2, prompt="time me", stream=False)  # a generation route: processed
    httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)
    after = scrape(stack)
    name = "relay_processor_message_seconds_count"
    assert value(after, name, phase="request_headers") > value(
        before, name, phase="request_headers"
    )


def test_lag_gauge_sees_a_reader_that_is_not_being_written_to() -> None:
    from extproc.access.grants import OPEN
    from extproc.node.metrics import RelayMetrics
    from extproc.readers.registry import ReaderLimits, ReaderRegistry
    from extproc.session.log import Cursor, WritePath
    from extproc.store import MemoryStore
    from extproc.vocabulary import ReaderProtocol

    metrics = RelayMetrics()
    store = MemoryStore(metrics=metrics)
    readers = ReaderRegistry(ReaderLimits(), metrics)
    log = store.create(content_type="text/event-stream", write_path=WritePath.INLINE)
    store.append(log, [b"data: x\n\n"] * 10)

    def lag() -> float | None:
        return metrics.registry.get_sample_value("relay_reader_lag_max_events")

    with readers.attach(Cursor(log, 2), ReaderProtocol.SSE, OPEN):
        with readers.attach(Cursor(log, 7), ReaderProtocol.WS, OPEN):
            assert lag() == 8  # the furthest behind counts
        assert lag() == 8
    assert lag() == 0  # nobody attached, nobody lagging
