"""`stream-relay bench`: runs every scenario with the same load and collects one report.

Order: one demo upstream for all; per scenario start it, check it once, run the main load,
then the saturation sweep (rising offered load until p99 passes the bound or delivery falls
behind), then (relay scenarios) memory per open session, and on the detached stack multicast,
resume and finished-session memory. Scale-out (`--scenarios scaleout`): reader fan-out on
every Redis stack and on the memory-store `relay_inline` it is compared with, and Redis memory
per finished session. The load generator is a separate process (`loadgen.py`); this process
only samples /proc around its measured window.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from extproc.ops.supervisor import Stack, envoy_binary
from stream_relay_bench import peers, procstat
from stream_relay_bench.report import redis_cost
from stream_relay_bench.scenarios import (
    DEFAULT_SCENARIOS,
    GROUPS,
    NEEDS,
    REDIS_NODES,
    RELAY_SCENARIOS,
    SCENARIOS,
    Target,
    running,
)

Json = dict[str, Any]
MB = 1024 * 1024
P99_BOUND_MS = 25.0  # saturation: the highest load whose p99 stays within this ...
MIN_DELIVERED = 0.95  # ... and that delivers this share of what the upstream offered


@dataclass(frozen=True, kw_only=True)
class Load:
    """LLM-like traffic: streams at 20-100 ev/s each, a TTFT before the first event, answers
    of 100-400 tokens back to back; model names of varying length make events ~220-300 B."""

    events_per_s: float  # offered: the streams' rates add up to this
    duration_s: float
    warmup_s: float
    rate: tuple[float, float] = (20.0, 100.0)
    ttft_ms: tuple[float, float] = (50.0, 500.0)
    tokens: tuple[int, int] = (100, 400)
    seed: int = 7

    def streams(self) -> list[Json]:
        rng, out, total = random.Random(self.seed), [], 0.0
        while total < self.events_per_s:
            rate = round(rng.uniform(*self.rate))
            model = "m" + "x" * rng.randint(2, 60)
            out.append({"rate": rate, "model": model, "seed": rng.getrandbits(32)})
            total += rate
        for i, stream in enumerate(out):  # starts spread over a second: no lockstep ticks
            stream["delay_s"] = i / len(out)
        return out


@dataclass(frozen=True, kw_only=True)
class Plan:
    main: Load
    sweep: tuple[float, ...]  # offered events/s levels
    sweep_duration_s: float
    sweep_warmup_s: float
    readers: tuple[int, ...]
    multicast_rate: float
    multicast_tokens: int
    resume_sessions: int
    hold_sessions: int
    finished_sessions: int


FULL = Plan(
    main=Load(events_per_s=10_000, duration_s=10, warmup_s=3),
    sweep=(2_500, 5_000, 10_000, 15_000, 20_000, 25_000, 30_000),
    sweep_duration_s=5,
    sweep_warmup_s=2,
    readers=(1, 10, 100),
    multicast_rate=100,
    multicast_tokens=500,
    resume_sessions=100,
    hold_sessions=800,
    finished_sessions=1000,
)
QUICK = Plan(
    main=Load(events_per_s=2_000, duration_s=2, warmup_s=1),
    sweep=(),
    sweep_duration_s=0,
    sweep_warmup_s=0,
    readers=(1, 10, 100),
    multicast_rate=100,
    multicast_tokens=50,
    resume_sessions=10,
    hold_sessions=100,
    finished_sessions=100,
)


def machine() -> Json:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    envoy = subprocess.run(
        [envoy_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    version = re.search(r"version: \S+?/([\d.]+)", envoy)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu_model": model.group(1) if model else "unknown",
        "load_avg_start": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "envoy": version.group(1) if version else "?",
        "commit": commit or "?",
    }


# ---------------------------------------------------------------------------------------------
# One load generator run


def run_loadgen(
    job: Json,
    pids: dict[str, tuple[int, ...]],
    *,
    timeout_s: float,
    on_open: Callable[[], None] | None = None,
) -> tuple[Json, dict[str, procstat.Sample], dict[str, procstat.Sample]]:
    """Run one loadgen job; returns its result and /proc samples at its window's start and end
    (per role, the load generator included)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_relay_bench.loadgen"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(timeout_s, proc.kill)  # a hung run must not hang the bench
    watchdog.start()
    roles = {**pids, "loadgen": (proc.pid,)}
    before: dict[str, procstat.Sample] = {}
    after: dict[str, procstat.Sample] = {}
    result: Json | None = None
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:
            message = json.loads(line)
            phase = message.get("phase")
            if phase == "start":
                before = procstat.sample(roles)
            elif phase == "end":
                after = procstat.sample(roles)
            elif phase == "open":
                if on_open is not None:
                    on_open()
                proc.stdin.write("\n")
                proc.stdin.flush()
            elif "result" in message:
                result = message["result"]
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if result is None:
        raise RuntimeError(f"load generator failed ({job['kind']}, exit {proc.returncode})")
    return result, before, after


def per_role(
    before: dict[str, procstat.Sample], after: dict[str, procstat.Sample], events: int
) -> tuple[Json, Json]:
    """CPU µs per delivered event and RSS MB at the end, per role (all of a role's processes)."""
    cpu: dict[str, float] = {}
    rss: dict[str, float] = {}
    for role, end in after.items():
        start = before.get(role, end)
        cpu[role] = (end.cpu_s - start.cpu_s) * 1e6 / max(events, 1)
        rss[role] = end.rss_bytes / MB
    return cpu, rss


def streams_job(target: Target, load: Load) -> Json:
    return {
        "kind": "streams",
        "host": "127.0.0.1",
        "port": target.port,
        "path": "/v1/chat/completions",
        "streams": load.streams(),
        "warmup_s": load.warmup_s,
        "duration_s": load.duration_s,
        "ttft_ms": list(load.ttft_ms),
        "tokens": list(load.tokens),
    }


def measure(target: Target, load: Load) -> Json:
    job = streams_job(target, load)
    streams = job["streams"]
    result, before, after = run_loadgen(
        job, target.pids, timeout_s=load.warmup_s + load.duration_s + 60
    )
    cpu, rss = per_role(before, after, result["events"])
    wall = result["wall_s"]
    loadgen = before.get("loadgen"), after.get("loadgen")
    core = (loadgen[1].cpu_s - loadgen[0].cpu_s) / wall if loadgen[0] and loadgen[1] else 0.0
    return {
        "offered_events_per_s": result["offered_events_per_s"],
        "events_per_s": result["events_per_s"],
        "delivered_ratio": result["events"] / max(result["expected"], 1),
        "latency_ms": result["latency_ms"],
        "ttft_ms": result["ttft_ms"],
        "cpu_us_per_event": cpu,
        "rss_mb": rss,
        "loadgen_core": core,
        "streams": len(streams),
        "requests": result["requests"],
        "errors": result["errors"],
        "error_samples": result["error_samples"],
        "event_bytes_mean": result["event_bytes_mean"],
        "tagged_fraction": result["tagged"] / max(result["events_all"], 1),
    }


def sustained(point: Json) -> bool:
    return bool(
        point["latency_ms"]["p99"] <= P99_BOUND_MS
        and point["delivered_ratio"] >= MIN_DELIVERED
        and not point["errors"]
    )


def sweep(target: Target, plan: Plan, main: Json) -> Json:
    """Rising offered load until a level is not sustained; the main run counts as a level."""
    levels = []
    for level in plan.sweep:
        load = Load(
            events_per_s=level, duration_s=plan.sweep_duration_s, warmup_s=plan.sweep_warmup_s
        )
        point = measure(target, load)
        levels.append(
            {
                "offered_events_per_s": point["offered_events_per_s"],
                "events_per_s": point["events_per_s"],
                "p99_ms": point["latency_ms"]["p99"],
                "delivered_ratio": point["delivered_ratio"],
                "sustained": sustained(point),
                "loadgen_core": point["loadgen_core"],
            }
        )
        print(
            f"bench:   sweep {level:>6.0f} ev/s offered: {point['events_per_s']:7.0f} delivered,"
            f" p99 {point['latency_ms']['p99']:7.2f} ms",
            file=sys.stderr,
        )
        if not sustained(point):
            break
    if not plan.sweep:
        levels.append(
            {
                "offered_events_per_s": main["offered_events_per_s"],
                "events_per_s": main["events_per_s"],
                "p99_ms": main["latency_ms"]["p99"],
                "delivered_ratio": main["delivered_ratio"],
                "sustained": sustained(main),
                "loadgen_core": main["loadgen_core"],
            }
        )
    ok = [lv["events_per_s"] for lv in levels if lv["sustained"]]
    return {
        "events_per_s": max(ok) if ok else 0.0,
        # every level tested was sustained: the true saturation point is higher
        "lower_bound": all(lv["sustained"] for lv in levels),
        "p99_bound_ms": P99_BOUND_MS,
        "min_delivered_ratio": MIN_DELIVERED,
        "levels": levels,
    }


# ---------------------------------------------------------------------------------------------
# Relay-only measurements


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


def finished_sessions(target: Target, sessions: int) -> Json:
    relay = target.pids["relay"][0]  # single-node scenarios only
    rss0, store0 = procstat.rss_bytes(relay), _metric(target.metrics_url, "relay_store_bytes")
    job = {
        "kind": "finished",
        "host": "127.0.0.1",
        "port": target.port,
        "sessions": sessions,
        "tokens": 20,
    }
    result, _, _ = run_loadgen(job, {}, timeout_s=300)
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
        job = {
            "kind": "finished",
            "host": "127.0.0.1",
            "port": target.port,
            "sessions": sessions,
            "tokens": 20,
        }
        result, _, _ = run_loadgen(job, {}, timeout_s=300)
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


# ---------------------------------------------------------------------------------------------


def check(target: Target) -> None:
    """One short stream before measuring: events arrive, tagged exactly on relay scenarios."""
    load = Load(events_per_s=20, duration_s=0.5, warmup_s=0.0, ttft_ms=(0, 0), tokens=(5, 5))
    point = measure(target, load)
    if point["errors"] or point["events_per_s"] <= 0:
        raise RuntimeError(f"sanity check failed: {point['error_samples'] or 'no events'}")
    if (point["tagged_fraction"] >= 1.0) != target.tagged:
        raise RuntimeError(f"sanity check: tagged fraction {point['tagged_fraction']:.2f}")


def run_scenario(
    name: str,
    upstream: Stack,
    upstream_port: int,
    plan: Plan,
    workdir: Path,
    extras: Json,
    *,
    scaleout: bool = False,
) -> tuple[Json, Json | None]:
    """One scenario's measurements; `scaleout` adds fan-out (and, on Redis, store memory)
    under extras["scaleout"]."""
    upstream_pid = upstream.children[0].process.pid
    with running(name, upstream_port, upstream_pid, workdir / name) as target:
        check(target)
        main = measure(target, plan.main)
        print(
            f"bench: {name}: {main['events_per_s']:.0f} ev/s, p50 {main['latency_ms']['p50']:.2f}"
            f" / p99 {main['latency_ms']['p99']:.2f} ms",
            file=sys.stderr,
        )
        saturation = sweep(target, plan, main)
        if name in RELAY_SCENARIOS:
            memory = extras.setdefault("memory", {})
            memory[f"open_session_{name}"] = open_session_bytes(target, plan.hold_sessions)
            if name == "relay_detached":
                extras["multicast"] = multicast(target, plan)
                extras["resume"] = resume(target, plan)
                memory["finished_sessions"] = finished_sessions(target, plan.finished_sessions)
        if scaleout and (name in REDIS_NODES or name == "relay_inline"):
            row: Json = {
                "nodes": REDIS_NODES.get(name, 1),
                "store": "redis" if name in REDIS_NODES else "memory",
                "multicast": multicast(target, plan),
            }
            if name in REDIS_NODES:
                row["redis_memory"] = redis_memory(target, plan.finished_sessions)
            extras.setdefault("scaleout", {}).setdefault("scenarios", {})[name] = row
    return main, saturation


def run(plan: Plan, scenarios: tuple[str, ...], workdir: Path, quick: bool) -> Json:
    started = time.time()
    report: Json = {
        "schema": "stream-relay-bench/1",
        "quick": quick,
        "machine": machine(),
        "load": {**asdict(plan.main), "streams": len(plan.main.streams())},
        "scenarios": {},
        "saturation": {},
    }
    needed = {NEEDS[name] for name in scenarios if name in NEEDS}
    unavailable = {binary: peers.ensure_installed(binary) for binary in needed}
    scaleout = any(name in REDIS_NODES for name in scenarios)
    upstream = Stack(workdir / "upstream")
    upstream.workdir.mkdir(parents=True, exist_ok=True)
    try:
        upstream_port = peers.start_upstream(upstream)
        extras: Json = {}
        for name in scenarios:
            reason = unavailable.get(NEEDS.get(name, ""), "")
            if reason:
                report["scenarios"][name] = {"status": "unavailable", "reason": reason}
                continue
            print(f"bench: {name} ...", file=sys.stderr)
            try:
                main, saturation = run_scenario(
                    name, upstream, upstream_port, plan, workdir, extras, scaleout=scaleout
                )
            except Exception as exc:  # one broken peer must not lose the other rows
                report["scenarios"][name] = {"status": "failed", "reason": f"{exc}"[:500]}
                print(f"bench: {name} failed: {exc}", file=sys.stderr)
                continue
            report["scenarios"][name] = {"status": "ok", **main}
            report["saturation"][name] = saturation
        report.update(extras)
        if "scaleout" in report:
            report["scaleout"]["redis_cost"] = redis_cost(report)
    finally:
        peers.stop(upstream)
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    report["duration_s"] = time.time() - started
    return report


__all__ = ["DEFAULT_SCENARIOS", "FULL", "GROUPS", "QUICK", "SCENARIOS", "Load", "Plan", "run"]
