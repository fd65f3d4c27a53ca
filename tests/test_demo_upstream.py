"""Tests for the demo LLM upstream: wire formats, determinism, pacing, faults and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from extproc.demo.upstream import (
    DEFAULT_MAX_TOKENS,
    VOCABULARY,
    DemoConfig,
    main,
    make_app,
    serve,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = DemoConfig(rate=0)
MESSAGES = [{"role": "user", "content": "Tell me a story about relays"}]
Start = Callable[[DemoConfig], Awaitable[str]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    runners: list[web.AppRunner] = []

    async def _start(config: DemoConfig) -> str:
        runner, port = await serve(config)
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def base(start: Start) -> str:
    return await start(FAST)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "demo-llm", "messages": MESSAGES, **extra}


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[aiohttp.ClientResponse, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url, data=data, headers=headers) as resp:
        return resp, await resp.read()


def parse_sse(raw: bytes) -> list[str]:
    """Strict parse of the demo's framing: every event is exactly one `data: ` line + blank."""
    text = raw.decode()
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [b.removeprefix("data: ") for b in blocks]


def chunks(raw: bytes) -> list[dict[str, Any]]:
    data = parse_sse(raw)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def content_of(parsed: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in parsed if c["choices"])


async def stats(session: aiohttp.ClientSession, base: str) -> dict[str, int]:
    async with session.get(f"{base}/demo/stats") as resp:
        result: dict[str, int] = await resp.json()
        return result


async def test_stream_is_deterministic(base: str, session: aiohttp.ClientSession) -> None:
    url = f"{base}/v1/chat/completions"
    _, first = await post(session, url, chat_body(stream=True))
    _, second = await post(session, url, chat_body(stream=True))
    other_messages = [{"role": "user", "content": "Something else entirely"}]
    _, other = await post(session, url, chat_body(stream=True, messages=other_messages))
    assert first == second
    assert content_of(chunks(first)) != content_of(chunks(other))
    assert chunks(first)[0]["id"] != chunks(other)[0]["id"]
    _, plain_a = await post(session, url, chat_body())
    _, plain_b = await post(session, url, chat_body())
    assert plain_a == plain_b
    assert json.loads(plain_a)["choices"][0]["message"]["content"] == content_of(chunks(first))


@pytest.mark.parametrize("max_tokens", [None, 1, 7, 200])
async def test_token_count_follows_max_tokens(
    base: str, session: aiohttp.ClientSession, max_tokens: int | None
) -> None:
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    _, raw = await post(session, f"{base}/v1/chat/completions", chat_body(stream=True, **extra))
    parsed = chunks(raw)
    tokens = [c["choices"][0]["delta"]["content"] for c in parsed[1:-1]]
    assert len(tokens) == (DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens)
    assert tokens[0] in VOCABULARY
    assert all(t.startswith(" ") and t[1:] in VOCABULARY for t in tokens[1:])


async def test_sse_framing(base: str, session: aiohttp.ClientSession) -> None:
    resp, raw = await post(
        session, f"{base}/v1/chat/completions", chat_body(stream=True, max_tokens=5)
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["Transfer-Encoding"] == "chunked"
    data = parse_sse(raw)
    assert len(data) == 1 + 5 + 1 + 1
    assert data[-1] == "[DONE]"
    assert all(d == json.dumps(json.loads(d), separators=(",", ":")) for d in data[:-1])
    parsed = [json.loads(d) for d in data[:-1]]
    first, last = parsed[0], parsed[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed[:-1])
    assert {c["object"] for c in parsed} == {"chat.completion.chunk"}
    assert {c["model"] for c in parsed} == {"demo-llm"}
    assert len({(c["id"], c["created"]) for c in parsed}) == 1
    assert list(first)[:4] == ["id", "object", "created", "model"]  # OpenAI's key order
    assert first["id"].startswith("chatcmpl-") and len(first["id"]) == len("chatcmpl-") + 24
    assert all("usage" not in c and "x_demo_ts" not in c for c in parsed)


async def test_usage_chunk_only_with_include_usage(
    base: str, session: aiohttp.ClientSession
) -> None:
    body = chat_body(stream=True, max_tokens=4, stream_options={"include_usage": True})
    _, raw = await post(session, f"{base}/v1/chat/completions", body)
    parsed = chunks(raw)
    assert len(parsed) == 1 + 4 + 1 + 1
    assert all(c["usage"] is None for c in parsed[:-1])
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    body["stream_options"] = {"include_usage": False}
    _, raw = await post(session, f"{base}/v1/chat/completions", body)
    assert all("usage" not in c for c in chunks(raw))


async def test_non_streaming_shape(base: str, session: aiohttp.ClientSession) -> None:
    resp, raw = await post(session, f"{base}/v1/chat/completions", chat_body(max_tokens=3))
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = json.loads(raw)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split(" ")) == 3
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


async def test_openai_sdk_streaming_and_plain(base: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="demo-llm",
            messages=[{"role": "user", "content": "Tell me a story about relays"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        finish: list[str | None] = []
        usage = None
        async for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish.append(choice.finish_reason)
            usage = chunk.usage or usage
        assert finish[-1] == "length"
        assert usage is not None and usage.completion_tokens == 6
        plain = await client.chat.completions.create(
            model="demo-llm",
            messages=[{"role": "user", "content": "Tell me a story about relays"}],
            max_tokens=6,
        )
        assert plain.choices[0].message.content == "".join(pieces)
        assert plain.usage is not None and plain.usage.prompt_tokens == 6
        models = await client.models.list()
        assert [m.id for m in models.data] == ["demo-llm"]
        assert models.data[0].owned_by == "stream-relay"


@pytest.mark.parametrize(
    ("status", "error"), [(429, openai.RateLimitError), (500, openai.InternalServerError)]
)
async def test_openai_sdk_sees_injected_status(
    base: str, session: aiohttp.ClientSession, status: int, error: type[Exception]
) -> None:
    headers = {"x-demo-status": str(status)}
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    async with client:
        with pytest.raises(error):
            await client.with_options(default_headers=headers).chat.completions.create(
                model="demo-llm", messages=[{"role": "user", "content": "hi"}], stream=True
            )
    resp, raw = await post(session, f"{base}/v1/chat/completions", {"stream": True}, headers)
    assert resp.status == status  # the injected status wins over body validation
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


async def test_abort_after_leaves_stream_incomplete(
    base: str, session: aiohttp.ClientSession
) -> None:
    headers = {"x-demo-abort-after": "3"}
    url = f"{base}/v1/chat/completions"
    async with session.post(url, json=chat_body(stream=True), headers=headers) as resp:
        assert resp.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in resp.content.iter_any():
                received += data
    assert parse_sse(received)[-1] != "[DONE]"
    assert len(parse_sse(received)) == 3
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    async with client:
        stream = await client.with_options(default_headers=headers).chat.completions.create(
            model="demo-llm", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        seen = 0
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                seen += 1
        assert seen == 3


async def test_abort_after_beyond_stream_length_is_harmless(
    base: str, session: aiohttp.ClientSession
) -> None:
    headers = {"x-demo-abort-after": "100"}
    body = chat_body(stream=True, max_tokens=2)
    _, raw = await post(session, f"{base}/v1/chat/completions", body, headers)
    assert len(chunks(raw)) == 4


async def test_ollama_ndjson(base: str, session: aiohttp.ClientSession) -> None:
    body = {"model": "llama-demo", "messages": MESSAGES, "options": {"num_predict": 5}}
    resp, raw = await post(session, f"{base}/api/chat", body)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/x-ndjson"
    lines = raw.decode().split("\n")
    assert lines[-1] == ""
    objs = [json.loads(line) for line in lines[:-1]]
    assert len(objs) == 6
    assert all(o["done"] is False and o["model"] == "llama-demo" for o in objs[:-1])
    last = objs[-1]
    assert last["done"] is True and last["done_reason"] == "length"
    assert (last["eval_count"], last["prompt_eval_count"]) == (5, 6)
    text = "".join(o["message"]["content"] for o in objs)
    _, plain = await post(session, f"{base}/api/chat", {**body, "stream": False})
    one = json.loads(plain)
    assert one["done"] is True and one["message"]["content"] == text
    sse_body = chat_body(model="llama-demo", max_tokens=5, stream=True)
    _, sse = await post(session, f"{base}/v1/chat/completions", sse_body)
    assert content_of(chunks(sse)) == text


@pytest.mark.parametrize(
    ("body", "headers", "param"),
    [
        (b"{not json", {}, None),
        (b"[1, 2]", {}, None),
        (chat_body(messages=None), {}, "messages"),
        (chat_body(messages=[]), {}, "messages"),
        (chat_body(model=None), {}, "model"),
        (chat_body(max_tokens=0), {}, "max_tokens"),
        (chat_body(max_tokens=4097), {}, "max_tokens"),
        (chat_body(max_tokens="ten"), {}, "max_tokens"),
        (chat_body(max_tokens=True), {}, "max_tokens"),
        (chat_body(stream="yes"), {}, "stream"),
        (chat_body(), {"x-demo-status": "abc"}, None),
        (chat_body(), {"x-demo-status": "200"}, None),
        (chat_body(), {"x-demo-abort-after": "-1"}, None),
        (chat_body(), {"x-demo-rate": "fast"}, None),
        (chat_body(), {"x-demo-rate": "nan"}, None),
        (chat_body(), {"x-demo-ttft-ms": "-5"}, None),
    ],
)
async def test_bad_requests_get_openai_style_400(
    base: str, session: aiohttp.ClientSession, body: Any, headers: dict[str, str], param: str | None
) -> None:
    resp, raw = await post(session, f"{base}/v1/chat/completions", body, headers)
    assert resp.status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] is None and error["message"]


async def test_stats_count_requests(base: str, session: aiohttp.ClientSession) -> None:
    assert await stats(session, base) == {
        "chat_completions": 0,
        "chat_completions_streamed": 0,
        "ollama_chat": 0,
        "active_streams": 0,
    }
    await post(session, f"{base}/v1/chat/completions", chat_body(stream=True))
    await post(session, f"{base}/v1/chat/completions", chat_body())
    failing = {"x-demo-status": "500"}
    await post(session, f"{base}/v1/chat/completions", chat_body(stream=True), failing)
    await post(session, f"{base}/api/chat", chat_body())
    assert await stats(session, base) == {  # every request received counts, failed ones too
        "chat_completions": 3,
        "chat_completions_streamed": 2,
        "ollama_chat": 1,
        "active_streams": 0,
    }


async def test_rate_and_ttft_are_lower_bounds(start: Start, session: aiohttp.ClientSession) -> None:
    base = await start(DemoConfig(rate=100))
    url = f"{base}/v1/chat/completions"
    began = time.monotonic()
    _, raw = await post(session, url, chat_body(stream=True, max_tokens=8))
    assert len(parse_sse(raw)) == 11  # the 11th event is due 10 / 100 s after the first
    assert time.monotonic() - began >= 0.08
    began = time.monotonic()
    await post(session, url, chat_body(stream=True, max_tokens=8), {"x-demo-rate": "0"})
    fast = time.monotonic() - began
    began = time.monotonic()
    await post(session, url, chat_body(max_tokens=1, stream=True), {"x-demo-ttft-ms": "150"})
    assert time.monotonic() - began >= 0.13
    assert fast < 5  # an override to "as fast as possible" does not wait 10 x 10 ms per se


async def test_timestamps_on_every_chunk(start: Start, session: aiohttp.ClientSession) -> None:
    base = await start(DemoConfig(rate=0, timestamps=True))
    before = time.time()
    _, raw = await post(session, f"{base}/v1/chat/completions", chat_body(stream=True))
    parsed = chunks(raw)
    stamps = [c["x_demo_ts"] for c in parsed]
    assert len(stamps) == DEFAULT_MAX_TOKENS + 2
    assert before <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= time.time()
    _, nd = await post(session, f"{base}/api/chat", chat_body(max_tokens=2))
    assert all("x_demo_ts" in json.loads(line) for line in nd.decode().splitlines())


async def wait_for_idle(
    session: aiohttp.ClientSession, base: str, remaining: int = 0
) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while (current := await stats(session, base))["active_streams"] != remaining:
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.01)
    return current


@pytest.mark.parametrize("via_serve", [True, False], ids=["serve", "plain-runner"])
async def test_client_disconnect_ends_stream_quietly(
    start: Start,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    via_serve: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = DemoConfig(rate=50)
    if via_serve:  # serve() cancels the handler as soon as the client goes away
        base = await start(config)
    else:  # a runner without handler cancellation: the next write notices the disconnect
        runner = web.AppRunner(make_app(config))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    url = f"{base}/v1/chat/completions"
    try:
        survivor = await session.post(url, json=chat_body(stream=True, max_tokens=20))
        received = await survivor.content.readuntil(b"\n\n")
        async with aiohttp.ClientSession() as doomed:
            resp = await doomed.post(url, json=chat_body(stream=True, max_tokens=500))
            await resp.content.readuntil(b"\n\n")
            assert (await stats(session, base))["active_streams"] == 2
            resp.close()  # drops the connection mid-stream
        assert (await wait_for_idle(session, base, remaining=1))["active_streams"] == 1
        received += await survivor.read()
        assert len(chunks(received)) == 22
        await wait_for_idle(session, base)
    finally:
        if not via_serve:
            await runner.cleanup()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_stream_cap_gives_503(start: Start, session: aiohttp.ClientSession) -> None:
    base = await start(DemoConfig(rate=20, max_streams=1))
    url = f"{base}/v1/chat/completions"
    async with session.post(url, json=chat_body(stream=True, max_tokens=500)) as first:
        await first.content.readuntil(b"\n\n")
        resp, raw = await post(session, url, chat_body(stream=True))
        assert resp.status == 503
        assert json.loads(raw)["error"]["type"] == "server_error"
        first.close()
    await wait_for_idle(session, base)
    resp, _ = await post(session, url, chat_body(stream=True, max_tokens=1))
    assert resp.status == 200


async def test_healthz_and_models(base: str, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{base}/healthz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    async with session.get(f"{base}/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert body["data"] == [
        {
            "id": "demo-llm",
            "object": "model",
            "created": body["data"][0]["created"],
            "owned_by": "stream-relay",
        }
    ]
    assert isinstance(body["data"][0]["created"], int)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_writes_ports_file_and_stops_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    ports_file = tmp_path / "ports.json"
    cmd = [
        sys.executable,
        "-m",
        "extproc.demo.upstream",
        "--rate",
        "0",
        "--ports-file",
        str(ports_file),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "random"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ports_file.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        port = json.loads(ports_file.read_text())["http_port"]
        assert [p.name for p in tmp_path.iterdir()] == ["ports.json"]

        async def fetch(base: str) -> bytes:
            async with aiohttp.ClientSession() as s:
                _, raw = await post(s, f"{base}/v1/chat/completions", chat_body(stream=True))
                return raw

        async def in_process() -> bytes:
            runner, local_port = await serve(FAST)
            try:
                return await fetch(f"http://127.0.0.1:{local_port}")
            finally:
                await runner.cleanup()

        # another process (another PYTHONHASHSEED) streams the very same bytes
        assert asyncio.run(fetch(f"http://127.0.0.1:{port}")) == asyncio.run(in_process())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err
    assert err.count("\n") == 1 and str(port) in err
    assert "Traceback" not in err


def test_cli_port_in_use_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["--port", str(taken.getsockname()[1])]) == 1
    assert "cannot listen" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--port", "abc"], ["--port", "70000"], ["--rate", "nan"], ["--ttft-ms", "-1"], ["--bogus"]],
)
def test_cli_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
