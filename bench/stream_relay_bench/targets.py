"""The targets a bench report is held to (issue 13, plus issue 7's resume bound), each with the
measured value, the bound and whether it was met.

Pure functions of the JSON report. A target whose inputs were not measured, or were measured
on a scenario that did not prove its path (status other than "ok"), is left out: no ratio is
ever printed against a floor that was not measured.
"""

from __future__ import annotations

import math
from typing import Any

Json = dict[str, Any]
KB = 1024


def ok_row(report: Json, name: str) -> Json | None:
    row = report["scenarios"].get(name)
    return row if row and row.get("status") == "ok" else None


def _cpu(row: Json | None, role: str = "relay") -> float:
    return float(row["cpu_us_per_event"].get(role, math.nan)) if row else math.nan


def _saturation(report: Json, name: str) -> float:
    """The scenario's saturation point; nan when unmeasured or only a lower bound (every level
    passed, as in a quick run without a sweep): a ratio of lower bounds says nothing."""
    sat = report.get("saturation", {}).get(name)
    if ok_row(report, name) is None or sat is None or sat.get("lower_bound"):
        return math.nan
    return float(sat["events_per_s"])


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def targets(report: Json) -> list[Json]:
    out: list[Json] = []

    def add(what: str, value: float, bound: float, unit: str, *, at_least: bool = False) -> None:
        if math.isfinite(value):
            met = value >= bound if at_least else value <= bound
            out.append(
                {
                    "target": what,
                    "value": value,
                    "bound": bound,
                    "unit": unit,
                    "at_least": at_least,
                    "met": met,
                }
            )

    inline, detached, envoy, noop = (
        ok_row(report, n) for n in ("relay_inline", "relay_detached", "envoy", "extproc_noop")
    )
    add(
        "relay_inline CPU per event ≤1.15x extproc_noop's (same run)",
        _ratio(_cpu(inline), _cpu(noop)),
        1.15,
        "x",
    )
    for name, row, bounds in (
        ("relay_inline", inline, (("p50", 1.0), ("p99", 3.0))),
        ("relay_detached", detached, (("p50", 2.0), ("p99", 5.0))),
    ):
        if row and envoy:
            for q, bound in bounds:
                added = row["latency_ms"][q] - envoy["latency_ms"][q]
                add(f"{name} adds ≤{bound:g} ms {q} over envoy", added, bound, "ms")
    sat = _saturation(report, "relay_inline")
    add(
        "relay_inline saturation ≥0.9x extproc_noop's",
        _ratio(sat, _saturation(report, "extproc_noop")),
        0.9,
        "x",
        at_least=True,
    )
    add(
        "relay_inline saturation above pushpin's",
        _ratio(sat, _saturation(report, "pushpin")),
        1.0,
        "x",
        at_least=True,
    )
    redis1 = ok_row(report, "relay_inline_redis_1")
    add("relay_inline_redis_1: Redis CPU per event ≤15 µs", _cpu(redis1, "redis"), 15.0, "µs")
    add(
        "relay_inline_redis_1: relay CPU per event ≤1.2x relay_inline's",
        _ratio(_cpu(redis1), _cpu(inline)),
        1.2,
        "x",
    )
    memory = report.get("memory", {})
    for name in ("relay_inline", "relay_detached"):
        held = memory.get(f"open_session_{name}")
        if held:
            add(
                f"relay memory per open session ({name}) ≤8 KB",
                held["bytes_per_session"] / KB,
                8.0,
                "KB",
            )
    for state, row in report.get("resume", {}).items():
        add(f"resume ({state}) first event p99 ≤5 ms", row["first_event_ms"]["p99"], 5.0, "ms")
    return out
