"""A hosted LLM API as it looks on the wire, for the transparency tests: recorded third-party
behaviour replayed, not our demo's.

Every answer carries what hosted APIs and LLM proxies send besides the body: a request id
(`x-request-id`, fresh per call), rate-limit headers, the response header set LiteLLM 1.108.7
was recorded sending (18 `x-litellm-*`, `vary: Origin`, security headers, its
`access-control-allow-origin: *`), and a header sent twice. Streams are the wire samples in
tests/fixtures (OpenAI tool-call deltas, Anthropic Messages, OpenAI Responses), paced a little
so they are live. JSON answers have `Content-Length`, and are gzipped when the request
accepts it; errors are LiteLLM's recorded shapes.

  python tests/hosted_upstream.py --ports-file FILE

POST /v1/chat/completions, model:
  fixture-tools | fixture-chat   the tool-call / usage fixture as a stream (or JSON, stream off)
  slow                           a 40-event stream, one event per 25 ms
  error-400 | error-429 | error-503   recorded error answers
  echo                           what /echo answers: the request as it arrived
  gzip-sse                       a gzipped event stream even if the request asks for identity
POST /v1/messages                the Anthropic fixture (stream) or a message (JSON)
POST /v1/responses               the Responses fixture
GET  /v1/models                  JSON, with the Last-Event-ID it received
GET  /mcp                        an MCP streamable-HTTP style SSE stream with its own ids,
                                 resumed after its own Last-Event-ID (`mcp-<n>`)
*    /echo                       the request line and headers received, in order, as JSON
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
import uuid
import zlib
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

FIXTURES = Path(__file__).parent / "fixtures"
EVENT_PAUSE_S = 0.01
SLOW_EVENTS = 40
SLOW_PAUSE_S = 0.025
MCP_EVENTS = 3
SERVER = "hosted-llm/2.1"
# Recorded from LiteLLM 1.108.7 (chat stream through its proxy, mock model).
LITELLM_HEADERS = {
    "x-litellm-call-id": "ce467a09-a558-41ad-b6e6-cd2e091d1e49",
    "x-litellm-model-id": "4f3bddd1e15bb12ff33b72dd7c61b0e5d1a6bab92ba9e7b8fd086972b74fb1ac",
    "x-litellm-model-name": "openai/mock-gpt",
    "x-litellm-model-api-base": "https://api.openai.com",
    "x-litellm-version": "1.108.7",
    "x-litellm-response-cost-original": "0.0",
    "x-litellm-response-cost-discount-amount": "0.0",
    "x-litellm-response-cost-margin-amount": "0.0",
    "x-litellm-response-cost-margin-percent": "0.0",
    "x-litellm-response-cost-input": "0.0",
    "x-litellm-response-cost-output": "0.0",
    "x-litellm-response-cost-tool-usage": "0.0",
    "x-litellm-key-spend": "0.0",
    "x-litellm-response-duration-ms": "797.9857921600342",
    "x-litellm-callback-duration-ms": "0.0",
    "x-litellm-model-group": "mock-gpt",
    "x-litellm-attempted-retries": "0",
    "x-litellm-attempted-fallbacks": "0",
    "vary": "Origin",
    "x-frame-options": "DENY",
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "access-control-allow-origin": "*",  # LiteLLM grants every origin
}
API_HEADERS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "499",
    "openai-processing-ms": "7",
    "strict-transport-security": "max-age=31536000",
}
REPEATED = ("x-trace-hop", ("edge-1", "edge-2"))  # one header sent twice
ERRORS = {  # recorded error answers: (status, body, extra headers)
    "error-400": (
        400,
        {
            "error": {
                "message": "litellm.BadRequestError: Invalid model name passed in model=nope",
                "type": "invalid_request_error",
                "param": None,
                "code": "400",
            }
        },
        {},
    ),
    "error-429": (
        429,
        {"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}},
        {"retry-after": "3"},
    ),
    "error-503": (
        503,
        {"error": {"message": "overloaded (the LLM's own)", "type": "server_error"}},
        {},
    ),
}
STREAM_FIXTURES = {
    "fixture-tools": "openai-tool-calls.sse",
    "fixture-chat": "openai-chat-usage.sse",
}


def api_headers() -> list[tuple[str, str]]:
    request_id = "req_" + uuid.uuid4().hex[:16]
    pairs = [("x-request-id", request_id), ("request-id", request_id)]  # OpenAI's, Anthropic's
    pairs += [*LITELLM_HEADERS.items(), *API_HEADERS.items()]
    return pairs + [(REPEATED[0], value) for value in REPEATED[1]]


def events(name: str) -> list[bytes]:
    """A fixture's blocks, each with its blank line (the fixtures use LF)."""
    text = (FIXTURES / name).read_bytes()
    return [block + b"\n\n" for block in text.split(b"\n\n") if block.strip()]


async def stream(
    request: web.Request, blocks: list[bytes], pause_s: float = EVENT_PAUSE_S
) -> web.StreamResponse:
    response = web.StreamResponse(headers=CIMultiDict(api_headers()))
    response.headers["Content-Type"] = "text/event-stream; charset=utf-8"
    response.headers["Cache-Control"] = "no-cache"
    await response.prepare(request)
    for block in blocks:
        await response.write(block)
        await asyncio.sleep(pause_s)
    await response.write_eof()
    return response


def json_answer(request: web.Request, payload: object, status: int = 200) -> web.Response:
    """JSON with Content-Length; gzipped when the request accepts it (as hosted APIs do)."""
    body = json.dumps(payload).encode()
    headers = [*api_headers(), ("Content-Type", "application/json")]
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    return web.Response(status=status, body=body, headers=CIMultiDict(headers))


async def gzip_stream(request: web.Request) -> web.StreamResponse:
    """An event stream compressed whatever the request asked for (a CDN in front of an API)."""
    response = web.StreamResponse(headers=CIMultiDict(api_headers()))
    response.headers["Content-Type"] = "text/event-stream"
    response.headers["Content-Encoding"] = "gzip"
    await response.prepare(request)
    packer = zlib.compressobj(wbits=31)
    for block in events("openai-chat-usage.sse"):
        await response.write(packer.compress(block) + packer.flush(zlib.Z_SYNC_FLUSH))
    await response.write(packer.flush())
    await response.write_eof()
    return response


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model, streamed = body.get("model", ""), bool(body.get("stream"))
    if model in ERRORS:
        status, payload, extra = ERRORS[model]
        response = json_answer(request, payload, status)
        response.headers.update(extra)
        return response
    if model == "echo":
        return await echo(request)
    if model == "gzip-sse":
        return await gzip_stream(request)
    if model == "slow":
        chunk = {"choices": [{"index": 0, "delta": {"content": "w "}}]}
        blocks = [b"data: " + json.dumps(chunk).encode() + b"\n\n"] * SLOW_EVENTS
        return await stream(request, [*blocks, b"data: [DONE]\n\n"], SLOW_PAUSE_S)
    name = STREAM_FIXTURES.get(model, "openai-chat-usage.sse")
    if streamed:
        return await stream(request, events(name))
    message = {"role": "assistant", "content": "Relays keep long answers alive."}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    answer = {"id": "chatcmpl-fx", "object": "chat.completion", "created": 1795500001}
    return json_answer(request, {**answer, "model": model, "choices": [choice]})


async def messages(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body.get("stream"):
        return await stream(request, events("anthropic-messages.sse"))
    message = {
        "id": "msg_fx",
        "type": "message",
        "role": "assistant",
        "model": "claude-fixture",
        "content": [{"type": "text", "text": "Hello, relay world!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 15, "output_tokens": 5},
    }
    return json_answer(request, message)


async def responses(request: web.Request) -> web.StreamResponse:
    return await stream(request, events("openai-responses.sse"))


async def models(request: web.Request) -> web.Response:
    seen = request.headers.get("Last-Event-ID")
    return json_answer(
        request, {"object": "list", "data": [{"id": "fx"}], "last_event_id_seen": seen}
    )


async def mcp(request: web.Request) -> web.StreamResponse:
    """MCP streamable HTTP: a GET opens a server-to-client SSE stream whose ids are the
    server's own; a client that reconnects sends the last one back and gets the rest."""
    after = request.headers.get("Last-Event-ID", "mcp-0")
    start = int(after.removeprefix("mcp-")) if after.startswith("mcp-") else 0
    blocks = [
        f'id: mcp-{n}\ndata: {{"jsonrpc": "2.0", "method": "notify", "n": {n}}}\n\n'.encode()
        for n in range(start + 1, start + 1 + MCP_EVENTS)
    ]
    return await stream(request, blocks)


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    seen = {
        "method": request.method,
        "target": request.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body_bytes": len(body),
    }
    return web.json_response(seen, headers=CIMultiDict(api_headers()))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _name_itself(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER  # as a hosted API does; a proxy must not rename it


def make_app() -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(_name_itself)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/mcp", mcp)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/healthz", healthz)
    return app


async def main(ports_file: Path) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    tmp = ports_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"http_port": port}))
    os.replace(tmp, ports_file)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports-file", type=Path, required=True)
    try:
        asyncio.run(main(parser.parse_args().ports_file))
    except KeyboardInterrupt:
        sys.exit(0)
