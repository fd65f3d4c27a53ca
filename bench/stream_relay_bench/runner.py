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

import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from extproc.ops.supervisor import Stack, envoy_binary
from stream_relay_bench import peers, proof
from stream_relay_bench.measure import check, measure, sweep
from stream_relay_bench.plan import FULL, QUICK, Json, Load, Plan
from stream_relay_bench.proof import PathNotProcessed
from stream_relay_bench.relay_jobs import (
    finished_sessions,
    multicast,
    open_session_bytes,
    redis_memory,
    resume,
)
from stream_relay_bench.report import redis_cost
from stream_relay_bench.scenarios import (
    DEFAULT_SCENARIOS,
    GROUPS,
    NEEDS,
    REDIS_NODES,
    RELAY_SCENARIOS,
    SCENARIOS,
    running,
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
        check(name, target)
        main = measure(target, plan.main)
        proof.verify(name, main)  # the numbers below are this path's, or none are reported
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
            except PathNotProcessed as exc:  # measured, but not what the name says: no numbers
                report["scenarios"][name] = {"status": "invalid", "reason": f"{exc}"[:1000]}
                print(f"bench: {exc}", file=sys.stderr)
                continue
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


__all__ = [
    "DEFAULT_SCENARIOS",
    "FULL",
    "GROUPS",
    "QUICK",
    "SCENARIOS",
    "Load",
    "Plan",
    "measure",
    "run",
]
