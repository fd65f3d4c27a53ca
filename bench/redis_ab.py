"""Relay CPU per event on the memory store vs the Redis store (one node), at one offered load,
in alternating pairs: the "cost of Redis per event" below the main run's 10k ev/s, where the
shared 2-core machine is not saturated. Same harness pieces as `stream-relay bench`.

    python bench/redis_ab.py [--rate 2000] [--pairs 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from stream_relay_bench import peers
from stream_relay_bench.runner import Load, measure
from stream_relay_bench.scenarios import running

from extproc.ops.supervisor import Stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="offered events/s")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    args = parser.parse_args()
    load = Load(events_per_s=args.rate, duration_s=args.seconds, warmup_s=3)
    workdir = Path(tempfile.mkdtemp(prefix="redis-ab-"))
    upstream = Stack(workdir / "upstream")
    upstream.workdir.mkdir()
    port = peers.start_upstream(upstream)
    try:
        for pair in range(args.pairs):
            for name in ("relay_inline", "relay_inline_redis_1"):
                pid = upstream.children[0].process.pid
                with running(name, port, pid, workdir / f"{name}-{pair}") as target:
                    point = measure(target, load)
                cpu, lat = point["cpu_us_per_event"], point["latency_ms"]
                print(
                    f"{name:22} {point['events_per_s']:7.0f} ev/s  p50 {lat['p50']:6.2f} "
                    f"p99 {lat['p99']:7.2f} ms  relay {cpu['relay']:6.1f}  redis "
                    f"{cpu.get('redis', 0.0):5.1f}  envoy {cpu['envoy']:5.1f} µs/ev  "
                    f"load avg {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    finally:
        peers.stop(upstream)


if __name__ == "__main__":
    main()
