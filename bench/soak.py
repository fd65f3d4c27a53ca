"""A soak of the relay: a stack as `stream-relay up` runs it, cut-and-resume traffic for a long
while, then an idle cool-down; RSS and open fds of every process sampled throughout.

    .venv/bin/python bench/soak.py                      # 10 min of load, 2 min cool-down
    .venv/bin/python bench/soak.py --duration 60 --cooldown 60 --out bench-out/soak-short

Each client loops: one streamed chat completion through Envoy (detached write path by
default); a share of them (--cut) is cut after a random number of events and resumed with
`Last-Event-ID` and the same body. Every answer is checked event by event: ids `S:1, S:2, …`
with none missing, repeated or out of order across the cut, ending with `[DONE]`. The store is
small and the TTL short, so the soak fills the store, evicts, expires and leaves tombstones;
the cool-down outlasts the TTL, so the store empties and RSS should return near its pre-load
level. Writes DIR/soak.json (samples and summary), DIR/soak.md and DIR/soak.png. A benchmark,
not a test: it fails only its own sanity checks (no traffic, or an answer that lost events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from extproc.ops.status import parse, total
from extproc.ops.supervisor import Stack, StackOptions, start_stack

SAMPLE_EVERY_S = 5.0
MIB = 1024 * 1024


@dataclass
class Tally:
    requests: int = 0  # streams opened, resumes included
    completed: int = 0  # answers read to [DONE] (across their cut, if any)
    resumes: int = 0
    events: int = 0
    broken: list[str] = field(default_factory=list)  # answers with a lost, repeated or
    errors: dict[str, int] = field(default_factory=dict)  # reordered event; other failures


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the soak started
    phase: str  # idle-before, load, cool-down
    rss_mb: dict[str, float]
    fds: dict[str, int]
    store_mb: float
    store_sessions: float
    tombstones: float
    events_total: float


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(stack: Stack, started: float, phase: str) -> Sample:
    rss, fds = {}, {}
    for child in stack.children:
        pid = child.process.pid
        try:
            rss[child.name], fds[child.name] = _proc_rss_mb(pid), _proc_fds(pid)
        except OSError:
            rss[child.name], fds[child.name] = 0.0, 0
    with urllib.request.urlopen(stack.metrics_url, timeout=10) as response:
        metrics = parse(response.read().decode())
    return Sample(
        t=round(time.monotonic() - started, 1),
        phase=phase,
        rss_mb=rss,
        fds=fds,
        store_mb=total(metrics, "relay_store_bytes") / MIB,
        store_sessions=total(metrics, "relay_store_sessions"),
        tombstones=total(metrics, "relay_store_tombstones"),
        events_total=total(metrics, "relay_events_total"),
    )


def _seq(event: bytes, session: str) -> int | None:
    """The seq of an event's `id: <session>:<seq>` line (None for the relay's comments)."""
    if not event.startswith(b"id: "):
        return None
    ident = event.split(b"\n", 1)[0][4:].decode()
    prefix, _, seq = ident.rpartition(":")
    if prefix != session:
        raise ValueError(f"id of another session: {ident}")
    return int(seq)


async def _read(
    response: aiohttp.ClientResponse, session: str, expect: int, stop_after: int | None
) -> tuple[int, bool]:
    """Read events, checking seqs run on from `expect`; (next expected seq, saw [DONE])."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *events, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            seq = _seq(event, session)
            if seq is None:
                continue
            if seq != expect:
                raise ValueError(f"expected event {expect}, got {seq}")
            expect += 1
            if event.endswith(b"data: [DONE]"):
                return expect, True
            if stop_after is not None and expect > stop_after:
                return expect, False  # the client "drops" here
    return expect, False


async def one_answer(http: aiohttp.ClientSession, url: str, tally: Tally, cut: float) -> None:
    payload = {
        "model": "soak",
        "stream": True,
        "max_tokens": random.randint(50, 400),
        "messages": [{"role": "user", "content": f"soak {random.random()}"}],
    }
    stop_after = random.randint(1, 40) if random.random() < cut else None
    tally.requests += 1
    async with http.post(url, json=payload) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        session = response.headers["x-relay-session"]
        expect, done = await _read(response, session, 1, stop_after)
    if not done:  # cut: come back with the last id and the same body
        tally.resumes += 1
        tally.requests += 1
        headers = {"Last-Event-ID": f"{session}:{expect - 1}"}
        async with http.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"resume HTTP {response.status}")
            expect, done = await _read(response, session, expect, None)
    if not done:
        raise ValueError("answer ended without [DONE]")
    tally.completed += 1
    tally.events += expect - 1


async def client(url: str, tally: Tally, cut: float, until: float) -> None:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while time.monotonic() < until:
            try:
                await one_answer(http, url, tally, cut)
            except ValueError as exc:
                tally.broken.append(str(exc))
            except (aiohttp.ClientError, OSError, RuntimeError, TimeoutError) as exc:
                name = f"{type(exc).__name__}: {exc}"[:120]
                tally.errors[name] = tally.errors.get(name, 0) + 1


async def drive(stack: Stack, args: argparse.Namespace, started: float) -> tuple[Tally, list]:
    tally = Tally()
    samples: list[Sample] = []

    async def sample_every(phase: str, until: float) -> None:
        while time.monotonic() < until:
            samples.append(await asyncio.to_thread(sample, stack, started, phase))
            await asyncio.sleep(SAMPLE_EVERY_S)

    await sample_every("idle-before", time.monotonic() + args.idle)
    until = time.monotonic() + args.duration
    url = f"{stack.base_url}/v1/chat/completions"
    clients = [client(url, tally, args.cut, until) for _ in range(args.clients)]
    await asyncio.gather(sample_every("load", until), *clients)
    await sample_every("cool-down", time.monotonic() + args.cooldown)
    samples.append(await asyncio.to_thread(sample, stack, started, "cool-down"))
    return tally, samples


def summarize(tally: Tally, samples: list[Sample], args: argparse.Namespace) -> dict:
    def at(phase: str, name: str, which: str = "rss_mb") -> list[float]:
        return [getattr(s, which)[name] for s in samples if s.phase == phase]

    names = list(samples[0].rss_mb)
    load = [s for s in samples if s.phase == "load"]
    events = load[-1].events_total - samples[0].events_total if load else 0
    per_process = {
        name: {
            "rss_before_mb": round(min(at("idle-before", name)), 1),
            "rss_peak_mb": round(max(at("load", name) + at("cool-down", name)), 1),
            "rss_end_of_load_mb": round(at("load", name)[-1], 1),
            "rss_after_cooldown_mb": round(at("cool-down", name)[-1], 1),
            "fds_before": min(at("idle-before", name, "fds")),
            "fds_peak": max(at("load", name, "fds")),
            "fds_after_cooldown": at("cool-down", name, "fds")[-1],
        }
        for name in names
    }
    return {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "requests": tally.requests,
        "completed_answers": tally.completed,
        "resumes": tally.resumes,
        "events_read": tally.events,
        "relay_events_per_s": round(events / args.duration, 1),
        "broken_answers": len(tally.broken),
        "broken_examples": tally.broken[:5],
        "errors": tally.errors,
        "store_peak_mb": round(max(s.store_mb for s in samples), 1),
        "tombstones_peak": max(s.tombstones for s in samples),
        "store_after_cooldown_mb": round(samples[-1].store_mb, 2),
        "processes": per_process,
    }


def markdown(summary: dict) -> str:
    s = summary["settings"]
    arena = f"; MALLOC_ARENA_MAX={s['arena_max']}" if s["arena_max"] else ""
    lines = [
        f"Soak: {s['duration']:g} s of load ({s['clients']} clients, {s['cut']:.0%} cut and "
        f"resumed, {s['write_path']} path, demo rate {s['demo_rate']:g} ev/s per stream), "
        f"then {s['cooldown']:g} s idle; store {s['store_max_mib']} MiB, TTL "
        f"{s['session_ttl']:g} s{arena}.",
        "",
        f"- {summary['requests']:,} requests, {summary['resumes']:,} resumes, "
        f"{summary['completed_answers']:,} answers complete, {summary['events_read']:,} events "
        f"read ({summary['relay_events_per_s']:,} ev/s appended by the relay)",
        f"- answers with a lost, repeated or reordered event: {summary['broken_answers']}; "
        f"other errors: {sum(summary['errors'].values())} {summary['errors'] or ''}",
        f"- store peak {summary['store_peak_mb']} MiB, tombstones peak "
        f"{summary['tombstones_peak']:,.0f}, store after cool-down "
        f"{summary['store_after_cooldown_mb']} MiB",
        "",
        "| process | RSS before MB | peak | end of load | after cool-down | fds before | peak "
        "| after cool-down |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in summary["processes"].items():
        lines.append(
            f"| {name} | {p['rss_before_mb']} | {p['rss_peak_mb']} | {p['rss_end_of_load_mb']} "
            f"| {p['rss_after_cooldown_mb']} | {p['fds_before']} | {p['fds_peak']} "
            f"| {p['fds_after_cooldown']} |"
        )
    return "\n".join(lines) + "\n"


def chart(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, fds, store) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    times = [s.t for s in samples]
    for name in samples[0].rss_mb:
        rss.plot(times, [s.rss_mb[name] for s in samples], label=name)
        fds.plot(times, [s.fds[name] for s in samples], label=name)
    store.plot(times, [s.store_mb for s in samples], label="store MiB")
    store.plot(times, [s.tombstones / 1000 for s in samples], label="tombstones (thousands)")
    load = [s.t for s in samples if s.phase == "load"]
    for axis in (rss, fds, store):
        if load:
            axis.axvspan(load[0], load[-1], color="0.92")
        axis.legend(loc="upper left", fontsize="small")
    rss.set_ylabel("RSS MB")
    fds.set_ylabel("open fds")
    store.set_ylabel("relay store")
    store.set_xlabel("seconds (shaded: load)")
    fig.suptitle("stream-relay soak: RSS, fds and store over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--cooldown", type=float, default=120.0, help="idle seconds after")
    parser.add_argument("--idle", type=float, default=15.0, help="idle seconds before")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--cut", type=float, default=0.2, help="share of answers cut")
    parser.add_argument("--demo-rate", type=float, default=200.0)
    parser.add_argument("--write-path", default="detached", choices=["detached", "inline"])
    parser.add_argument("--store-max-mib", type=int, default=64)
    parser.add_argument("--session-ttl", type=float, default=60.0)
    parser.add_argument("--arena-max", default="", help="MALLOC_ARENA_MAX for the children")
    parser.add_argument("--out", type=Path, default=Path("bench-out/soak"))
    args = parser.parse_args()
    if args.arena_max:
        os.environ["MALLOC_ARENA_MAX"] = args.arena_max  # inherited by the children
    args.out.mkdir(parents=True, exist_ok=True)
    options = StackOptions(
        port=0,
        admin_port=0,
        demo_rate=args.demo_rate,
        write_path=args.write_path,
        relay_args=(
            *("--store-max-bytes", str(args.store_max_mib * MIB)),
            *("--session-ttl", str(args.session_ttl)),
            *("--detach-grace", "10"),
        ),
    )
    stack = start_stack(options)
    started = time.monotonic()
    try:
        tally, samples = asyncio.run(drive(stack, args, started))
    finally:
        stack.stop()
    summary = summarize(tally, samples, args)
    (args.out / "soak.json").write_text(
        json.dumps({"summary": summary, "samples": [asdict(s) for s in samples]}, indent=1)
    )
    (args.out / "soak.md").write_text(markdown(summary))
    chart(samples, args.out / "soak.png")
    print(markdown(summary))
    if tally.completed == 0:
        print("soak: no answer completed: the load never ran", file=sys.stderr)
        return 1
    return 1 if tally.broken else 0


if __name__ == "__main__":
    sys.exit(main())
