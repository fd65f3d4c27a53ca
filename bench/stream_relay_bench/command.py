"""The `stream-relay bench` subcommand: flags, then one run, then the three output files."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from stream_relay_bench import report
from stream_relay_bench.runner import DEFAULT_SCENARIOS, FULL, GROUPS, QUICK, SCENARIOS, run


def add_parser(commands: Any) -> None:
    bench = commands.add_parser("bench", help="benchmark the relay against Envoy, nginx, pushpin")
    bench.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    bench.add_argument(
        "--json", type=Path, metavar="PATH", help="report path (default OUT/bench.json)"
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="directory for bench.json, bench.md, bench.png (default ./bench-out)",
    )
    bench.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)}; or a group: "
        + ", ".join(f"{g} = {','.join(names)}" for g, names in GROUPS.items())
        + f" (default {','.join(DEFAULT_SCENARIOS)})",
    )
    bench.add_argument(
        "--sweep",
        metavar="LEVELS",
        help="comma-separated offered ev/s for the saturation sweep, rising "
        "(default 2500,5000,...,30000; none with --quick)",
    )


def selected(text: str) -> tuple[str, ...]:
    """Scenario names (groups expanded, duplicates dropped, order kept); ValueError names the
    first unknown one."""
    out: list[str] = []
    for name in (s.strip() for s in text.split(",")):
        for each in GROUPS.get(name, (name,) if name else ()):
            if each not in SCENARIOS:
                raise ValueError(f"unknown scenario {each!r} (known: {', '.join(SCENARIOS)})")
            if each not in out:
                out.append(each)
    if not out:
        raise ValueError("no scenario selected")
    return tuple(out)


def sweep_levels(text: str) -> tuple[float, ...]:
    """Rising positive ev/s levels; ValueError says what is wrong."""
    try:
        levels = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--sweep wants numbers, got {text!r}") from None
    if not levels or any(b <= a for a, b in itertools.pairwise(levels)):
        raise ValueError(f"--sweep wants rising levels, got {text!r}")
    if levels[0] <= 0:
        raise ValueError(f"--sweep levels must be positive, got {text!r}")
    return levels


def _finite(value: Any) -> Any:
    """JSON has no NaN: unmeasured numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(args: argparse.Namespace) -> int:
    if report.matplotlib_missing():
        print(
            "stream-relay bench: matplotlib is missing: pip install ./bench (from a checkout)",
            file=sys.stderr,
        )
        return 1
    try:
        scenarios = selected(args.scenarios)
        plan = QUICK if args.quick else FULL
        if args.sweep:
            plan = dataclasses.replace(
                plan,
                sweep=sweep_levels(args.sweep),
                sweep_duration_s=max(plan.sweep_duration_s, 2.0),  # QUICK has no sweep time
                sweep_warmup_s=max(plan.sweep_warmup_s, 1.0),
            )
    except ValueError as exc:
        print(f"stream-relay bench: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    workdir, ok = Path(tempfile.mkdtemp(prefix="stream-relay-bench-")), False
    try:
        result = run(plan, scenarios, workdir, args.quick)
        result["command"] = "stream-relay bench " + " ".join(sys.argv[2:])
        ok = True
    except KeyboardInterrupt:
        print("stream-relay bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if not ok:
            print(f"stream-relay bench: logs kept in {workdir}", file=sys.stderr)
    shutil.rmtree(workdir, ignore_errors=True)
    json_path = args.json or args.out / "bench.json"
    json_path.write_text(json.dumps(_finite(result), indent=2) + "\n")
    table = report.markdown(result)
    (args.out / "bench.md").write_text(table)
    report.write_chart(result, args.out / "bench.png")
    print(table)
    print(
        f"stream-relay bench: wrote {json_path}, {args.out / 'bench.md'}, {args.out / 'bench.png'}"
    )
    problems = report.schema_errors(result)
    for problem in problems:
        print(f"stream-relay bench: report: {problem}", file=sys.stderr)
    failed = report.failures(result)
    for failure in failed:  # last, so they are what a reader of the output sees
        print(f"stream-relay bench: FAILED {failure}", file=sys.stderr)
    return 1 if problems or failed else 0
