"""Measurements only relay stacks have: memory per open and finished session, Redis memory,
reader fan-out (multicast) and resume."""

from __future__ import annotations

import re
import time
import urllib.request

import redis

from stream_relay_bench import procstat
from stream_relay_bench.measure import MB, per_role, run_loadgen
from stream_relay_bench.plan import Json, Plan
from stream_relay_bench.scenarios import Target


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def open_session_bytes(target: Target, sessions: int) -> Json:
    """Relay RSS growth per open session: `sessions` responses whose first event is a minute
    away (headers sent, so each has a session and, inline, an ext_proc stream)."""
    relay = target.pids["relay"][0]  # single-node scenarios only
    base = {"kind": "hold", "host": "127.0.0.1", "port": target.port, "ttft_ms": 60_000}
    seen: list[int] = []
    rss0 = procstat.rss_bytes(relay)
    run_loadgen(
        {**base, "sessions": sessions},
        {},
        timeout_s=120,
        on_open=lambda: seen.append(procstat.rss_bytes(relay)),
    )
    delta = (seen[0] - rss0) if seen else 0
    return {"sessions": sessions, "rss_delta_mb": delta / MB, "bytes_per_session": delta / sessions}


def _finished_job(target: Target, sessions: int) -> Json:
    """The load generator's job: `sessions` answers of 22 events (role, 20 tokens, finish),
    each read to its end."""
    return {
        "kind": "finished",
        "host": "127.0.0.1",
        "port": target.port,
        "sessions": sessions,
        "tokens": 20,
    }


def finished_sessions(target: Target, sessions: int) -> Json:
    relay = target.pids["relay"][0]  # single-node scenarios only
    rss0, store0 = procstat.rss_bytes(relay), _metric(target.metrics_url, "relay_store_bytes")
    result, _, _ = run_loadgen(_finished_job(target, sessions), {}, timeout_s=300)
    rss = procstat.rss_bytes(relay) - rss0
    store = _metric(target.metrics_url, "relay_store_bytes") - store0
    per_k = 1000 / sessions
    return {
        "sessions": sessions,
        "events": result["events"],
        "rss_mb_per_1000": rss * per_k / MB,
        "store_mb_per_1000": store * per_k / MB,
        "payload_mb_per_1000": result["event_bytes"] * per_k / MB,
    }


def _replicated(target: Target, timeout_s: float = 60.0) -> None:
    """Wait until no node has sessions not yet fully copied to Redis."""
    deadline = time.monotonic() + timeout_s
    while any(_metric(url, "relay_replication_pending_sessions") for url in target.metrics_urls):
        if time.monotonic() > deadline:
            raise RuntimeError(f"replication to Redis still pending after {timeout_s:.0f} s")
        time.sleep(0.1)  # polling the nodes' metrics, bounded by the deadline


def redis_memory(target: Target, sessions: int) -> Json:
    """Redis `used_memory` growth over `sessions` finished 22-event sessions, once every node
    has copied them: the shared store's bytes per session and per event."""
    client = redis.Redis.from_url(target.redis_url)
    try:
        _replicated(target)  # what the scenario's earlier runs left must not count
        used0 = int(client.info("memory")["used_memory"])
        result, _, _ = run_loadgen(_finished_job(target, sessions), {}, timeout_s=300)
        _replicated(target)
        used = int(client.info("memory")["used_memory"]) - used0
        keys = int(client.dbsize())
    finally:
        client.close()
    events = max(result["events"], 1)
    return {
        "sessions": sessions,
        "events": result["events"],
        "used_memory_delta_bytes": used,
        "bytes_per_session": used / sessions,
        "bytes_per_event": used / events,
        "payload_bytes_per_event": result["event_bytes"] / events,
        "keys_at_end": keys,
    }


def multicast(target: Target, plan: Plan) -> list[Json]:
    rows = []
    for readers in plan.readers:
        job = {
            "kind": "multicast",
            "host": "127.0.0.1",
            "port": target.port,
            "readers": readers,
            "rate": plan.multicast_rate,
            "tokens": plan.multicast_tokens,
        }
        result, before, after = run_loadgen(job, target.pids, timeout_s=180)
        cpu, rss = per_role(before, after, result["events"])
        rows.append(
            {
                "readers": readers,
                "events_per_s": result["events_per_s"],
                "latency_ms": result["latency_ms"],
                "complete": result["complete"],
                "cpu_us_per_event": cpu,
                "rss_mb": rss,
            }
        )
    return rows


def resume(target: Target, plan: Plan) -> Json:
    job = {
        "kind": "resume",
        "host": "127.0.0.1",
        "port": target.port,
        "sessions": plan.resume_sessions,
    }
    result, _, _ = run_loadgen(job, {}, timeout_s=600)
    return result
