"""A do-nothing ext_proc server: the same processing modes as the relay, no framing, no log.

It answers request headers with "continue", switches `200 text/event-stream` responses to
STREAMED body mode (the relay's own `mode_override`) and passes every body chunk unchanged.
What it costs per chunk is the floor of a Python grpc.aio ext_proc on this machine (on uvloop,
as the relay node runs).

Like the relay node it serves `grpc.health.v1.Health`: the relay_grpc cluster health-checks
its hosts, and a processor without health is marked unhealthy, so Envoy fails open and the
"floor" would never see a message. It counts the messages it answered and serves the counts
as JSON at `/stats` on its HTTP port, so the bench can prove it processed the path.

    python -m stream_relay_bench.noop_extproc --ports-file PATH [--no-health]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import uvloop
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HeadersResponse,
    ProcessingRequest,
    ProcessingResponse,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.inline.processor import STREAM_BODY_MODE, header_value
from extproc.node.metrics import MESSAGE_PHASES
from extproc.node.process import write_ports_file

_CONTINUE_REQUEST = ProcessingResponse(request_headers=HeadersResponse())
_CONTINUE_RESPONSE = ProcessingResponse(response_headers=HeadersResponse())
_STREAM = ProcessingResponse(response_headers=HeadersResponse(), mode_override=STREAM_BODY_MODE)
_PASS_BODY = ProcessingResponse(response_body=BodyResponse())
# The generation route streams request bodies to the processor too (the relay keeps their
# digest): the floor answers them as the relay does, unchanged.
_PASS_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse())


class NoopProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.answered = dict.fromkeys(MESSAGE_PHASES, 0)  # messages answered, by phase
        self.streams = 0
        self.open = 0  # streams not yet ended

    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext[ProcessingRequest, ProcessingResponse],
    ) -> AsyncIterator[ProcessingResponse]:
        self.streams += 1
        self.open += 1
        answered = self.answered
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("request")
                if kind == "response_body":
                    answered[kind] += 1
                    yield _PASS_BODY
                elif kind == "request_headers":
                    answered[kind] += 1
                    yield _CONTINUE_REQUEST
                elif kind == "request_body":
                    answered[kind] += 1
                    yield _PASS_REQUEST_BODY
                elif kind == "response_headers":
                    answered[kind] += 1
                    headers = request.response_headers
                    stream = header_value(headers, ":status") == "200" and "event-stream" in (
                        header_value(headers, "content-type") or ""
                    )
                    yield _STREAM if stream else _CONTINUE_RESPONSE
        finally:
            self.open -= 1


async def serve(port: int, ports_file: Path | None, *, with_health: bool = True) -> None:
    processor = NoopProcessor()
    server = grpc.aio.server()
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    if with_health:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stats(request: web.Request) -> web.Response:
        counts = {"answered": processor.answered, "streams": processor.streams}
        return web.json_response({**counts, "open": processor.open})

    app = web.Application()
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    http_port = runner.addresses[0][1]
    if ports_file is not None:
        write_ports_file(ports_file, {"grpc_port": bound, "http_port": http_port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="do-nothing ext_proc server (bench)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ports-file", type=Path)
    parser.add_argument(
        "--no-health",
        action="store_true",
        help="serve no grpc.health.v1 (what the broken floor did; for the bench's own tests)",
    )
    args = parser.parse_args()
    # The relay node's event loop (extproc.node.process.run): the floor runs on the same stack.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.ports_file, with_health=not args.no_health))


if __name__ == "__main__":
    main()
