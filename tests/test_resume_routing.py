"""Whose `Last-Event-ID` is it: a relay id (`<session>:<seq>`) on a generation route is the
relay's, decided by Envoy's route table, so a resume never becomes a second LLM call, even with
the relay down (503 relay_unavailable, which the SDKs retry); any other Last-Event-ID, and any
on another route, is the upstream's (an MCP server's, a GET's). A resume must repeat the
request that created its session (409 session_conflict otherwise), on every node. Envoy's own
errors use the README's JSON shape."""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import envoy_stats, get_json, make_stack, upstream_stats

from extproc.errors import RelayUnavailable, UpstreamUnreachable
from extproc.ops.envoy_render import EnvoyPorts, Upstream, render
from extproc.ops.envoy_security import GENERATION_PATHS
from extproc.ops.supervisor import Stack
from extproc.session.ids import EVENT_ID_PATTERN

SESSION_RE = re.compile(r"^id: ([A-Za-z0-9_-]{22}):(\d+)$", re.M)
HEALTH_DEADLINE_S = 15.0


def chat(prompt: str = "whose id", max_tokens: int = 6) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    return {"model": "demo-llm", "messages": messages, "max_tokens": max_tokens, "stream": True}


def post(stack: Stack, payload: Any, *, path: str = "/v1/chat/completions", **headers: str) -> Any:
    return httpx.post(f"{stack.base_url}{path}", json=payload, headers=headers, timeout=30)


def rendered() -> dict[str, Any]:
    ports = EnvoyPorts(listen_port=1, admin_port=2, relay_grpc_port=3, relay_http_port=4)
    config: dict[str, Any] = yaml.safe_load(render(ports, Upstream.from_url("http://h:5")))
    return config


def test_the_route_table_knows_relay_ids_as_the_relay_does() -> None:
    listeners = rendered()["static_resources"]["listeners"]
    hcm = listeners[0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    resume = routes["relay_resume"]
    assert resume["match"]["safe_regex"]["regex"] == GENERATION_PATHS
    (header,) = resume["match"]["headers"]
    assert header["name"] == "last-event-id"
    assert header["string_match"]["safe_regex"]["regex"] == EVENT_ID_PATTERN
    assert resume["route"]["cluster"] == "relay_http"
    ext_proc = resume["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
    assert ext_proc["disabled"] is True  # holds while the processor is down
    # Envoy's own errors: the codes and statuses of the error tree.
    mappers = hcm["local_reply_config"]["mappers"]
    for mapper, error in zip(mappers, (RelayUnavailable, UpstreamUnreachable), strict=True):
        assert mapper["status_code"] == error.http_status
        assert mapper["body_format_override"]["json_format"]["error"]["code"] == error.code
    egress = listeners[1]["filter_chains"][0]["filters"][0]["typed_config"]
    (egress_mapper,) = egress["local_reply_config"]["mappers"]
    assert egress_mapper == mappers[1]


def test_foreign_last_event_ids_reach_the_upstream(stack: Stack) -> None:
    calls = upstream_stats(stack)["chat_completions"]
    relay_shaped = "A" * 22 + ":3"  # a relay id, but not on a generation route
    for value in ("7", "mcp-40", relay_shaped, "x" * 300):
        echoed = httpx.get(
            f"{stack.base_url}/demo/echo-headers", headers={"Last-Event-ID": value}, timeout=30
        )
        assert echoed.status_code == 200
        assert echoed.json()["headers"]["last-event-id"] == [value]
    models = httpx.get(f"{stack.base_url}/v1/models", headers={"Last-Event-ID": relay_shaped})
    assert models.status_code == 200 and models.json()["object"] == "list"
    # A generation with an id the relay never issued is a new generation, not a resume.
    for value in ("7", "A" * 22 + ":01", "A" * 21 + ":1"):
        fresh = post(stack, chat(), **{"Last-Event-ID": value})
        assert fresh.status_code == 200, fresh.text
        assert SESSION_RE.findall(fresh.text)[0][1] == "1"
    assert upstream_stats(stack)["chat_completions"] == calls + 3


def test_an_mcp_style_stream_keeps_its_own_ids(hosted_stack: Stack) -> None:
    """Not a generation route: the stream is the upstream's, ids included, so its clients can
    resume it with the upstream's own Last-Event-ID."""
    response = httpx.get(
        f"{hosted_stack.base_url}/mcp", headers={"Last-Event-ID": "mcp-40"}, timeout=30
    )
    assert response.status_code == 200
    assert "x-relay-session" not in response.headers
    ids = re.findall(r"^id: (.*)$", response.text, re.M)
    assert ids == ["mcp-41", "mcp-42", "mcp-43"]


def test_a_resume_must_repeat_the_request_that_created_the_session(stack: Stack) -> None:
    original = chat("the question")
    first = post(stack, original)
    session = first.headers["x-relay-session"]
    resumed = post(stack, original, **{"Last-Event-ID": f"{session}:2"})
    assert resumed.status_code == 200, resumed.text
    assert [int(n) for _, n in SESSION_RE.findall(resumed.text)] == list(range(3, 10))
    calls = upstream_stats(stack)["chat_completions"]
    others = [
        (original | {"max_tokens": 7}, "/v1/chat/completions", "a different request body"),
        (original, "/v1/completions", "path /v1/completions"),
        (original, "/v1/chat/completions?stream=1", "path /v1/chat/completions?stream=1"),
    ]
    for body, path, why in others:
        refused = post(stack, body, path=path, **{"Last-Event-ID": f"{session}:2"})
        assert refused.status_code == 409, (path, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "session_conflict"
        assert why in error["message"] and "must repeat the request" in error["message"]
    bodiless = httpx.get(
        f"{stack.base_url}/v1/chat/completions", headers={"Last-Event-ID": f"{session}:2"}
    )
    assert bodiless.status_code == 409 and "method GET" in bodiless.json()["error"]["message"]
    assert upstream_stats(stack)["chat_completions"] == calls  # no LLM call for any of them


def test_ids_past_the_end_are_answered_as_the_readme_says(stack: Stack) -> None:
    body = chat("the end", max_tokens=2)
    done = post(stack, body)
    session, last = done.headers["x-relay-session"], len(SESSION_RE.findall(done.text))
    at_end = post(stack, body, **{"Last-Event-ID": f"{session}:{last}"})
    assert at_end.status_code == 200 and at_end.content == b""
    past = post(stack, body, **{"Last-Event-ID": f"{session}:{last + 2}"})
    assert past.status_code == 410, past.text  # a finished session has nothing there
    assert past.json()["error"]["code"] == "session_gone"
    with httpx.Client(timeout=30) as client:
        slow = chat("still going", max_tokens=200)
        live_url = f"{stack.base_url}/v1/chat/completions"
        with client.stream("POST", live_url, json=slow, headers={"x-demo-rate": "20"}) as live:
            live_session = live.headers["x-relay-session"]
            ahead = client.post(
                live_url, json=slow, headers={"Last-Event-ID": f"{live_session}:150"}
            )
    assert ahead.status_code == 400  # a live session has not sent it yet
    assert ahead.json()["error"]["code"] == "malformed_event_id"


def wait_relay_unhealthy(stack: Stack) -> None:
    """Poll Envoy's admin (another process) until both relay clusters mark the node failed."""
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    while time.monotonic() < deadline:
        clusters = httpx.get(f"{stack.admin_url}/clusters", timeout=5).text
        # the endpoint is a TCP address or (under `up`) a Unix socket path
        flags = re.findall(r"^relay_(?:http|grpc)::\S+?::health_flags::(.*)$", clusters, re.M)
        if len(flags) == 2 and all("failed_active_hc" in f for f in flags):
            return
        time.sleep(0.1)
    raise AssertionError("Envoy never marked the dead relay node unhealthy")


def test_a_resume_while_the_relay_is_down_never_reaches_the_llm(own_stack: Stack) -> None:
    import openai

    body = chat("before the crash", max_tokens=8)
    session = post(own_stack, body).headers["x-relay-session"]
    relay = next(c for c in own_stack.children if c.name == "relay")
    relay.process.send_signal(signal.SIGKILL)
    relay.process.wait(timeout=10)
    wait_relay_unhealthy(own_stack)
    calls = upstream_stats(own_stack)["chat_completions"]
    refused = post(own_stack, body, **{"Last-Event-ID": f"{session}:3"})
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/json"
    error = refused.json()["error"]
    assert error["code"] == "relay_unavailable" and error["type"] == "relay_error"
    assert upstream_stats(own_stack)["chat_completions"] == calls  # not a second, billed call
    # The SDK retries it (a 5xx) as it would any overloaded API: 1 + max_retries requests.
    before = envoy_stats(own_stack).get("http.relay.downstream_rq_5xx", 0)
    client = openai.OpenAI(base_url=f"{own_stack.base_url}/v1", api_key="k", max_retries=2)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="demo-llm",
            messages=body["messages"],
            max_tokens=8,
            stream=True,
            extra_headers={"Last-Event-ID": f"{session}:3"},
        )
    assert raised.value.status_code == 503 and "relay_unavailable" in str(raised.value.body)
    assert envoy_stats(own_stack)["http.relay.downstream_rq_5xx"] - before == 3
    assert upstream_stats(own_stack)["chat_completions"] == calls
    # Everything else still flows to the LLM (fail open), a foreign Last-Event-ID too.
    fresh = post(own_stack, body, **{"Last-Event-ID": "7"})
    assert fresh.status_code == 200 and "x-relay-session" not in fresh.headers
    assert upstream_stats(own_stack)["chat_completions"] == calls + 1


def test_an_unreachable_upstream_is_json_on_the_inline_path(tmp_path: Path) -> None:
    """(The detached path, and `up`'s warning: tests/test_cli.py.)"""
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        upstream = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        inline = make_stack(tmp_path, write_path="inline", upstream=upstream)
        try:
            for response in (post(inline, chat()), httpx.get(f"{inline.base_url}/v1/models")):
                assert response.status_code == 502, response.text
                error = response.json()["error"]
                assert (error["code"], error["type"]) == ("upstream_unreachable", "relay_error")
                assert "remote connection failure" in error["message"]
            assert get_json(f"{inline.relay_http_url}/healthz") == {"status": "ok"}
        finally:
            inline.stop()
