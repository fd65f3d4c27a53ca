"""The inline hot path without Envoy: CPU per ext_proc message of the relay's servicer (or the
do-nothing one), driven by a grpc client process that behaves like Envoy in STREAMED mode
(one body chunk in flight per stream, the next sent when its reply arrives).

Used for the A/B numbers in bench/RESULTS.md ("What we tried"): on a shared 2-core machine
end-to-end latency is noisy, CPU time per message of one process much less so.

    python bench/hotpath.py [--servicer relay|noop] [--streams 50] [--chunks 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from stream_relay_bench import procstat

EVENT = (
    b'data: {"id":"chatcmpl-0123456789abcdef01234567","object":"chat.completion.chunk",'
    b'"created":1700000000,"model":"bench","choices":[{"index":0,"delta":{"content":" word"},'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
)


def headers(**pairs: str) -> HttpHeaders:
    items = [HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in pairs.items()]
    return HttpHeaders(headers=HeaderMap(headers=items))


async def one_stream(stub: ext_proc_grpc.ExternalProcessorStub, chunks: int) -> None:
    call = stub.Process(metadata=(("x-relay-write-path", "inline"),))
    await call.write(ProcessingRequest(request_headers=headers(**{":method": "POST"})))
    await call.read()
    status = headers(**{":status": "200", "content_type": "text/event-stream"})
    await call.write(ProcessingRequest(response_headers=status))
    await call.read()
    for i in range(chunks):
        body = HttpBody(body=EVENT, end_of_stream=i == chunks - 1)
        await call.write(ProcessingRequest(response_body=body))
        reply: ProcessingResponse = await call.read()
        assert reply.HasField("response_body")
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass


async def drive(port: int, streams: int, chunks: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ext_proc_grpc.ExternalProcessorStub(channel)
        await asyncio.gather(*(one_stream(stub, 20) for _ in range(streams)))  # warm-up
        os.write(1, b"go\n")
        await asyncio.gather(*(one_stream(stub, chunks) for _ in range(streams)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servicer", choices=("relay", "noop"), default="relay")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_port:
        asyncio.run(drive(args.client_port, args.streams, args.chunks))
        return 0
    ports = Path(f"/tmp/hotpath-{os.getpid()}.ports")
    if args.servicer == "relay":
        argv = ["-m", "extproc.ops.cli", "serve", "--grpc-port", "0", "--http-port", "0"]
    else:
        argv = ["-m", "stream_relay_bench.noop_extproc"]
    server = subprocess.Popen([sys.executable, *argv, "--ports-file", str(ports)])
    try:
        while not ports.is_file():
            time.sleep(0.05)
        port = __import__("json").loads(ports.read_text())["grpc_port"]
        client = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--client-port",
                str(port),
                "--streams",
                str(args.streams),
                "--chunks",
                str(args.chunks),
            ],
            stdout=subprocess.PIPE,
        )
        assert client.stdout is not None
        client.stdout.readline()
        before, t0 = procstat.sample({"server": (server.pid,)})["server"], time.monotonic()
        client.wait()
        after, wall = procstat.sample({"server": (server.pid,)})["server"], time.monotonic() - t0
        messages = args.streams * args.chunks
        print(
            f"{args.servicer}: {messages} body messages in {wall:.2f} s "
            f"({messages / wall:,.0f}/s), server CPU "
            f"{(after.cpu_s - before.cpu_s) * 1e6 / messages:.1f} µs/message"
        )
    finally:
        server.terminate()
        server.wait()
        ports.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
