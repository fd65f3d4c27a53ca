"""The relay is transparent to real clients and real upstreams, on both write paths: every
end-to-end response header reaches the client (streams, JSON, errors), `Content-Length` stays
where the body is not rewritten, the client's request headers reach the LLM as sent (but
`Accept-Encoding`, documented), compression is Envoy's toward the client, and the official
OpenAI and Anthropic SDKs parse tool-call and Anthropic streams with their request ids.

The upstream is tests/hosted_upstream.py: recorded third-party wire behaviour (LiteLLM's header
set, hosted APIs' request ids and rate-limit headers, the fixtures' streams)."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import pytest
from hosted_upstream import SERVER, events

from extproc.ops.supervisor import Stack

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
# Changed by Envoy on every answer, as on any Envoy (README): `date` when it writes the head,
# and `x-envoy-upstream-service-time`. Not `server`: the LLM's passes through as it came.
ENVOY_OWN = {"date", "x-envoy-upstream-service-time"}
IDENTITY = {"Accept-Encoding": "identity"}
TOOL_ARGUMENTS = '{"city": "Oslo"}'


def chat(model: str, *, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def post(base: str, payload: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", json=payload, headers=headers, timeout=30)


def names(response: httpx.Response) -> list[str]:
    return [name.decode().lower() for name, _ in response.headers.raw]


def end_to_end(
    response: httpx.Response, *, also: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The response's headers a proxy must pass on, by name (the order of values of one name
    kept, as that is what carries meaning), duplicates kept."""
    dropped = HOP_BY_HOP | ENVOY_OWN | set(also)
    pairs = [
        (name.decode().lower(), value.decode())
        for name, value in response.headers.raw
        if name.decode().lower() not in dropped
    ]
    return sorted(pairs, key=lambda pair: pair[0])


def without_request_ids(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each call gets a fresh request id: compare the rest, and that the ids are there."""
    ids = [value for name, value in pairs if name in ("x-request-id", "request-id")]
    assert len(ids) == 2 and ids[0] == ids[1] and ids[0].startswith("req_")
    return [(name, value) for name, value in pairs if name not in ("x-request-id", "request-id")]


def test_a_stream_keeps_every_upstream_header(hosted_stack: Stack) -> None:
    direct = post(hosted_stack.upstream_url, chat("fixture-tools"))
    relayed = post(hosted_stack.base_url, chat("fixture-tools"))
    assert relayed.status_code == 200
    session = relayed.headers["x-relay-session"]
    stream_own = frozenset({"x-relay-session", "content-length", "x-accel-buffering"})
    expected = without_request_ids(end_to_end(direct, also=stream_own))
    got = without_request_ids(end_to_end(relayed, also=stream_own))
    assert got == expected  # 18 x-litellm-*, rate limits, security headers, a repeated one
    assert relayed.headers.get_list("x-trace-hop") == ["edge-1", "edge-2"]
    assert "content-length" not in relayed.headers  # the body gained id: lines
    assert relayed.text.count(f"id: {session}:") == 6


@pytest.mark.parametrize("model", ["fixture-chat", "error-400", "error-429", "error-503"])
def test_json_and_errors_pass_byte_identical_with_their_length(
    hosted_stack: Stack, model: str
) -> None:
    direct = post(hosted_stack.upstream_url, chat(model, stream=False), **IDENTITY)
    relayed = post(hosted_stack.base_url, chat(model, stream=False), **IDENTITY)
    assert relayed.status_code == direct.status_code
    assert relayed.content == direct.content
    assert relayed.headers["content-length"] == str(len(direct.content))  # not re-chunked
    assert "x-relay-session" not in relayed.headers
    vary = frozenset({"vary"})  # Envoy's compressor adds Accept-Encoding to it
    assert without_request_ids(end_to_end(relayed, also=vary)) == without_request_ids(
        end_to_end(direct, also=vary)
    )
    assert relayed.headers["vary"] in (direct.headers["vary"], "Origin, Accept-Encoding")


def test_envoy_compresses_json_for_clients_that_accept_it(hosted_stack: Stack) -> None:
    payload = chat("fixture-chat", stream=False)
    with httpx.Client(timeout=30) as client:
        raw = client.post(
            f"{hosted_stack.base_url}/v1/chat/completions",
            json=payload,
            headers={"Accept-Encoding": "gzip"},
        )
        assert raw.headers["content-encoding"] == "gzip"
        # The upstream was asked for identity: Envoy compressed it, on both paths.
        identity = client.post(
            f"{hosted_stack.upstream_url}/v1/chat/completions", json=payload, headers=IDENTITY
        )
    assert json.loads(raw.content) == identity.json()  # httpx decoded Envoy's gzip
    seen = echo(hosted_stack, {"Accept-Encoding": "gzip, deflate, br"})
    assert header(seen, "accept-encoding") == ["identity"]


def echo(stack: Stack, headers: dict[str, str], *, path: str = "/v1/chat/completions") -> Any:
    """What reached the LLM for a generation request (the `echo` model answers with it)."""
    response = httpx.post(
        f"{stack.base_url}{path}", json=chat("echo", stream=False), headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def header(seen: Any, name: str) -> list[str]:
    return [value for key, value in seen["headers"] if key.lower() == name]


def test_request_headers_reach_the_upstream_as_sent(hosted_stack: Stack) -> None:
    sent = {
        "X-Custom-Case": "Keep Me",
        "Authorization": "Bearer sk-client",
        "User-Agent": "OpenAI/Python 9.9",
        "Last-Event-ID": "upstream-own-7",  # not a relay id: the upstream's business
        "OpenAI-Beta": "assistants=v2",
    }
    seen = echo(hosted_stack, sent, path="/v1/chat/completions?api-version=2024-10-21")
    assert seen["method"] == "POST"
    assert seen["target"] == "/v1/chat/completions?api-version=2024-10-21"
    for name, value in sent.items():
        assert header(seen, name.lower()) == [value], name
    host = httpx.URL(hosted_stack.base_url).netloc.decode()
    assert header(seen, "host") == [host]  # the client's Host, on both paths
    assert header(seen, "content-type") == ["application/json"]
    names_seen = {key.lower() for key, _ in seen["headers"]}
    assert not {n for n in names_seen if n.startswith("x-relay-")}


def test_an_upstream_that_compresses_its_stream_is_passed_untouched(hosted_stack: Stack) -> None:
    """An upstream that gzips its event stream although asked for identity: the relay cannot
    frame it, so it passes byte for byte, as no session (never an empty `done` one)."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", f"{hosted_stack.base_url}/v1/chat/completions", json=chat("gzip-sse")
        ) as response,
    ):
        raw = b"".join(response.iter_raw())
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert "x-relay-session" not in response.headers
    assert gzip.decompress(raw) == b"".join(events("openai-chat-usage.sse"))


def test_openai_sdk_parses_a_tool_call_stream_with_its_request_id(hosted_stack: Stack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{hosted_stack.base_url}/v1", api_key="sk-test", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="fixture-tools", messages=[{"role": "user", "content": "weather?"}], stream=True
    )
    assert raw.request_id is not None and raw.request_id.startswith("req_")
    assert raw.headers["x-relay-session"]
    calls = [
        call
        for chunk in raw.parse()
        if chunk.choices and chunk.choices[0].delta.tool_calls
        for call in chunk.choices[0].delta.tool_calls
    ]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    arguments = "".join((c.function.arguments or "") for c in calls if c.function is not None)
    assert json.loads(arguments) == json.loads(TOOL_ARGUMENTS)


def test_openai_sdk_sees_the_upstreams_errors(hosted_stack: Stack) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{hosted_stack.base_url}/v1", api_key="sk-t", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="error-400", messages=messages, stream=True)
    assert "Invalid model name" in bad.value.message
    assert bad.value.request_id is not None and bad.value.request_id.startswith("req_")
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="error-429", messages=messages)
    assert limited.value.response.headers["retry-after"] == "3"


def test_anthropic_sdk_streams_and_reads_messages(hosted_stack: Stack) -> None:
    from anthropic import Anthropic

    client = Anthropic(base_url=hosted_stack.base_url, api_key="sk-test", max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with client.messages.stream(model="claude-fixture", max_tokens=16, messages=messages) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
        headers = s.response.headers
    assert text == "Hello, relay world!"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 5
    assert headers["request-id"].startswith("req_") and headers["x-relay-session"]
    raw = client.messages.with_raw_response.create(
        model="claude-fixture", max_tokens=16, messages=messages
    )
    assert raw.request_id is not None and raw.request_id.startswith("req_")
    assert raw.parse().content[0].text == "Hello, relay world!"  # type: ignore[union-attr]


def test_responses_stream_keeps_its_event_names(hosted_stack: Stack) -> None:
    relayed = httpx.post(
        f"{hosted_stack.base_url}/v1/responses",
        json={"model": "fx", "input": "hi", "stream": True},
        timeout=30,
    )
    session = relayed.headers["x-relay-session"]
    blocks = [b for b in relayed.text.split("\n\n") if b]
    upstream = [b.decode() for b in events("openai-responses.sse")]
    assert len(blocks) == len(upstream)
    for n, (block, original) in enumerate(zip(blocks, upstream, strict=True), 1):
        assert block == f"id: {session}:{n}\n" + original.removesuffix("\n\n")


def test_the_llms_server_header_passes_and_the_relay_adds_none(hosted_stack: Stack) -> None:
    """The LLM's `Server` reaches the client on every kind of answer; the relay's own answers
    (a resume, the session API) name no software at all: neither Envoy nor aiohttp."""
    stream = post(hosted_stack.base_url, chat("fixture-chat"))
    answers = [stream, post(hosted_stack.base_url, chat("fixture-chat", stream=False))]
    answers.append(post(hosted_stack.base_url, chat("error-429")))
    for answer in answers:
        assert answer.headers.get_list("server") == [SERVER], answer.status_code
    session = stream.headers["x-relay-session"]
    resumed = post(hosted_stack.base_url, chat("fixture-chat"), **{"Last-Event-ID": f"{session}:1"})
    info = httpx.get(f"{hosted_stack.base_url}/relay/v1/sessions/{session}", timeout=30)
    for own in (resumed, info):
        assert own.status_code == 200, own.text
        assert "server" not in own.headers, own.headers["server"]
