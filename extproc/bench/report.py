"""The bench report: required keys (checked), targets met or missed, Markdown tables, a PNG.

Pure functions of the JSON report except `write_chart`, which needs matplotlib (the `bench`
extra); `matplotlib_missing()` lets the command say so in one line before it runs anything.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from extproc.bench.scenarios import DESCRIPTIONS, ROLES

Json = dict[str, Any]
SCENARIO_KEYS = ("events_per_s", "latency_ms", "ttft_ms", "cpu_us_per_event", "rss_mb")
LATENCY_KEYS = ("p50", "p99", "max")
TTFT_KEYS = ("p50", "p99")
MACHINE_KEYS = ("cores", "cpu_model", "load_avg_start")


def matplotlib_missing() -> bool:
    return importlib.util.find_spec("matplotlib") is None


def schema_errors(report: Json) -> list[str]:
    """What a report lacks or gets wrong; [] for a good one. Failed or unavailable scenarios
    need only a status and a reason."""
    errors = [f"machine.{k} missing" for k in MACHINE_KEYS if k not in report.get("machine", {})]
    scenarios = report.get("scenarios")
    if not isinstance(scenarios, dict) or not scenarios:
        return [*errors, "no scenarios"]
    for name, row in scenarios.items():
        if row.get("status") != "ok":
            if not row.get("reason"):
                errors.append(f"{name}: status {row.get('status')!r} without a reason")
            continue
        errors += [f"{name}.{k} missing" for k in SCENARIO_KEYS if k not in row]
        if errors:
            continue
        if not row["events_per_s"] > 0:
            errors.append(f"{name}: events_per_s {row['events_per_s']} is not positive")
        lat = row["latency_ms"]
        errors += [f"{name}.latency_ms.{k} missing" for k in LATENCY_KEYS if k not in lat]
        errors += [f"{name}.ttft_ms.{k} missing" for k in TTFT_KEYS if k not in row["ttft_ms"]]
        if all(k in lat for k in LATENCY_KEYS) and not lat["p50"] <= lat["p99"] <= lat["max"]:
            errors.append(f"{name}: latency not ordered p50 <= p99 <= max: {lat}")
        for key in ("cpu_us_per_event", "rss_mb"):
            errors += [f"{name}.{key}.loadgen missing"] if "loadgen" not in row[key] else []
        if name not in report.get("saturation", {}):
            errors.append(f"saturation.{name} missing")
    return errors


def _ok(report: Json, name: str) -> Json | None:
    row = report["scenarios"].get(name)
    return row if row and row.get("status") == "ok" else None


def targets(report: Json) -> list[Json]:
    """Issue 7's targets, each with the measured value, the bound and whether it was met;
    a target whose inputs were not measured is left out."""
    out: list[Json] = []

    def add(what: str, value: float, bound: float, unit: str) -> None:
        if math.isfinite(value):
            out.append(
                {
                    "target": what,
                    "value": value,
                    "bound": bound,
                    "unit": unit,
                    "met": value <= bound,
                }
            )

    inline, envoy, noop = (_ok(report, n) for n in ("relay_inline", "envoy", "extproc_noop"))
    if inline and envoy:
        for q, bound in (("p50", 0.5), ("p99", 2.0)):
            added = inline["latency_ms"][q] - envoy["latency_ms"][q]
            add(f"relay_inline adds ≤{bound} ms {q} over envoy", added, bound, "ms")
    if inline:
        relay_cpu = inline["cpu_us_per_event"].get("relay", math.nan)
        add("relay CPU per event, inline (ideal)", relay_cpu, 25.0, "µs")
        if noop:
            ratio = relay_cpu / max(noop["cpu_us_per_event"].get("relay", math.nan), 1e-9)
            add("relay CPU per event ≤1.25x extproc_noop's", ratio, 1.25, "x")
    sat = report.get("saturation", {})
    if "relay_inline" in sat and "envoy" in sat and sat["envoy"]["events_per_s"]:
        # phrased as a bound to stay under: envoy's saturation / relay_inline's ≤ 1.25
        ratio = sat["relay_inline"]["events_per_s"] / sat["envoy"]["events_per_s"]
        out.append(
            {
                "target": "relay_inline saturation ≥0.8x envoy's",
                "value": ratio,
                "bound": 0.8,
                "unit": "x",
                "met": ratio >= 0.8,
            }
        )
    for state, row in report.get("resume", {}).items():
        add(f"resume ({state}) first event p99", row["first_event_ms"]["p99"], 5.0, "ms")
    memory = report.get("memory", {}).get("open_session_relay_inline")
    if memory:
        add("relay memory per open session (inline)", memory["bytes_per_session"], 4096, "B")
    return out


def _f(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(report: Json) -> str:
    m, load = report["machine"], report["load"]
    lines = [
        f"Machine: {m['cores']} cores, {m['cpu_model']}; Python {m.get('python')}, "
        f"Envoy {m.get('envoy')}; commit {m.get('commit')}; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in m['load_avg_start'])}"
        + (
            f", at end {' / '.join(f'{x:.2f}' for x in m['load_avg_end'])}"
            if "load_avg_end" in m
            else ""
        ),
        "",
        f"Load: {load['events_per_s']:,.0f} events/s offered over {load['streams']} streams "
        f"({load['rate'][0]:g}-{load['rate'][1]:g} ev/s each, TTFT {load['ttft_ms'][0]:g}-"
        f"{load['ttft_ms'][1]:g} ms, {load['tokens'][0]}-{load['tokens'][1]} tokens per answer), "
        f"{load['duration_s']:g} s measured after {load['warmup_s']:g} s warm-up.",
        "",
        "| scenario | ev/s | p50 ms | p99 ms | max ms | TTFT p50 / p99 ms | "
        + " | ".join(f"{r} µs/ev" for r in ROLES)
        + " | relay / peer RSS MB | saturation ev/s |",
        "|---" * (8 + len(ROLES)) + "|",
    ]
    for name, row in report["scenarios"].items():
        if row.get("status") != "ok":
            lines.append(f"| {name} | {row.get('status')}: {row.get('reason')} |")
            continue
        lat, cpu, rss = row["latency_ms"], row["cpu_us_per_event"], row["rss_mb"]
        sat = report["saturation"].get(name, {})
        sat_text = ("≥" if sat.get("lower_bound") else "") + _f(sat.get("events_per_s"), 0)
        cpus = " | ".join(_f(cpu.get(r), 1) if r in cpu else "" for r in ROLES)
        mem = " / ".join(_f(rss.get(r), 1) if r in rss else "-" for r in ("relay", "peer"))
        lines.append(
            f"| {name} | {_f(row['events_per_s'], 0)} | {_f(lat['p50'])} | {_f(lat['p99'])} | "
            f"{_f(lat['max'])} | {_f(row['ttft_ms']['p50'], 1)} / {_f(row['ttft_ms']['p99'], 1)} | "
            f"{cpus} | {mem} | {sat_text} |"
        )
    lines += ["", "Scenarios: " + "; ".join(f"`{k}`: {v}" for k, v in DESCRIPTIONS.items()) + "."]
    if report.get("multicast"):
        lines += [
            "",
            "| readers | delivered ev/s | p50 ms | p99 ms | max ms | complete | "
            "relay µs/ev | envoy µs/ev |",
            "|---" * 8 + "|",
        ]
        for row in report["multicast"]:
            lat, cpu = row["latency_ms"], row["cpu_us_per_event"]
            lines.append(
                f"| {row['readers']} | {_f(row['events_per_s'], 0)} | {_f(lat['p50'])} | "
                f"{_f(lat['p99'])} | {_f(lat['max'])} | {row['complete']}/{row['readers']}"
                f" | {_f(cpu.get('relay'), 1)} | {_f(cpu.get('envoy'), 1)} |"
            )
    if report.get("resume"):
        lines += [
            "",
            "| resume (reconnect → first replayed event) | sessions | p50 ms | p99 ms | "
            "max ms | wrong first id |",
            "|---" * 6 + "|",
        ]
        for state, row in report["resume"].items():
            t = row["first_event_ms"]
            lines.append(
                f"| {state} | {row['sessions']} | {_f(t['p50'])} | {_f(t['p99'])} | "
                f"{_f(t['max'])} | {row['wrong_first_id']} |"
            )
    memory = report.get("memory", {})
    if memory:
        lines += ["", "| relay memory | value |", "|---|---|"]
        for name in ("relay_inline", "relay_detached"):
            row = memory.get(f"open_session_{name}")
            if row:
                lines.append(
                    f"| per open session, {name} ({row['sessions']} open) | "
                    f"{_f(row['bytes_per_session'], 0)} B |"
                )
        row = memory.get("finished_sessions")
        if row:
            lines.append(
                f"| per 1,000 idle finished sessions (RSS; {row['sessions']} made) | "
                f"{_f(row['rss_mb_per_1000'])} MB (store {_f(row['store_mb_per_1000'])}"
                f" MB, of which payload {_f(row['payload_mb_per_1000'])} MB) |"
            )
    found = targets(report)
    if found:
        lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
        for t in found:
            lines.append(
                f"| {t['target']} | {_f(t['value'])} {t['unit']} | {_f(t['bound'])} "
                f"{t['unit']} | {'yes' if t['met'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def write_chart(report: Json, path: Path) -> None:
    """Latency, CPU per event by process, and saturation per scenario, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in report["scenarios"].items() if r.get("status") == "ok"]
    rows = [report["scenarios"][n] for n in names]
    x = list(range(len(names)))
    fig, (lat_ax, cpu_ax, sat_ax) = plt.subplots(1, 3, figsize=(17, 5.5))
    for offset, q in ((-0.2, "p50"), (0.2, "p99")):
        lat_ax.bar([i + offset for i in x], [r["latency_ms"][q] for r in rows], 0.4, label=q)
    lat_ax.set(title="latency upstream write → client (ms)", yscale="log")
    bottom = [0.0] * len(rows)
    for role in ROLES:
        values = [r["cpu_us_per_event"].get(role, 0.0) for r in rows]
        cpu_ax.bar(x, values, 0.6, bottom=bottom, label=role)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    cpu_ax.set(title="CPU per delivered event (µs), by process")
    sat = report.get("saturation", {})
    sat_ax.bar(x, [sat.get(n, {}).get("events_per_s", 0.0) for n in names], 0.6, color="tab:green")
    bound = next((s["p99_bound_ms"] for s in sat.values()), "?")
    sat_ax.set(title=f"saturation: highest ev/s with p99 ≤ {bound} ms")
    for ax in (lat_ax, cpu_ax, sat_ax):
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    lat_ax.legend()
    cpu_ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"stream-relay bench: {report['load']['events_per_s']:,.0f} ev/s offered; "
        f"{m['cores']} cores, {m['cpu_model']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
