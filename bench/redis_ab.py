"""The Redis store's cost per event: `relay_inline` (memory store) against
`relay_inline_redis_1` (one node on its own redis-server), at each offered load, in
alternating pairs, so a noisy shared machine hits both sides alike. Same harness pieces as
`stream-relay bench`.

    python bench/redis_ab.py [--rates 1000,10000] [--pairs 2] [--seconds 10]

Per run: delivered ev/s, p50/p99, CPU per delivered event of the relay node, redis-server and
Envoy (from /proc over the measured window), and for Redis what proves the path was taken:
every event reached Redis (stream entries stored vs events delivered) and how many events one
replication script call carried (Redis's own command statistics).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis
from stream_relay_bench import peers
from stream_relay_bench.runner import Load, measure
from stream_relay_bench.scenarios import Target, running

from extproc.ops.supervisor import Stack

SCENARIOS = ("relay_inline", "relay_inline_redis_1")
SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="1000,10000", help="offered events/s, comma-separated")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="redis-ab-"))
    upstream = Stack(workdir / "upstream")
    upstream.workdir.mkdir()
    port = peers.start_upstream(upstream)
    rows: list[dict[str, Any]] = []
    try:
        for pair in range(args.pairs):
            for rate in rates:
                load = Load(events_per_s=rate, duration_s=args.seconds, warmup_s=3)
                for name in SCENARIOS:
                    pid = upstream.children[0].process.pid
                    with running(name, port, pid, workdir / f"{name}-{rate:.0f}-{pair}") as target:
                        row = run(name, rate, target, load)
                    rows.append(row)
                    print(line(row), flush=True)
    finally:
        peers.stop(upstream)
    print()
    print(summary(rows, rates))


def run(name: str, rate: float, target: Target, load: Load) -> dict[str, Any]:
    before = redis_counts(target)
    point = measure(target, load)
    after = redis_counts(target)
    row: dict[str, Any] = {"name": name, "rate": rate, **point, "load_avg": os.getloadavg()[0]}
    # Every event must have gone through the relay (tagged) for its CPU to mean anything: a
    # run where Envoy failed open (overloaded machine) is shown but left out of the summary.
    row["valid"] = not point["errors"] and point["tagged_fraction"] >= 1.0
    if target.redis_url:
        stored = after["entries"] - before["entries"]
        calls = after["script_calls"] - before["script_calls"]
        delivered = point["events_per_s"] * load.duration_s  # the measured window only
        if stored < 0.95 * delivered:  # warm-up events come on top: must be at least this
            raise RuntimeError(f"{name}: {stored} events in Redis for {delivered:.0f} delivered")
        row["stored_events"] = stored
        row["events_per_script_call"] = stored / max(calls, 1)
        row["script_us_per_event"] = (after["script_us"] - before["script_us"]) / max(stored, 1)
    return row


def redis_counts(target: Target) -> dict[str, float]:
    """Stream entries held (all sessions, end markers included) and replication script calls
    so far, once no node has anything left to copy."""
    if not target.redis_url:
        return {}
    deadline = time.monotonic() + 60
    while any(_pending(url) for url in target.metrics_urls):
        if time.monotonic() > deadline:
            raise RuntimeError("replication to Redis still pending after 60 s")
        time.sleep(0.1)  # polling the node's metrics, bounded by the deadline
    client = redis.Redis.from_url(target.redis_url)
    try:
        entries = 0
        pipe = client.pipeline(transaction=False)
        for key in client.scan_iter(match="*:events", count=1000):
            pipe.xlen(key)
        entries = sum(pipe.execute())
        stats = client.info("commandstats")
    finally:
        client.close()
    scripts = [stats[c] for c in SCRIPT_COMMANDS if c in stats]
    return {
        "entries": float(entries),
        "script_calls": float(sum(s["calls"] for s in scripts)),
        "script_us": float(sum(s["usec"] for s in scripts)),
    }


def _pending(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    for row in text.splitlines():
        if row.startswith("relay_replication_pending_sessions "):
            return float(row.split()[-1])
    return 0.0


def line(row: dict[str, Any]) -> str:
    cpu, lat = row["cpu_us_per_event"], row["latency_ms"]
    redis_part = ""
    if "stored_events" in row:
        redis_part = (
            f"  redis {cpu.get('redis', 0.0):5.1f} µs/ev"
            f" (scripts {row['script_us_per_event']:4.1f})"
            f"  {row['events_per_script_call']:6.1f} ev/call"
        )
    invalid = (
        ""
        if row["valid"]
        else (f"  INVALID: tagged {row['tagged_fraction']:.3f}, {row['errors']} errors")
    )
    return (
        f"{row['name']:22} {row['rate']:6.0f} offered {row['events_per_s']:7.0f} ev/s  "
        f"p50 {lat['p50']:6.2f} p99 {lat['p99']:7.2f} ms  relay {cpu['relay']:6.1f}  "
        f"envoy {cpu['envoy']:5.1f} µs/ev{redis_part}  load {row['load_avg']:.2f}{invalid}"
    )


def summary(rows: list[dict[str, Any]], rates: list[float]) -> str:
    """A markdown table: per offered load, each run's relay CPU per event memory -> Redis,
    redis-server's, and the medians."""
    out = [
        "| offered ev/s | relay µs/ev memory | relay µs/ev Redis | ratio (medians) | "
        "redis-server µs/ev | of which scripts | events per script call | p99 ms memory → Redis |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate in rates:
        mem = [r for r in rows if r["rate"] == rate and r["name"] == SCENARIOS[0] and r["valid"]]
        red = [r for r in rows if r["rate"] == rate and r["name"] == SCENARIOS[1] and r["valid"]]
        if not mem or not red:
            out.append(f"| {rate:,.0f} | no valid pair |")
            continue

        def col(rs: list[dict[str, Any]], get: Any) -> str:
            return " / ".join(f"{get(r):.1f}" for r in rs)

        ratio = statistics.median(r["cpu_us_per_event"]["relay"] for r in red) / statistics.median(
            r["cpu_us_per_event"]["relay"] for r in mem
        )
        out.append(
            f"| {rate:,.0f} | {col(mem, lambda r: r['cpu_us_per_event']['relay'])} | "
            f"{col(red, lambda r: r['cpu_us_per_event']['relay'])} | {ratio:.2f}x | "
            f"{col(red, lambda r: r['cpu_us_per_event'].get('redis', 0.0))} | "
            f"{col(red, lambda r: r['script_us_per_event'])} | "
            f"{col(red, lambda r: r['events_per_script_call'])} | "
            f"{col(mem, lambda r: r['latency_ms']['p99'])} → "
            f"{col(red, lambda r: r['latency_ms']['p99'])} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
