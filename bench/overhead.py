"""What the relay adds over plain Envoy: delivered events/s, per-event latency, CPU per event.

One stack (demo upstream with --timestamps, relay node, one real Envoy), two routes in that
same Envoy: `/v1/chat/completions` through the relay's ext_proc, and `/plain/v1/...` with
ext_proc disabled on the route. Each route gets the same load: N concurrent streams, each
paced at R events/s by the upstream (`x-demo-rate`) for D seconds. Latency of one event =
client receipt time - the upstream's `x_demo_ts` in that event (same host, same clock).

    python bench/overhead.py [--streams 50 --rate 100 --duration 10] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import aiohttp

from extproc import envoy_config, supervisor
from extproc.demo_upstream import MAX_TOKENS_CAP
from extproc.supervisor import Stack, StackOptions, start_stack

ROUTES = {"plain": "/plain/v1/chat/completions", "relay": "/v1/chat/completions"}
PROCESSES = ("envoy", "relay", "demo-upstream")  # Stack child names; plus "loadgen" (us)
Row = dict[str, Any]
REQUEST = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "stream": True}
PLAIN_ROUTE = """\
- name: bench_plain
  match: { prefix: /plain/ }
  route: { cluster: llm, prefix_rewrite: /, timeout: 0s }
  typed_per_filter_config:
    envoy.filters.http.ext_proc:
      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
      disabled: true
"""


def with_plain_route(rendered: str) -> str:
    """Insert the `bench_plain` route first in the public listener's route list."""
    match = re.search(r"name: relay_routes\n(?:.*\n)*?( *)routes:\n( *)- ", rendered)
    if match is None:
        raise RuntimeError("bench: no route list under relay_routes in the rendered Envoy config")
    block = "".join(match.group(2) + line + "\n" for line in PLAIN_ROUTE.splitlines())
    return rendered[: match.start(2)] + block + rendered[match.start(2) :]


def install_plain_route() -> None:
    # start_stack() writes envoy.yaml with the `render` that extproc.supervisor imported from
    # extproc.envoy_config; rebinding that name adds our route without touching the repo.
    def render(*args: Any, **kwargs: Any) -> str:
        return with_plain_route(envoy_config.render(*args, **kwargs))

    supervisor.render = render  # type: ignore[attr-defined]


def start_upstream(rate: float, workdir: Path) -> Stack:
    """The demo upstream with --timestamps, as a one-child Stack (log file, stop())."""
    stack = Stack(workdir)
    ports = stack.workdir / "upstream.ports"
    argv = ["demo-upstream", "--port", "0", "--rate", str(rate), "--timestamps", "--ports-file"]
    child = stack.spawn("demo-upstream", [sys.executable, "-m", "extproc.cli", *argv, str(ports)])
    deadline = time.monotonic() + 30
    while not ports.is_file():  # written atomically once it listens
        if child.process.poll() is not None or time.monotonic() > deadline:
            stack.stop()
            raise RuntimeError(f"bench: the demo upstream did not start:\n{child.tail()}")
        time.sleep(0.05)
    stack.upstream_url = f"http://127.0.0.1:{json.loads(ports.read_text())['http_port']}"
    return stack


def tree_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process and its live descendants, from /proc."""
    parent, cpu = {}, {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:  # fields after "(comm)": state ppid ... utime(12th) stime(13th), in clock ticks
            fields = Path("/proc", name, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        parent[int(name)], cpu[int(name)] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - tree
        tree |= frontier
    return sum(cpu.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {**{n: tree_cpu_s(p) for n, p in pids.items()}, "loadgen": own.ru_utime + own.ru_stime}


@dataclass
class Phase:
    route: str
    events: int = 0
    tagged: int = 0  # events that carried an SSE `id:` line
    requests: int = 0
    sessions: int = 0  # responses with an x-relay-session header
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def summary(self) -> Row:
        lat, us = sorted(self.latencies_ms), 1e6 / max(self.events, 1)
        pct = {f"{n}_ms": lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan
               for n, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}  # fmt: skip
        return {
            "route": self.route, "events": self.events, "tagged": self.tagged,
            "requests": self.requests, "sessions": self.sessions, "errors": len(self.errors),
            "wall_s": self.wall_s, "events_per_s": self.events / self.wall_s, **pct,
            "cpu_s": self.cpu_s, "cpu_us_per_event": {k: v * us for k, v in self.cpu_s.items()},
            "loadgen_core": self.cpu_s.get("loadgen", 0.0) / self.wall_s,
        }  # fmt: skip


async def one_request(
    http: aiohttp.ClientSession, url: str, rate: float, tokens: int, phase: Phase
) -> None:
    body, headers = {**REQUEST, "max_tokens": tokens}, {"x-demo-rate": str(rate)}
    async with http.post(url, json=body, headers=headers) as resp:
        phase.requests += 1
        if resp.status != 200:
            phase.errors.append(f"{url}: HTTP {resp.status}")
            return
        phase.sessions += "x-relay-session" in resp.headers
        buf, lat = b"", phase.latencies_ms
        async for chunk in resp.content.iter_any():
            now = time.time()
            *events, buf = (buf + chunk).split(b"\n\n")
            for event in events:  # minimal SSE: only `data:` and `id:` lines matter here
                data = next((x for x in event.split(b"\n") if x.startswith(b"data:")), b"")
                if data[5:].strip() in (b"", b"[DONE]"):
                    continue
                phase.events += 1
                phase.tagged += event.startswith(b"id:") or b"\nid:" in event
                lat.append((now - json.loads(data[5:])["x_demo_ts"]) * 1000)


async def stream_worker(
    http: aiohttp.ClientSession, url: str, args: argparse.Namespace, i: int, end: float, ph: Phase
) -> None:
    """Client i: back-to-back requests (role chunk, tokens, finish chunk) ending by `end`."""
    await asyncio.sleep(i / args.streams / args.rate)  # spread over one interval: no lockstep
    while (tokens := min(args.tokens, math.ceil((end - time.monotonic()) * args.rate) - 2)) > 0:
        try:
            await one_request(http, url, args.rate, tokens, ph)
        except (TimeoutError, aiohttp.ClientError) as exc:
            ph.errors.append(f"{url}: {exc!r}")


async def run_load(
    base_url: str, route: str, args: argparse.Namespace, seconds: float, pids: dict[str, int]
) -> Phase:
    phase, url = Phase(route), base_url + ROUTES[route]
    connector = aiohttp.TCPConnector(limit=0)  # one connection per stream, like real clients
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        before, t0 = cpu_snapshot(pids), time.monotonic()
        await asyncio.gather(*(stream_worker(http, url, args, i, t0 + seconds, phase)
                               for i in range(args.streams)))  # fmt: skip
        phase.wall_s, after = time.monotonic() - t0, cpu_snapshot(pids)
    phase.cpu_s = {name: after[name] - before[name] for name in after}
    return phase


async def check_routes(base_url: str) -> None:
    """Relay route: x-relay-session and an `id:` on every event; plain route: neither."""
    for route, want in (("plain", 0), ("relay", 1)):
        phase = Phase(route)
        async with aiohttp.ClientSession() as http:
            await one_request(http, base_url + ROUTES[route], 0, 3, phase)  # 5 events, no pacing
        if phase.errors or (phase.events, phase.sessions, phase.tagged) != (5, want, 5 * want):
            raise RuntimeError(f"bench: route {route} misbehaves: {phase}")


async def measure(base_url: str, args: argparse.Namespace, pids: dict[str, int]) -> list[Row]:
    await check_routes(base_url)
    rows = []
    for route in ROUTES:
        await run_load(base_url, route, args, args.warmup, pids)  # warm-up, not recorded
        phase = await run_load(base_url, route, args, args.duration, pids)
        for error in sorted(set(phase.errors))[:5]:
            print(f"  {route}: {error}", file=sys.stderr)
        rows.append(phase.summary())
    return rows


def machine() -> Row:
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    cmd = [supervisor.envoy_binary(), "--version"]
    envoy = re.search(r"version: \S+?/([\d.]+)", subprocess.run(cmd, capture_output=True,
                      text=True, check=False).stdout)  # fmt: skip
    return {"cores": os.cpu_count(), "cpu": model.group(1) if model else "unknown",
            "python": sys.version.split()[0], "envoy": envoy[1] if envoy else "?"}  # fmt: skip


def report(args: argparse.Namespace, host: Row, rows: list[Row]) -> str:
    procs = (*PROCESSES, "loadgen")
    out = [
        f"machine: {host['cores']} cores, {host['cpu']}; Python {host['python']}, "
        f"Envoy {host['envoy']}",
        f"load: {args.streams} streams x {args.rate:g} ev/s = {args.streams * args.rate:g} "
        f"ev/s offered, {args.duration:g} s per route (after {args.warmup:g} s warm-up); "
        f"relay write path: {args.write_path}",
        "",
        "| route | ev/s | p50 ms | p99 ms | max ms | tagged | errors | "
        + " | ".join(f"{p} µs/ev" for p in procs) + " | loadgen core |",
        "|---" * (8 + len(procs)) + "|",
    ]  # fmt: skip
    for r in rows:
        cpu = " | ".join(f"{r['cpu_us_per_event'][p]:.1f}" for p in procs)
        out.append(
            f"| {r['route']} | {r['events_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['max_ms']:.2f} | {r['tagged']}/{r['events']} | {r['errors']} | {cpu} | "
            f"{r['loadgen_core']:.0%} |"
        )
    plain, relay = rows
    cpu = sum(relay["cpu_us_per_event"][p] - plain["cpu_us_per_event"][p] for p in PROCESSES)
    out.append(f"\nadded by the relay: latency p50 {relay['p50_ms'] - plain['p50_ms']:+.2f} ms, "
               f"p99 {relay['p99_ms'] - plain['p99_ms']:+.2f} ms; CPU {cpu:+.1f} µs/event "
               "(envoy + relay + upstream)")  # fmt: skip
    for r in rows:
        if r["loadgen_core"] > 0.8:
            out.append(f"WARNING: the load generator used {r['loadgen_core']:.0%} of a core on "
                       f"{r['route']}: it may be the bottleneck, not the stack")  # fmt: skip
        if r["errors"]:
            out.append(f"WARNING: {r['errors']} failed requests on {r['route']}")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=50, help="concurrent streams (50)")
    parser.add_argument("--rate", type=float, default=100.0, help="events/s per stream (100)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per route (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument("--tokens", type=int, default=MAX_TOKENS_CAP, help="max per request")
    parser.add_argument("--write-path", choices=envoy_config.WRITE_PATHS, default="detached")
    parser.add_argument("--quick", action="store_true", help="20 streams, 4 s, 1 s warm-up")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.duration, args.warmup = 20, 4.0, 1.0
    if args.streams < 1 or args.rate <= 0 or args.duration <= 0:
        parser.error("--streams, --rate and --duration must be positive")
    args.tokens = max(1, min(args.tokens, MAX_TOKENS_CAP))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    install_plain_route()
    stacks: list[Stack] = []  # stopped in reverse start order
    workdir, ok = Path(mkdtemp(prefix="bench-overhead-")), False  # logs, envoy.yaml
    try:
        stacks.append(start_upstream(args.rate, workdir))
        options = StackOptions(upstream=stacks[0].upstream_url, port=0, admin_port=0)
        options.write_path = args.write_path
        stacks.append(start_stack(options, workdir))
        pids = {c.name: c.process.pid for s in stacks for c in s.children}
        rows = asyncio.run(measure(stacks[1].base_url, args, pids))
        host = machine()
        print(report(args, host, rows))
        if args.json:
            params = {k: v for k, v in vars(args).items() if k != "json"}
            result = {"machine": host, "params": params, "routes": rows}
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        ok = True
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for stack in reversed(stacks):
            stack.stop()
        if not ok:
            print(f"bench: logs and envoy.yaml kept in {workdir}", file=sys.stderr)
    shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
