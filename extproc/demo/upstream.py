# Built-in demo LLM upstream for stream-relay: an aiohttp server that speaks OpenAI Chat
# Completions (SSE and JSON) and Ollama /api/chat (NDJSON) with deterministic, paced text.
# It backs every test and benchmark and `stream-relay up --demo`; it owns no relay logic.
"""Deterministic OpenAI-compatible demo upstream.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /api/chat`` (Ollama
NDJSON; ``options.num_predict`` or ``max_tokens`` sets the length), ``GET /healthz`` and
``GET /demo/stats`` (request counters and ``active_streams``), ``GET|POST /demo/echo-headers``
(the request headers it received, as JSON, with ``Authorization`` redacted).

With ``--require-key FILE`` every endpoint but ``/healthz`` answers 401 unless the request has
``Authorization: Bearer <the key in FILE>``, as a hosted LLM API would: it stands in for one in
the tests of Envoy's credential injection.

The text is exactly ``max_tokens`` words drawn from a fixed vocabulary with a seed taken from
a SHA-256 of model + messages + max_tokens, so identical requests give byte-identical bodies
(unless ``timestamps`` adds ``x_demo_ts`` to each chunk). Streamed event ``n`` (the role chunk
is event 0) is written at ``start + ttft + n / rate``, so pacing never drifts.

Fault injection by request header (invalid values give a 400 error JSON):

- ``x-demo-status: <400-599>``: answer with that status and an OpenAI-style error body.
- ``x-demo-abort-after: N``: write N events, then close the connection without the
  terminating chunk or ``[DONE]`` (non-streaming requests are closed before any response).
  N at or above the number of events leaves the stream intact.
- ``x-demo-rate: R`` / ``x-demo-ttft-ms: T``: per-request overrides of the config.

At most ``DemoConfig.max_streams`` streams (default ``MAX_CONCURRENT_STREAMS``) run at once;
more get 503. A client that disconnects mid-stream ends its stream quietly: at the next write,
or at once when served by ``serve()``, whose runner cancels handlers on disconnect.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from extproc.demo.completions import (
    CONFIG_KEY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_RATE,
    DEMO_CREATED,
    DEMO_MODEL_ID,
    MAX_CONCURRENT_STREAMS,
    MAX_TTFT_MS,
    STATS_KEY,
    VOCABULARY,
    DemoConfig,
    DemoError,
    DemoStats,
    chat_completions,
    json_answer,
    ollama_chat,
    parse_number,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "MAX_CONCURRENT_STREAMS",
    "VOCABULARY",
    "DemoConfig",
    "main",
    "make_app",
    "serve",
]

log = logging.getLogger("stream_relay.demo_upstream")


@web.middleware
async def _require_key(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    required = request.app[CONFIG_KEY].required_key
    if required is not None and request.path != "/healthz":
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {required}".encode()):
            error = {"message": "missing or wrong API key", "type": "invalid_request_error"}
            return json_answer({"error": {**error, "param": None, "code": "invalid_api_key"}}, 401)
    resp: web.StreamResponse = await handler(request)
    return resp


@web.middleware
async def _errors(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
    except DemoError as err:
        kind = "server_error" if err.status >= 500 else "invalid_request_error"
        kind = "rate_limit_error" if err.status == 429 else kind
        error = {"message": err.message, "type": kind, "param": err.param, "code": None}
        return json_answer({"error": error}, status=err.status)
    return resp


async def _models(request: web.Request) -> web.Response:
    model = {"id": DEMO_MODEL_ID, "object": "model", "created": DEMO_CREATED}
    return json_answer({"object": "list", "data": [{**model, "owned_by": "stream-relay"}]})


async def _healthz(request: web.Request) -> web.Response:
    return json_answer({"status": "ok"})


async def _stats(request: web.Request) -> web.Response:
    return json_answer(asdict(request.app[STATS_KEY]))


async def _echo_headers(request: web.Request) -> web.Response:
    """What reached the LLM: lets tests check the headers Envoy adds, strips or replaces."""
    required = request.app[CONFIG_KEY].required_key
    headers: dict[str, list[str]] = {}
    for name, value in request.headers.items():
        if name.lower() == "authorization":  # never echo a credential back to a client
            matches = required is not None and value == f"Bearer {required}"
            value = "<redacted: the required key>" if matches else "<redacted>"
        headers.setdefault(name.lower(), []).append(value)
    return json_answer({"headers": headers})


def make_app(config: DemoConfig) -> web.Application:
    app = web.Application(middlewares=[_require_key, _errors])
    app[CONFIG_KEY], app[STATS_KEY] = config, DemoStats()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/api/chat", ollama_chat)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/demo/stats", _stats)
    app.router.add_route("*", "/demo/echo-headers", _echo_headers)
    return app


async def serve(
    config: DemoConfig, *, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    # handler_cancellation: a client that disconnects during a sleep ends its stream at once
    runner = web.AppRunner(
        make_app(config), access_log=None, shutdown_timeout=1.0, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])


def _write_ports_file(path: str, port: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ports-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"http_port": port}, f)
    os.replace(tmp, path)


async def _run(args: argparse.Namespace) -> int:
    config = DemoConfig(
        rate=args.rate,
        ttft_ms=args.ttft_ms,
        timestamps=args.timestamps,
        required_key=args.required_key,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner, port = await serve(config, host=args.host, port=args.port)
    except OSError as exc:
        print(f"demo upstream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.ports_file:
            _write_ports_file(args.ports_file, port)
        print(f"demo upstream listening on http://{args.host}:{port} {config}", file=sys.stderr)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def _arg(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        return parse_number(raw, kind, low, high)

    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names it in errors
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stream-relay demo-upstream", description="stream-relay demo LLM upstream"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_arg(int, 0, 65535), default=0, help="0: any free port")
    rate_help = "events/s per stream, 0 = as fast as possible"
    parser.add_argument(
        "--rate", type=_arg(float, -math.inf, math.inf), default=DEFAULT_RATE, help=rate_help
    )
    parser.add_argument("--ttft-ms", type=_arg(float, 0, MAX_TTFT_MS), default=0.0)
    parser.add_argument("--timestamps", action="store_true", help="add x_demo_ts to chunks")
    parser.add_argument("--ports-file", help='write {"http_port": N} here once listening')
    parser.add_argument(
        "--require-key", metavar="FILE", help="answer 401 unless Authorization: Bearer <key>"
    )
    args = parser.parse_args(argv)
    args.required_key = None
    if args.require_key:
        try:
            args.required_key = Path(args.require_key).read_text().strip()
        except OSError as exc:
            print(f"demo upstream: cannot read --require-key: {exc}", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:  # only before the signal handlers are installed
        return 0


if __name__ == "__main__":
    sys.exit(main())
