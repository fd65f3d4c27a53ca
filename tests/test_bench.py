"""`stream-relay bench`: its pure parts (percentiles, the load generator's HTTP parser, report
checks and tables, targets, the proof that a scenario went through its path, scenario
selection) and tiny runs through the real harness: the no-op floor with and without gRPC health,
direct and relay_inline, two relay nodes with their own redis-server."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stream_relay_bench import peers, proof, report
from stream_relay_bench.command import selected, sweep_levels
from stream_relay_bench.http1 import Response
from stream_relay_bench.measure import check, measure, per_role, run_loadgen, streams_job, sweep
from stream_relay_bench.plan import QUICK, Load
from stream_relay_bench.scenarios import running
from stream_relay_bench.stats import expected_events, percentile, summary

from extproc.ops.cli import build_parser
from extproc.ops.supervisor import Stack


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))
    assert summary([3.0, 1.0, 2.0]) == {"p50": 2.0, "p99": 3.0, "max": 3.0}


def test_expected_events_counts_the_schedule_inside_the_window() -> None:
    # events at 10.0, 10.1, ... 10.9 (10 events at 10/s)
    assert expected_events(10.0, 10.0, 10, 0.0, 100.0) == 10
    assert expected_events(10.0, 10.0, 10, 10.25, 10.55) == 3  # 10.3, 10.4, 10.5
    assert expected_events(10.0, 10.0, 10, 11.0, 12.0) == 0
    assert expected_events(10.0, 0.0, 5, 9.0, 11.0) == 5  # unpaced: all at once


async def _parse(raw: bytes, step: int) -> tuple[bytes, Response, bytes]:
    body: list[bytes] = []
    response = Response(lambda data, now: body.append(data))
    rest = b""
    for i in range(0, len(raw), step):
        rest = response.feed(raw[i : i + step], 0.0)
    return b"".join(body), response, rest


@pytest.mark.parametrize("step", [1, 3, 1000])
async def test_response_parser_dechunks_at_any_split(step: int) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Relay-Session: abc\r\n\r\n"
        b"5\r\nhello\r\nc;ext=1\r\n, SSE world\n\r\n0\r\n\r\n"
    )
    body, response, rest = await _parse(raw, step)
    assert body == b"hello, SSE world\n"
    assert response.status == 200 and response.headers["x-relay-session"] == "abc"
    assert response.done.done() and rest == b""


async def test_response_parser_sized_body_leaves_the_next_response() -> None:
    raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nnoHTTP/1.1"
    body, response, rest = await _parse(raw, len(raw))
    assert (body, response.status, rest) == (b"no", 404, b"HTTP/1.1")


def _row(**over: Any) -> dict[str, Any]:
    row = {
        "status": "ok",
        "events_per_s": 100.0,
        "latency_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0},
        "ttft_ms": {"p50": 5.0, "p99": 6.0},
        "cpu_us_per_event": {"relay": 30.0, "envoy": 20.0, "loadgen": 10.0},
        "rss_mb": {"relay": 50.0, "loadgen": 20.0},
        "proof": {
            "path": "plain",
            "requests": 2,
            "events": 40,
            "tagged_fraction": 0.0,
            "ext_proc": {},
            "processor_body_messages": 0,
            "events_logged": 0,
            "problems": [],
        },
    }
    return {**row, **over}


def _report(**scenarios: dict[str, Any]) -> dict[str, Any]:
    ok = [n for n, r in scenarios.items() if r.get("status") == "ok"]
    return {
        "machine": {"cores": 2, "cpu_model": "x", "load_avg_start": [0.1, 0.2, 0.3]},
        "load": {
            "events_per_s": 100,
            "streams": 2,
            "rate": [20, 100],
            "ttft_ms": [0, 0],
            "tokens": [1, 2],
            "duration_s": 1,
            "warmup_s": 0,
        },
        "scenarios": scenarios,
        "saturation": {
            n: {"events_per_s": 100.0, "lower_bound": True, "p99_bound_ms": 25.0, "levels": []}
            for n in ok
        },
    }


def test_schema_accepts_a_good_report_and_names_what_is_wrong() -> None:
    good = _report(envoy=_row(), pushpin={"status": "unavailable", "reason": "no apt"})
    assert report.schema_errors(good) == []
    bad = _report(envoy=_row(latency_ms={"p50": 3.0, "p99": 2.0, "max": 4.0}, events_per_s=0.0))
    errors = report.schema_errors(bad)
    assert any("not positive" in e for e in errors)
    assert any("not ordered" in e for e in errors)
    missing = _report(envoy={k: v for k, v in _row().items() if k != "ttft_ms"})
    assert report.schema_errors(missing) == ["envoy.ttft_ms missing"]
    assert report.schema_errors(_report(x={"status": "failed"})) == [
        "x: status 'failed' without a reason"
    ]


def test_targets_and_markdown() -> None:
    inline = _row(latency_ms={"p50": 1.3, "p99": 6.0, "max": 9.0})
    noop = _row(cpu_us_per_event={"relay": 20.0, "loadgen": 1.0})
    result = _report(envoy=_row(), relay_inline=inline, extproc_noop=noop)
    result["saturation"]["extproc_noop"]["events_per_s"] = 200.0
    for name in ("relay_inline", "extproc_noop"):  # a full run: both swept to their limit
        result["saturation"][name]["lower_bound"] = False
    found = {t["target"]: t for t in report.targets(result)}
    p50 = found["relay_inline adds ≤1 ms p50 over envoy"]
    assert p50["value"] == pytest.approx(0.3) and p50["met"]
    assert not found["relay_inline adds ≤3 ms p99 over envoy"]["met"]
    cpu = found["relay_inline CPU per event ≤1.15x extproc_noop's (same run)"]
    assert cpu["value"] == pytest.approx(1.5) and not cpu["met"]
    saturation = found["relay_inline saturation ≥0.9x extproc_noop's"]
    assert saturation["value"] == pytest.approx(0.5) and not saturation["met"]
    result["saturation"]["extproc_noop"]["lower_bound"] = True  # a quick run: no sweep
    assert not [t for t in report.targets(result) if "saturation" in t["target"]]
    table = report.markdown(result)
    assert "| relay_inline | 100 | 1.30 | 6.00 | 9.00 |" in table
    assert "**no**" in table


def _noop_proof(**ext_proc: int) -> dict[str, Any]:
    counted = {"streams_started": 10, "failure_mode_allowed": 0, "message_timeouts": 0}
    return {
        "path": "noop",
        "requests": 10,
        "events": 200,
        "tagged_fraction": 0.0,
        "ext_proc": {**counted, **ext_proc},
        "processor_body_messages": 0 if ext_proc else 200,
        "events_logged": 0,
    }


def test_a_noop_that_never_processed_fails_the_run_and_prints_no_ratio() -> None:
    """The floor Envoy went around (unhealthy, fail open) is named with the reasons; its row
    gives no numbers, so no target is computed against it, and the run fails."""
    assert proof.problems(_noop_proof()) == []
    skipped = _noop_proof(failure_mode_allowed=10)
    reasons = proof.problems(skipped)
    assert any("went around the processor 10 times" in r for r in reasons)
    assert any("grpc.health.v1" in r for r in reasons)
    assert "the no-op processor answered 0 body messages" in reasons
    with pytest.raises(proof.PathNotProcessed, match=r"^extproc_noop did not process its path"):
        proof.verify("extproc_noop", {"proof": {**skipped, "problems": reasons}})
    result = _report(
        relay_inline=_row(),
        extproc_noop={"status": "invalid", "reason": "extproc_noop did not process its path"},
    )
    assert not [t for t in report.targets(result) if "extproc_noop" in t["target"]]
    assert report.failures(result) == [
        "extproc_noop: invalid: extproc_noop did not process its path"
    ]
    assert report.schema_errors(result) == []
    unavailable = _report(envoy=_row(), nginx={"status": "unavailable", "reason": "no apt"})
    assert report.failures(unavailable) == []


def test_relay_paths_must_tag_every_event() -> None:
    inline = {**_noop_proof(), "path": "inline", "tagged_fraction": 0.99}
    assert proof.problems(inline) == [
        "only 99.0% of events reached the client tagged (must be all)"
    ]
    detached = {**inline, "path": "detached", "tagged_fraction": 1.0, "events_logged": 0}
    assert proof.problems(detached) == ["the relay logged no events"]
    plain = {"path": "plain", "events": 5, "tagged_fraction": 0.2}
    assert proof.problems(plain) == ["20% of events carry id: lines, but no relay is in this path"]


def test_redis_cost_and_no_redis_column_without_redis_rows() -> None:
    plain = _report(relay_inline=_row())
    assert "redis µs/ev" not in report.markdown(plain) and report.redis_cost(plain) == {}
    redis1 = _row(cpu_us_per_event={"relay": 45.0, "redis": 5.0, "loadgen": 1.0})
    cost = report.redis_cost(_report(relay_inline=_row(), relay_inline_redis_1=redis1))
    assert cost["relay_extra_cpu_us_per_event"] == 15.0
    assert cost["total_cpu_us_per_event"] == 20.0


def test_scenario_selection() -> None:
    assert selected("scaleout,relay_inline") == (
        "relay_inline",
        "relay_inline_redis_1",
        "relay_inline_redis_2",
        "relay_inline_redis_3",
    )
    with pytest.raises(ValueError, match="unknown scenario 'relay_inline_redis_9'"):
        selected("envoy,relay_inline_redis_9")
    assert sweep_levels("1000,2500") == (1000.0, 2500.0)
    for bad in ("2500,1000", "x", ""):
        with pytest.raises(ValueError, match="--sweep"):
            sweep_levels(bad)


def test_cli_has_the_bench_subcommand() -> None:
    args = build_parser().parse_args(["bench", "--quick", "--json", "r.json", "--out", "d"])
    assert (args.command, args.quick, args.json, args.out) == (
        "bench",
        True,
        Path("r.json"),
        Path("d"),
    )


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[Stack, int]]:
    stack = Stack(tmp_path / "upstream")
    stack.workdir.mkdir()
    try:
        yield stack, peers.start_upstream(stack)
    finally:
        peers.stop(stack)


def test_tiny_run_through_the_real_harness(upstream: tuple[Stack, int], tmp_path: Path) -> None:
    """direct and relay_inline, 2 streams x ~20 events: every required key, sane values."""
    stack, port = upstream
    load = Load(
        events_per_s=100,
        duration_s=1.0,
        warmup_s=0.0,
        rate=(50, 50),
        ttft_ms=(0, 0),
        tokens=(18, 18),
    )
    result = _report()
    for name in ("direct", "relay_inline"):
        with running(name, port, stack.children[0].process.pid, tmp_path / name) as target:
            main = measure(target, load)
            result["scenarios"][name] = {"status": "ok", **main}
            result["saturation"][name] = sweep(target, QUICK, main)
        assert main["events_per_s"] > 0 and main["errors"] == 0
        tagged = main["tagged_fraction"]
        assert tagged >= 1.0 if name == "relay_inline" else tagged == 0.0
        assert main["cpu_us_per_event"]["loadgen"] > 0
    assert report.schema_errors(result) == []
    assert "relay" in result["scenarios"]["relay_inline"]["cpu_us_per_event"]
    report.markdown(result)


def test_two_redis_nodes_count_as_one_relay_role(
    upstream: tuple[Stack, int], tmp_path: Path
) -> None:
    """relay_inline_redis_2: both nodes' CPU and RSS are summed under `relay`, redis-server is
    its own role, and every process is gone once the scenario ends."""
    stack, port = upstream
    load = Load(
        events_per_s=200,
        duration_s=1.0,
        warmup_s=0.0,
        rate=(50, 50),
        ttft_ms=(0, 0),
        tokens=(40, 40),
    )
    name = "relay_inline_redis_2"
    with running(name, port, stack.children[0].process.pid, tmp_path / name) as target:
        nodes = target.pids["relay"]
        assert len(nodes) == 2 and target.redis_url and len(target.metrics_urls) == 2
        main = measure(target, load)
        assert main["events_per_s"] > 0 and main["errors"] == 0 and main["tagged_fraction"] >= 1
        assert main["cpu_us_per_event"]["redis"] >= 0 and main["rss_mb"]["redis"] > 0
        # Each node as a role of its own next to `relay`, in the same samples: relay is the sum.
        each = {**target.pids, "node1": nodes[:1], "node2": nodes[1:]}
        result, before, after = run_loadgen(streams_job(target, load), each, timeout_s=30)
        cpu, rss = per_role(before, after, result["events"])
        assert cpu["relay"] == pytest.approx(cpu["node1"] + cpu["node2"])
        assert rss["relay"] == pytest.approx(rss["node1"] + rss["node2"])
        assert rss["node1"] > 0 and rss["node2"] > 0
        ours = {role: roots for role, roots in target.pids.items() if role != "upstream"}
        started = [pid for roots in ours.values() for pid in roots]
    assert not [pid for pid in started if Path(f"/proc/{pid}").exists()]


def test_the_noop_floor_proves_its_path_only_with_grpc_health(
    upstream: tuple[Stack, int], tmp_path: Path
) -> None:
    """extproc_noop through real Envoy: without grpc.health.v1 the relay_grpc cluster marks the
    no-op unhealthy and Envoy fails open, which the check refuses, saying why; with health
    the no-op answers every body chunk and the check passes."""
    stack, port = upstream
    pid = stack.children[0].process.pid
    name = "extproc_noop"
    broken_noop = running(name, port, pid, tmp_path / "broken", noop_args=("--no-health",))
    with broken_noop as target, pytest.raises(proof.PathNotProcessed) as broken:
        check(name, target)
    assert "extproc_noop did not process its path (noop)" in str(broken.value)
    assert "failure_mode_allowed" in str(broken.value)
    with running(name, port, pid, tmp_path / "healthy") as target:
        point = check(name, target)
    evidence = point["proof"]
    assert evidence["problems"] == [] and evidence["processor_body_messages"] > 0
    assert evidence["ext_proc"]["streams_started"] >= evidence["requests"] > 0
