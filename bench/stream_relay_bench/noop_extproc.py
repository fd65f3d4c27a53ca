"""A do-nothing ext_proc server: the same processing modes as the relay, no framing, no log.

It answers request headers with "continue", switches `200 text/event-stream` responses to
STREAMED body mode (the relay's own `mode_override`) and passes every body chunk unchanged.
What it costs per chunk is the floor of a Python grpc.aio ext_proc on this machine.

    python -m stream_relay_bench.noop_extproc --ports-file PATH
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyResponse,
    HeadersResponse,
    ProcessingRequest,
    ProcessingResponse,
)

from extproc.inline.processor import STREAM_BODY_MODE, header_value
from extproc.node.process import write_ports_file

_CONTINUE_REQUEST = ProcessingResponse(request_headers=HeadersResponse())
_CONTINUE_RESPONSE = ProcessingResponse(response_headers=HeadersResponse())
_STREAM = ProcessingResponse(response_headers=HeadersResponse(), mode_override=STREAM_BODY_MODE)
_PASS_BODY = ProcessingResponse(response_body=BodyResponse())


class NoopProcessor(ext_proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    async def Process(
        self,
        request_iterator: AsyncIterator[ProcessingRequest],
        context: grpc.aio.ServicerContext[ProcessingRequest, ProcessingResponse],
    ) -> AsyncIterator[ProcessingResponse]:
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "response_body":
                yield _PASS_BODY
            elif kind == "request_headers":
                yield _CONTINUE_REQUEST
            elif kind == "response_headers":
                headers = request.response_headers
                stream = header_value(headers, ":status") == "200" and "event-stream" in (
                    header_value(headers, "content-type") or ""
                )
                yield _STREAM if stream else _CONTINUE_RESPONSE


async def serve(port: int, ports_file: Path | None) -> None:
    server = grpc.aio.server()
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ports_file is not None:
        write_ports_file(ports_file, {"grpc_port": bound})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description="do-nothing ext_proc server (bench)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ports-file", type=Path)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.ports_file))


if __name__ == "__main__":
    main()
