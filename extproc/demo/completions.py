"""The demo LLM itself: deterministic text from a fixed vocabulary, paced SSE and NDJSON
streams, the OpenAI chat and Ollama chat endpoints, and fault injection by request header
(see `upstream.py` for the whole server and its endpoints)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from typing import Any

from aiohttp import web

DEFAULT_RATE = 50.0
DEFAULT_MAX_TOKENS = 32
MAX_TOKENS_CAP = 4096
MAX_CONCURRENT_STREAMS = 10_000
MAX_TTFT_MS = 3_600_000.0
DEMO_MODEL_ID = "demo-llm"
DEMO_CREATED = 1_700_000_000  # base for every `created` value the server reports
CREATED_SPREAD = 100_000_000
VOCABULARY: tuple[str, ...] = (
    "the", "stream", "relay", "keeps", "every", "token", "moving", "across", "quiet",
    "networks", "while", "clients", "reconnect", "and", "resume", "from", "their", "last",
    "event", "a", "gateway", "listens", "for", "bright", "signals", "in", "long", "answers",
    "that", "travel", "through", "busy", "wires", "with", "steady", "pace", "small", "words",
    "fill", "open", "windows", "of", "time", "as", "servers", "hum", "softly", "under",
    "calm", "blue", "skies", "rivers", "carry", "light", "toward", "distant", "hills",
    "where", "patient", "readers", "wait", "gently", "again", "today",
)  # fmt: skip
JSONObj = dict[str, Any]
log = logging.getLogger("stream_relay.demo_upstream")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    rate: float = DEFAULT_RATE  # events per second per stream; 0 or less -> as fast as possible
    ttft_ms: float = 0.0  # delay before the first event of a stream
    timestamps: bool = False  # add "x_demo_ts": time.time() to every streamed chunk
    max_streams: int = MAX_CONCURRENT_STREAMS  # concurrent streams beyond this get 503
    # Answer 401 unless Authorization is "Bearer <key>"; kept out of repr, so out of logs.
    required_key: str | None = field(default=None, repr=False)


@dataclass
class DemoStats:
    chat_completions: int = 0
    chat_completions_streamed: int = 0
    ollama_chat: int = 0
    active_streams: int = 0


CONFIG_KEY = web.AppKey("demo_config", DemoConfig)
STATS_KEY = web.AppKey("demo_stats", DemoStats)


class DemoError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class _Completion:
    model: str
    tokens: tuple[str, ...]
    completion_id: str
    created: int
    prompt_tokens: int


@dataclass(frozen=True)
class _Faults:
    rate: float
    ttft_s: float
    abort_after: int | None
    status: int | None


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_answer(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(obj), status=status, content_type="application/json")


def parse_number(raw: str, kind: Callable[[str], float], low: float, high: float) -> float:
    value = kind(raw)  # ValueError for junk; the range check also rejects nan and inf
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{raw!r} is not in [{low}, {high}]")
    return value


def _header(request: web.Request, name: str, kind: type[float], low: float, high: float) -> Any:
    raw = request.headers.get(name)
    try:
        return None if raw is None else parse_number(raw, kind, low, high)
    except ValueError:
        message = f"invalid {name} header {raw!r}: want {kind.__name__} in [{low}, {high}]"
        raise DemoError(400, message) from None


def _faults(request: web.Request, config: DemoConfig) -> _Faults:
    rate = _header(request, "x-demo-rate", float, -math.inf, math.inf)
    ttft_ms = _header(request, "x-demo-ttft-ms", float, 0, MAX_TTFT_MS)
    return _Faults(
        rate=config.rate if rate is None else rate,
        ttft_s=max(config.ttft_ms if ttft_ms is None else ttft_ms, 0.0) / 1000,
        abort_after=_header(request, "x-demo-abort-after", int, 0, math.inf),
        status=_header(request, "x-demo-status", int, 400, 599),
    )


async def _json_body(request: web.Request) -> JSONObj:
    try:
        body = await request.json()
    except ValueError:
        raise DemoError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise DemoError(400, "request body must be a JSON object")
    return body


def _words(content: object) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_words(p.get("text")) for p in content if isinstance(p, dict))
    return 0


def _completion(body: JSONObj, max_tokens: object) -> _Completion:
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise DemoError(400, "model must be a non-empty string", "model")
    if not isinstance(messages, list) or not messages:
        raise DemoError(400, "messages must be a non-empty array", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise DemoError(400, "each message must be an object", "messages")
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise DemoError(400, "max_tokens must be an integer", "max_tokens")
    if not 1 <= max_tokens <= MAX_TOKENS_CAP:
        raise DemoError(400, f"max_tokens must be between 1 and {MAX_TOKENS_CAP}", "max_tokens")
    key = json.dumps([model, messages, max_tokens], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(key.encode()).hexdigest()
    rng = random.Random(int(digest[24:40], 16))
    words = [rng.choice(VOCABULARY) for _ in range(max_tokens)]
    return _Completion(
        model=model,
        tokens=tuple(w if i == 0 else " " + w for i, w in enumerate(words)),
        completion_id="chatcmpl-" + digest[:24],
        created=DEMO_CREATED + int(digest[40:48], 16) % CREATED_SPREAD,
        prompt_tokens=sum(_words(m.get("content")) for m in messages),
    )


def _usage(c: _Completion) -> JSONObj:
    p, n = c.prompt_tokens, len(c.tokens)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then closes: no final chunk


async def _paced_stream(
    request: web.Request,
    faults: _Faults,
    content_type: str,
    payloads: Iterable[JSONObj | None],
    encode: Callable[[JSONObj | None], bytes],
) -> web.StreamResponse:
    config, stats = request.app[CONFIG_KEY], request.app[STATS_KEY]
    if stats.active_streams >= config.max_streams:
        raise DemoError(503, f"too many concurrent streams (limit {config.max_streams})")
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    resp.enable_chunked_encoding()
    loop = asyncio.get_running_loop()
    stats.active_streams += 1
    try:
        await resp.prepare(request)
        start = loop.time() + faults.ttft_s
        for n, payload in enumerate(payloads):
            if faults.abort_after is not None and n >= faults.abort_after:
                _abort(request)
                return resp
            delay = start + (n / faults.rate if faults.rate > 0 else 0.0) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if config.timestamps and payload is not None:
                payload = {**payload, "x_demo_ts": time.time()}
            await resp.write(encode(payload))
        await resp.write_eof()
    except ConnectionError:
        log.debug("client went away mid-stream: %s", request.path)
    finally:
        stats.active_streams -= 1
    return resp


def _sse(payload: JSONObj | None) -> bytes:
    return b"data: [DONE]\n\n" if payload is None else b"data: " + _dumps(payload) + b"\n\n"


def _ndjson(payload: JSONObj | None) -> bytes:
    return _dumps(payload) + b"\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    stats.chat_completions += 1
    faults = _faults(request, request.app[CONFIG_KEY])
    body = await _json_body(request)
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise DemoError(400, "stream must be a boolean", "stream")
    if not isinstance(options, dict):
        raise DemoError(400, "stream_options must be an object", "stream_options")
    if stream:
        stats.chat_completions_streamed += 1
    if faults.status is not None:
        raise DemoError(faults.status, f"demo upstream injected status {faults.status}")
    c = _completion(body, body.get("max_completion_tokens", body.get("max_tokens")))
    head: JSONObj = {"id": c.completion_id, "object": "chat.completion.chunk"}
    head |= {"created": c.created, "model": c.model}
    if not stream:
        if faults.abort_after is not None:
            _abort(request)
        message = {"role": "assistant", "content": "".join(c.tokens), "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}
        body = {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(c)}
        return json_answer(body)
    usage = {"usage": None} if options.get("include_usage") else {}

    def chunk(delta: JSONObj, finish: str | None = None) -> JSONObj:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **usage}

    payloads = chain(  # built lazily: thousands of idle streams stay cheap
        [chunk({"role": "assistant", "content": ""})],
        (chunk({"content": t}) for t in c.tokens),
        [chunk({}, "length")],
        [{**head, "choices": [], "usage": _usage(c)}] if usage else [],
        [None],
    )
    return await _paced_stream(request, faults, "text/event-stream", payloads, _sse)


async def ollama_chat(request: web.Request) -> web.StreamResponse:
    request.app[STATS_KEY].ollama_chat += 1
    faults = _faults(request, request.app[CONFIG_KEY])
    body = await _json_body(request)
    stream, options = body.get("stream", True), body.get("options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise DemoError(400, "stream must be a boolean and options an object")
    if faults.status is not None:
        raise DemoError(faults.status, f"demo upstream injected status {faults.status}")
    c = _completion(body, options.get("num_predict", body.get("max_tokens")))
    stamp = datetime.fromtimestamp(c.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head: JSONObj = {"model": c.model, "created_at": stamp}
    done: JSONObj = {"done": True, "done_reason": "length", "total_duration": 0}
    done |= {"prompt_eval_count": c.prompt_tokens, "eval_count": len(c.tokens)}

    def line(text: str, tail: JSONObj) -> JSONObj:
        return {**head, "message": {"role": "assistant", "content": text}, **tail}

    if not stream:
        if faults.abort_after is not None:
            _abort(request)
        return json_answer(line("".join(c.tokens), done))
    payloads = chain((line(t, {"done": False}) for t in c.tokens), [line("", done)])
    return await _paced_stream(request, faults, "application/x-ndjson", payloads, _ndjson)
