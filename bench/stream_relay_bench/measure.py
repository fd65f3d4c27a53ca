"""One load generator run against a scenario, and what is measured from it: the main load,
the saturation sweep, the short check before measuring."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable

from stream_relay_bench import procstat, proof
from stream_relay_bench.plan import MIN_DELIVERED, P99_BOUND_MS, Json, Load, Plan
from stream_relay_bench.scenarios import Target

MB = 1024 * 1024


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
    """One paced run; its `proof` says whether the traffic went through the target's path."""
    job = streams_job(target, load)
    streams = job["streams"]
    counted = proof.snapshot(target)  # outside the measured window: before the loadgen starts
    result, before, after = run_loadgen(
        job, target.pids, timeout_s=load.warmup_s + load.duration_s + 60
    )
    evidence = proof.evidence(target, counted, proof.snapshot(target), result)
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
        "tagged_fraction": evidence["tagged_fraction"],
        "proof": evidence,
    }


def sustained(point: Json) -> bool:
    """Within the latency bound, delivered, and through the scenario's path (a level at which
    Envoy went around the processor measured something else)."""
    return bool(
        point["latency_ms"]["p99"] <= P99_BOUND_MS
        and point["delivered_ratio"] >= MIN_DELIVERED
        and not point["errors"]
        and not point["proof"]["problems"]
    )


def _level(point: Json) -> Json:
    return {
        "offered_events_per_s": point["offered_events_per_s"],
        "events_per_s": point["events_per_s"],
        "p99_ms": point["latency_ms"]["p99"],
        "delivered_ratio": point["delivered_ratio"],
        "sustained": sustained(point),
        "loadgen_core": point["loadgen_core"],
        "problems": point["proof"]["problems"],
    }


def sweep(target: Target, plan: Plan, main: Json) -> Json:
    """Rising offered load until a level is not sustained; the main run counts as a level."""
    levels = []
    for level in plan.sweep:
        load = Load(
            events_per_s=level, duration_s=plan.sweep_duration_s, warmup_s=plan.sweep_warmup_s
        )
        point = measure(target, load)
        levels.append(_level(point))
        print(
            f"bench:   sweep {level:>6.0f} ev/s offered: {point['events_per_s']:7.0f} delivered,"
            f" p99 {point['latency_ms']['p99']:7.2f} ms"
            + "".join(f"; {problem}" for problem in point["proof"]["problems"]),
            file=sys.stderr,
        )
        if not sustained(point):
            break
    if not plan.sweep:
        levels.append(_level(main))
    ok = [lv["events_per_s"] for lv in levels if lv["sustained"]]
    return {
        "events_per_s": max(ok) if ok else 0.0,
        # every level tested was sustained: the true saturation point is higher
        "lower_bound": all(lv["sustained"] for lv in levels),
        "p99_bound_ms": P99_BOUND_MS,
        "min_delivered_ratio": MIN_DELIVERED,
        "levels": levels,
    }


def check(name: str, target: Target) -> Json:
    """One short stream before measuring: events arrive, through the scenario's path (else
    PathNotProcessed says why)."""
    load = Load(events_per_s=20, duration_s=0.5, warmup_s=0.0, ttft_ms=(0, 0), tokens=(5, 5))
    point = measure(target, load)
    if point["errors"] or point["events_per_s"] <= 0:
        raise RuntimeError(f"sanity check failed: {point['error_samples'] or 'no events'}")
    proof.verify(name, point)
    return point
