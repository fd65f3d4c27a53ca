"""Relay memory per open session, broken down: the relay node's RSS growth per held-open
session and tracemalloc's account of it by file and line (what Python code allocated), on the
inline and the detached write path, and per open ext_proc stream of the do-nothing processor
(the floor: grpc's own stream state). RSS minus tracemalloc's total is what C allocated (grpc's
core, the protobuf runtime) plus allocator overhead.

    python bench/session_memory.py [--sessions 800] [--paths noop,inline,detached] [--top 25]

Each path: a relay stack in front of the demo upstream (as `stream-relay bench` starts it),
with tracemalloc on in the relay node (a sitecustomize on its PYTHONPATH: snapshots on SIGUSR1);
as many streams held open and closed once (warm-up), a snapshot, then `--sessions` responses
whose first event is a minute away held open (each has its session, and inline its ext_proc
stream), a snapshot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

from stream_relay_bench import peers, procstat
from stream_relay_bench.measure import run_loadgen
from stream_relay_bench.scenarios import Target, running

from extproc.ops.supervisor import Stack

PROBE = """\
import gc, os, signal, tracemalloc
_dir = os.environ.get("RELAY_TRACEMALLOC_DIR")
if _dir and os.environ.get("RELAY_TRACEMALLOC_ARGV0", "-") in " ".join(__import__("sys").argv):
    tracemalloc.start(int(os.environ.get("RELAY_TRACEMALLOC_FRAMES", "1")))
    _taken = [0]

    def _snapshot(signum, frame):
        gc.collect()
        _taken[0] += 1
        path = os.path.join(_dir, f"{os.getpid()}-{_taken[0]}.snap")
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, _snapshot)
"""
SNAPSHOT_TIMEOUT_S = 120.0


def snapshot(pid: int, workdir: Path, n: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = workdir / f"{pid}-{n}.snap"
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
    while not path.exists():  # polling the relay process, bounded by the deadline
        if time.monotonic() > deadline:
            raise RuntimeError(f"no snapshot from {pid}")
        time.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))


def open_streams(target: Target, session: bool) -> float:
    """Relay sessions still open, or the no-op's streams not yet ended."""
    with urllib.request.urlopen(target.metrics_url, timeout=5) as response:
        text = response.read().decode()
    if not session:
        return float(json.loads(text)["open"])
    return sum(float(v) for v in re.findall(r"^relay_sessions_active\{[^}]*\} (\S+)$", text, re.M))


def settle(target: Target, session: bool) -> None:
    """Wait until the warm-up's streams have all ended (Envoy closes them after the client)."""
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT_S
    while open_streams(target, session) > 0:  # polling the relay process, bounded
        if time.monotonic() > deadline:
            raise RuntimeError("the warm-up's streams did not end")
        time.sleep(0.2)


def measure_path(
    name: str, upstream: Stack, port: int, sessions: int, top: int, snapshots: Path
) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="session-memory-"))
    pid_upstream = upstream.children[0].process.pid
    with running(name, port, pid_upstream, workdir / "stack") as target:
        relay = target.pids["relay"][0]
        session = name != "extproc_noop"
        hold = {"kind": "hold", "host": "127.0.0.1", "port": target.port, "session": session}
        # Lazy imports, pools, caches: as many streams once, so only per-stream state grows.
        warm = {**hold, "ttft_ms": 0, "sessions": sessions}
        run_loadgen(warm, {}, timeout_s=300, on_open=lambda: None)
        settle(target, session)
        before, rss0 = snapshot(relay, snapshots, 1), procstat.rss_bytes(relay)
        held: list[tuple[tracemalloc.Snapshot, int]] = []
        run_loadgen(
            {**hold, "ttft_ms": 60_000, "sessions": sessions},
            {},
            timeout_s=300,
            on_open=lambda: held.append((snapshot(relay, snapshots, 2), procstat.rss_bytes(relay))),
        )
    after, rss1 = held[0]
    stats = after.compare_to(before, "lineno")
    traced = sum(s.size_diff for s in stats)
    rss = rss1 - rss0
    print(f"\n{name}: {sessions} sessions held open")
    print(f"  RSS            {rss / sessions:8,.0f} B per session")
    print(f"  tracemalloc    {traced / sessions:8,.0f} B per session (Python allocations)")
    print(f"  the rest       {(rss - traced) / sessions:8,.0f} B per session (C, allocator)")
    by_file: dict[str, int] = {}
    for stat in after.compare_to(before, "filename"):
        where = stat.traceback[0].filename
        key = next((k for k in _PACKAGES if k in where), where)
        by_file[key] = by_file.get(key, 0) + stat.size_diff
    print("  by package:")
    for key, size in sorted(by_file.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {size / sessions:8,.0f} B  {key}")
    print(f"  top {top} lines:")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        print(
            f"    {stat.size_diff / sessions:8,.0f} B {stat.count_diff / sessions:6.2f} blocks  "
            f"{_short(frame.filename)}:{frame.lineno}"
        )


_PACKAGES = (
    "/extproc/",
    "/grpc/",
    "/aiohttp/",
    "/asyncio/",
    "/multidict/",
    "/yarl/",
    "/google/protobuf/",
    "/envoy/",
    "tracemalloc",
)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "python3.11/", "/extproc/"):
        if marker in filename:
            return ("extproc/" if marker == "/extproc/" else "") + filename.split(marker, 1)[1]
    return filename


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=800)
    parser.add_argument("--paths", default="noop,inline,detached")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    probe = Path(tempfile.mkdtemp(prefix="relay-probe-"))
    (probe / "sitecustomize.py").write_text(PROBE)
    snapshots = Path(tempfile.mkdtemp(prefix="relay-snapshots-"))
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(probe), path)))
    os.environ["RELAY_TRACEMALLOC_DIR"] = str(snapshots)
    upstream = Stack(Path(tempfile.mkdtemp(prefix="session-memory-up-")))
    try:
        port = peers.start_upstream(upstream)
        for path in args.paths.split(","):
            name = "extproc_noop" if path == "noop" else f"relay_{path}"
            os.environ["RELAY_TRACEMALLOC_ARGV0"] = "noop.ports" if path == "noop" else "serve"
            measure_path(name, upstream, port, args.sessions, args.top, snapshots)
    finally:
        peers.stop(upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
