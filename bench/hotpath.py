"""The inline hot path without Envoy: CPU per ext_proc message of the relay's servicer (or the
do-nothing one), driven by a grpc client process that behaves like Envoy in STREAMED mode
(one body chunk in flight per stream, the next sent when its reply arrives).

Used for the A/B numbers in bench/RESULTS.md: on a shared 2-core machine end-to-end latency is
noisy, CPU time per message of one process much less so, and instruction counts (callgrind)
hardly at all.

    python bench/hotpath.py [--servicer relay|noop] [--streams 50] [--chunks 400]
    python bench/hotpath.py --pairs 3 --b-env STREAM_RELAY_GC_FREEZE=0   # interleaved A/B
    python bench/hotpath.py --pairs 2 --b-tree /tmp/old                  # this code vs another
    python bench/hotpath.py --instructions                               # callgrind, per message

`--instructions` runs the server under `valgrind --tool=callgrind` twice, with `--chunks` and
with twice as many, and reports (I(2n) - I(n)) / (streams * n): the instructions of one more
body message, start-up and warm-up cancelled out. `--wrap "py-spy record -o p.txt -f raw --"`
runs the server under any other tool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
STARTUP_TIMEOUT_S = 600.0  # under valgrind, importing grpc takes minutes


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
    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
        pass


async def drive(port: int, streams: int, chunks: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = ext_proc_grpc.ExternalProcessorStub(channel)
        await asyncio.gather(*(one_stream(stub, 20) for _ in range(streams)))  # warm-up
        os.write(1, b"go\n")
        await asyncio.gather(*(one_stream(stub, chunks) for _ in range(streams)))


class _Context:
    """What the servicers ask of grpc's ServicerContext."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-relay-write-path", "inline"),)


def in_process_servicer(servicer: str) -> Any:
    if servicer == "noop":
        from stream_relay_bench.noop_extproc import NoopProcessor

        return NoopProcessor()
    from extproc.access.quota import SessionQuota
    from extproc.inline.service import ExternalProcessor
    from extproc.node.metrics import RelayMetrics
    from extproc.store import MemoryStore

    metrics = RelayMetrics()
    store = MemoryStore(metrics=metrics)
    return ExternalProcessor(store, SessionQuota(), metrics, max_event_bytes=1 << 20)


async def in_process(servicer: str, streams: int, chunks: int) -> float:
    """The servicer's own work without grpc's transport: each message parsed from its wire
    bytes, fed through the servicer's Process loop, its reply serialized; µs per message."""
    processor = in_process_servicer(servicer)
    parse = ProcessingRequest.FromString
    wire = [
        ProcessingRequest(request_headers=headers(**{":method": "POST"})).SerializeToString(),
        ProcessingRequest(
            response_headers=headers(**{":status": "200", "content_type": "text/event-stream"})
        ).SerializeToString(),
    ]
    body = ProcessingRequest(response_body=HttpBody(body=EVENT)).SerializeToString()
    last = ProcessingRequest(response_body=HttpBody(body=EVENT, end_of_stream=True))
    wire += [body] * (chunks - 1) + [last.SerializeToString()]

    async def requests() -> AsyncIterator[ProcessingRequest]:
        for raw in wire:
            yield parse(raw)

    started = time.perf_counter()
    for _ in range(streams):
        async for reply in processor.Process(requests(), _Context()):
            if not isinstance(reply, bytes):  # the relay's body replies are wire bytes already
                reply.SerializeToString()
    return (time.perf_counter() - started) * 1e6 / (streams * (chunks + 2))


@dataclass(frozen=True)
class Variant:
    """How to start the server: which servicer, extra environment, another code tree."""

    servicer: str
    env: tuple[tuple[str, str], ...] = ()
    tree: str = ""  # a checkout whose extproc/ replaces this one (PYTHONPATH first)
    wrap: tuple[str, ...] = ()  # a command the server runs under (valgrind, py-spy)


@dataclass(frozen=True)
class Run:
    messages: int
    wall_s: float
    cpu_us: float  # server CPU per body message, measured window only
    instructions: int  # whole server process, from callgrind (0 when not under it)


def run_once(variant: Variant, streams: int, chunks: int) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix="hotpath-"))
    ports = workdir / "ports"
    if variant.servicer == "relay":
        argv = ["-m", "extproc.ops.cli", "serve", "--grpc-port", "0", "--http-port", "0"]
    else:
        argv = ["-m", "stream_relay_bench.noop_extproc"]
    env = {**os.environ, **dict(variant.env)}
    if variant.tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (variant.tree, env.get("PYTHONPATH"))))
    wrap = [part.replace("{dir}", str(workdir)) for part in variant.wrap]
    server = subprocess.Popen(
        [*wrap, sys.executable, *argv, "--ports-file", str(ports)],
        env=env,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not ports.is_file():  # polling the server process, bounded by the deadline
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {server.returncode})")
            time.sleep(0.05)
        port = json.loads(ports.read_text())["grpc_port"]
        client = subprocess.Popen(
            [
                *(sys.executable, __file__, "--client-port", str(port)),
                *("--streams", str(streams), "--chunks", str(chunks)),
            ],
            stdout=subprocess.PIPE,
        )
        assert client.stdout is not None
        client.stdout.readline()
        before, t0 = procstat.sample({"server": (server.pid,)})["server"], time.monotonic()
        if client.wait() != 0:
            raise RuntimeError("hotpath client failed")
        after, wall = procstat.sample({"server": (server.pid,)})["server"], time.monotonic() - t0
    finally:
        # SIGINT: the servers stop on it, and py-spy writes its profile on it.
        server.send_signal(signal.SIGINT)
        try:
            server.wait(STARTUP_TIMEOUT_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # whatever a wrapper left behind
            server.wait()
    messages = streams * chunks
    instructions = max((_callgrind_total(out) for out in workdir.glob("callgrind.out*")), default=0)
    return Run(messages, wall, (after.cpu_s - before.cpu_s) * 1e6 / messages, instructions)


CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file={dir}/callgrind.out")


def instructions_per_message(variant: Variant, streams: int, chunks: int) -> float:
    grind = Variant(variant.servicer, variant.env, variant.tree, CALLGRIND)
    small = run_once(grind, streams, chunks)
    large = run_once(grind, streams, 2 * chunks)
    return (large.instructions - small.instructions) / (large.messages - small.messages)


def in_process_instructions(variant: Variant, streams: int, chunks: int) -> float:
    """--in-process under callgrind, with `chunks` and twice as many: instructions of one more
    message through the servicer's own code (parse, Process loop, serialize)."""
    counts = []
    for n in (chunks, 2 * chunks):
        with tempfile.TemporaryDirectory(prefix="hotpath-") as workdir:
            out = Path(workdir) / "callgrind.out"
            env = {**os.environ, **dict(variant.env)}
            if variant.tree:
                env["PYTHONPATH"] = os.pathsep.join(
                    filter(None, (variant.tree, env.get("PYTHONPATH")))
                )
            subprocess.run(
                [
                    *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
                    *(sys.executable, __file__, "--in-process", "--servicer", variant.servicer),
                    *("--streams", str(streams), "--chunks", str(n)),
                ],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            counts.append(_callgrind_total(out))
    return (counts[1] - counts[0]) / (streams * chunks)


def _callgrind_total(path: Path) -> int:
    total = 0
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = max(total, int(line.split()[1]))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servicer", choices=("relay", "noop"), default="relay")
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--chunks", type=int, default=400)
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="server env")
    parser.add_argument("--tree", default="", help="run the server from this checkout")
    parser.add_argument("--wrap", default="", help="command the server runs under")
    parser.add_argument("--pairs", type=int, default=0, help="interleaved A/B pairs")
    parser.add_argument("--b-servicer", choices=("relay", "noop"))
    parser.add_argument("--b-env", action="append", default=[], metavar="K=V")
    parser.add_argument("--b-tree", default="")
    parser.add_argument("--instructions", action="store_true", help="callgrind, per message")
    parser.add_argument(
        "--in-process", action="store_true", help="no grpc transport: the servicer's own work"
    )
    parser.add_argument("--client-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_port:
        asyncio.run(drive(args.client_port, args.streams, args.chunks))
        return 0
    if args.in_process and not args.instructions:
        per = asyncio.run(in_process(args.servicer, args.streams, args.chunks))
        print(f"{args.servicer} in process: {per:.2f} µs per message", flush=True)
        return 0

    def env(pairs: list[str]) -> tuple[tuple[str, str], ...]:
        return tuple(tuple(p.split("=", 1)) for p in pairs)  # type: ignore[misc]

    a = Variant(args.servicer, env(args.env), args.tree, tuple(shlex.split(args.wrap)))
    b = Variant(
        args.b_servicer or args.servicer,
        env(args.env + args.b_env),
        args.b_tree or args.tree,
        a.wrap,
    )
    variants = [("A", a), ("B", b)] if args.pairs else [("", a)]
    for pair in range(max(args.pairs, 1)):
        for label, variant in variants:
            name = f"{label}{pair + 1} " if label else ""
            what = f"{variant.servicer} {' '.join('='.join(e) for e in variant.env)}".strip()
            if args.instructions and args.in_process:
                per = in_process_instructions(variant, args.streams, args.chunks)
                print(f"{name}{what}: {per:,.0f} instructions per message in process", flush=True)
                continue
            if args.instructions:
                per = instructions_per_message(variant, args.streams, args.chunks)
                print(f"{name}{what}: {per:,.0f} instructions per body message", flush=True)
                continue
            run = run_once(variant, args.streams, args.chunks)
            print(
                f"{name}{what}: {run.messages} body messages in {run.wall_s:.2f} s "
                f"({run.messages / run.wall_s:,.0f}/s), server CPU {run.cpu_us:.1f} µs/message",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
