"""How much a client that reads nothing absorbs before backpressure bites, on both write paths.

    .venv/bin/python bench/buffered.py

An upstream of its own streams 20,000 events of 1 KB as fast as its socket takes them; a raw
HTTP/1.1 client sends one request through a stack (as `stream-relay up` runs it) and never
reads. Once nothing moves for 3 s it reports, from the upstream's count and the relay's
metrics: how much the upstream wrote (inline: Envoy pauses it), how much the relay logged, how
far the relay's cursor for that client got (events written into its socket) and what the lag
gauge says. Numbers for the README's Backpressure section; they depend on the kernel's socket
buffer settings (printed).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from extproc.ops.status import parse, total
from extproc.ops.supervisor import StackOptions, start_stack

EVENT_BYTES = 1000  # payload of each event
EVENTS = 20_000
STILL_S = 3.0  # nothing moved for this long: stalled
MIB = 1024 * 1024


class Upstream:
    """An SSE upstream on its own thread and loop that counts the bytes its writes returned."""

    def __init__(self) -> None:
        self.written = 0
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True).start()
        self._ready.wait()

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        event = b"data: " + b"x" * EVENT_BYTES + b"\n\n"
        for _ in range(EVENTS):
            await response.write(event)  # returns once the socket took it (aiohttp drains)
            self.written += len(event)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._stream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.port = runner.addresses[0][1]
        self._ready.set()
        await asyncio.Event().wait()


def settled(read: Callable[[], float]) -> float:
    last, since = read(), time.monotonic()
    while time.monotonic() - since < STILL_S:
        time.sleep(0.2)  # polling other processes' counters
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


def measure(write_path: str) -> str:
    upstream = Upstream()
    stack = start_stack(
        StackOptions(
            port=0,
            admin_port=0,
            upstream=f"http://127.0.0.1:{upstream.port}",
            write_path=write_path,
            relay_args=("--session-max-bytes", str(64 * MIB)),
        )
    )
    try:
        host, port = stack.base_url.removeprefix("http://").split(":")
        body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
        with socket.create_connection((host, int(port))) as client:
            client.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
                b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            written = settled(lambda: upstream.written)
            with urllib.request.urlopen(stack.metrics_url, timeout=10) as response:
                metrics = parse(response.read().decode())
        logged = total(metrics, "relay_event_bytes_total")
        events = total(metrics, "relay_events_total")
        delivered = total(metrics, "relay_events_delivered_total")
        lag = total(metrics, "relay_reader_lag_max_events")
        line = (
            f"{write_path}: the upstream wrote {written / MIB:.2f} MiB, the relay logged "
            f"{logged / MIB:.2f} MiB ({events:,.0f} events)"
        )
        if write_path == "detached":
            line += (
                f"; its cursor for the client wrote {delivered:,.0f} events "
                f"(~{delivered * logged / max(events, 1) / MIB:.2f} MiB) and stopped "
                f"there; the lag gauge read {lag:,.0f} events"
            )
        else:
            line += " and passed it on toward the client, then Envoy paused the upstream"
        return line
    finally:
        stack.stop()


def main() -> int:
    sysctl = {
        name: Path(f"/proc/sys/net/{name.replace('.', '/')}").read_text().split()
        for name in ("ipv4.tcp_rmem", "ipv4.tcp_wmem", "core.wmem_default")
    }
    print(f"kernel buffers: {sysctl}")
    for write_path in ("inline", "detached"):
        print(measure(write_path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
