"""The bench report: required keys (checked), targets met or missed, Markdown tables, a PNG.

Pure functions of the JSON report except `write_chart`, which needs matplotlib (a dependency of
the bench distribution, `pip install ./bench`); `matplotlib_missing()` lets the command say so
in one line before it runs anything.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from stream_relay_bench.scenarios import DESCRIPTIONS, EXTRA_ROLES, REDIS_NODES, ROLES
from stream_relay_bench.targets import ok_row, targets

Json = dict[str, Any]
SCENARIO_KEYS = (
    "events_per_s",
    "latency_ms",
    "ttft_ms",
    "cpu_us_per_event",
    "rss_mb",
    "proof",
)
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
        errors += [f"{name}: not processed: {p}" for p in row["proof"].get("problems", [])]
        if name not in report.get("saturation", {}):
            errors.append(f"saturation.{name} missing")
    return errors


def failures(report: Json) -> list[str]:
    """Scenarios that were selected and could have run but gave no numbers: one that did not
    process its path (invalid) or broke (failed). Each fails the run; unavailable peers (not
    installable here) do not."""
    return [
        f"{name}: {row.get('status')}: {row.get('reason')}"
        for name, row in report.get("scenarios", {}).items()
        if row.get("status") in ("invalid", "failed")
    ]


def _roles(report: Json) -> tuple[str, ...]:
    """ROLES, plus an extra role (redis) only if some scenario measured it."""
    seen = {r for row in report["scenarios"].values() for r in row.get("cpu_us_per_event", {})}
    return ROLES + tuple(r for r in EXTRA_ROLES if r in seen)


def redis_cost(report: Json) -> Json:
    """What the Redis store costs per event, from relay_inline (memory) and
    relay_inline_redis_1 at the same load: the relay node's extra CPU, redis-server's CPU, and
    Redis memory per finished event and session. {} when either row is missing."""
    memory, redis1 = ok_row(report, "relay_inline"), ok_row(report, "relay_inline_redis_1")
    if not memory or not redis1:
        return {}
    relay_extra = redis1["cpu_us_per_event"]["relay"] - memory["cpu_us_per_event"]["relay"]
    server = redis1["cpu_us_per_event"].get("redis", math.nan)
    out: Json = {
        "relay_cpu_us_per_event_memory": memory["cpu_us_per_event"]["relay"],
        "relay_cpu_us_per_event_redis_1": redis1["cpu_us_per_event"]["relay"],
        "relay_extra_cpu_us_per_event": relay_extra,
        "redis_cpu_us_per_event": server,
        "total_cpu_us_per_event": relay_extra + server,
    }
    stored = report.get("scaleout", {}).get("scenarios", {}).get("relay_inline_redis_1", {})
    if "redis_memory" in stored:
        mem = stored["redis_memory"]
        out["redis_bytes_per_event"] = mem["bytes_per_event"]
        out["redis_bytes_per_session"] = mem["bytes_per_session"]
        out["payload_bytes_per_event"] = mem["payload_bytes_per_event"]
    return out


def _f(value: Any, digits: int = 2) -> str:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}"


def markdown(report: Json) -> str:
    m, load, roles = report["machine"], report["load"], _roles(report)
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
        + " | ".join(f"{r} µs/ev" for r in roles)
        + " | relay / peer RSS MB | saturation ev/s |",
        "|---" * (8 + len(roles)) + "|",
    ]
    for name, row in report["scenarios"].items():
        if row.get("status") != "ok":
            lines.append(f"| {name} | {row.get('status')}: {row.get('reason')} |")
            continue
        lat, cpu, rss = row["latency_ms"], row["cpu_us_per_event"], row["rss_mb"]
        sat = report["saturation"].get(name, {})
        sat_text = ("≥" if sat.get("lower_bound") else "") + _f(sat.get("events_per_s"), 0)
        cpus = " | ".join(_f(cpu.get(r), 1) if r in cpu else "" for r in roles)
        mem = " / ".join(_f(rss.get(r), 1) if r in rss else "-" for r in ("relay", "peer"))
        lines.append(
            f"| {name} | {_f(row['events_per_s'], 0)} | {_f(lat['p50'])} | {_f(lat['p99'])} | "
            f"{_f(lat['max'])} | {_f(row['ttft_ms']['p50'], 1)} / {_f(row['ttft_ms']['p99'], 1)} | "
            f"{cpus} | {mem} | {sat_text} |"
        )
    described = [k for k in DESCRIPTIONS if k not in REDIS_NODES or k in report["scenarios"]]
    lines += ["", "Scenarios: " + "; ".join(f"`{k}`: {DESCRIPTIONS[k]}" for k in described) + "."]
    lines += _proof_markdown(report)
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
    lines += _scaleout_markdown(report)
    found = targets(report)
    if found:
        what = " (quick run: not the targets' load)" if report.get("quick") else ""
        lines += ["", f"| target{what} | measured | met |", "|---|---|---|"]
        for t in found:
            lines.append(
                f"| {t['target']} | {_f(t['value'])} {t['unit']} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def _proof_markdown(report: Json) -> list[str]:
    """What each scenario's main run went through: Envoy's ext_proc counters, the messages its
    processor answered, the events the relay logged, the share that arrived tagged."""
    lines = [
        "",
        "Proof that each scenario's main run went through its path:",
        "",
        "| scenario | path | requests | ext_proc streams | went around the processor | "
        "message timeouts | body messages answered | events logged | events received | tagged |",
        "|---" * 10 + "|",
    ]
    for name, row in report["scenarios"].items():
        if row.get("status") != "ok" or "proof" not in row:
            continue
        p, ext = row["proof"], row["proof"]["ext_proc"]
        lines.append(
            f"| {name} | {p['path']} | {p['requests']:,} | {_n(ext.get('streams_started'))} | "
            f"{_n(ext.get('failure_mode_allowed'))} | {_n(ext.get('message_timeouts'))} | "
            f"{_n(p['processor_body_messages'] if ext else None)} | "
            f"{_n(p['events_logged'] if p['path'] in ('inline', 'detached') else None)} | "
            f"{p['events']:,} | {100 * p['tagged_fraction']:.1f} % |"
        )
    return lines


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _scaleout_markdown(report: Json) -> list[str]:
    scaleout = report.get("scaleout")
    if not scaleout:
        return []
    lines = [
        "",
        "Scale-out (relay = all nodes summed):",
        "",
        "| scenario | nodes | store | ev/s | delivered | p50 ms | p99 ms | relay µs/ev | "
        "redis µs/ev | envoy µs/ev | relay / redis RSS MB | saturation ev/s | "
        "100 readers: ev/s, p99 ms, complete |",
        "|---" * 13 + "|",
    ]
    for name, extra in scaleout.get("scenarios", {}).items():
        row = ok_row(report, name)
        if row is None:
            continue
        lat, cpu, rss = row["latency_ms"], row["cpu_us_per_event"], row["rss_mb"]
        sat = report["saturation"].get(name, {})
        fan = next((m for m in extra["multicast"] if m["readers"] == 100), None)
        fan_text = (
            f"{_f(fan['events_per_s'], 0)}, {_f(fan['latency_ms']['p99'])}, "
            f"{fan['complete']}/{fan['readers']}"
            if fan
            else "-"
        )
        lines.append(
            f"| {name} | {extra['nodes']} | {extra['store']} | {_f(row['events_per_s'], 0)} | "
            f"{_f(100 * row['delivered_ratio'], 1)} % | {_f(lat['p50'])} | {_f(lat['p99'])} | "
            f"{_f(cpu.get('relay'), 1)} | {_f(cpu.get('redis'), 1)} | {_f(cpu.get('envoy'), 1)} | "
            f"{_f(rss.get('relay'), 1)} / {_f(rss.get('redis'), 1)} | "
            + ("≥" if sat.get("lower_bound") else "")
            + f"{_f(sat.get('events_per_s'), 0)} | {fan_text} |"
        )
    lines += [
        "",
        "| fan-out: scenario | readers | ev/s | p50 ms | p99 ms | max ms | complete | "
        "relay µs/ev | redis µs/ev | envoy µs/ev |",
        "|---" * 10 + "|",
    ]
    for name, extra in scaleout.get("scenarios", {}).items():
        for m in extra["multicast"]:
            lat, cpu = m["latency_ms"], m["cpu_us_per_event"]
            lines.append(
                f"| {name} | {m['readers']} | {_f(m['events_per_s'], 0)} | {_f(lat['p50'])} | "
                f"{_f(lat['p99'])} | {_f(lat['max'])} | {m['complete']}/{m['readers']} | "
                f"{_f(cpu.get('relay'), 1)} | {_f(cpu.get('redis'), 1)} | "
                f"{_f(cpu.get('envoy'), 1)} |"
            )
    cost = scaleout.get("redis_cost") or {}
    if cost:
        lines += [
            "",
            f"Redis cost per event (relay_inline_redis_1 vs relay_inline): relay "
            f"{_f(cost['relay_cpu_us_per_event_redis_1'], 1)} - "
            f"{_f(cost['relay_cpu_us_per_event_memory'], 1)} = "
            f"{_f(cost['relay_extra_cpu_us_per_event'], 1)} µs, plus redis-server "
            f"{_f(cost['redis_cpu_us_per_event'], 1)} µs: "
            f"**{_f(cost['total_cpu_us_per_event'], 1)} µs CPU per event**.",
        ]
        if "redis_bytes_per_event" in cost:
            lines.append(
                f"Redis memory: {_f(cost['redis_bytes_per_event'], 0)} B per event "
                f"(payload {_f(cost['payload_bytes_per_event'], 0)} B), "
                f"{_f(cost['redis_bytes_per_session'], 0)} B per finished 22-event session."
            )
    return lines


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
    for role in _roles(report):
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
