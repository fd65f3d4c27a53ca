"""The `stream-relay bench` subcommand: flags, then one run, then the three output files."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from extproc.bench import report
from extproc.bench.runner import FULL, QUICK, SCENARIOS, run


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
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )


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
            "stream-relay bench: matplotlib is missing: pip install 'stream-relay[bench]'",
            file=sys.stderr,
        )
        return 1
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        print(f"stream-relay bench: unknown scenario {unknown[0]!r}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    workdir, ok = Path(tempfile.mkdtemp(prefix="stream-relay-bench-")), False
    try:
        result = run(QUICK if args.quick else FULL, scenarios, workdir, args.quick)
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
    return 1 if problems else 0
