"""Proof that a scenario's traffic went through the path it is named after, read around every
load generator run: a number is reported only for a path that was exercised.

Why: a processor that Envoy's health check marks unhealthy is skipped (`failure_mode_allow`),
and the run then measures plain Envoy under the processor's name. So every run reads Envoy's
ext_proc counters (admin `/stats`), the processor's own count of the body messages it
answered (the relay's `/metrics`, the no-op's `/stats`), the events the relay logged, and the
share of events that reached the client tagged; `problems` says in words what is missing.
"""

from __future__ import annotations

import json
import re
import urllib.request
from dataclasses import dataclass

from stream_relay_bench.plan import Json
from stream_relay_bench.scenarios import DETACHED, INLINE, NOOP, PLAIN, Target

# Envoy's ext_proc filter counters (http.<stat_prefix>.ext_proc.<name>), summed over prefixes.
EXT_PROC_STATS = ("streams_started", "failure_mode_allowed", "message_timeouts", "streams_failed")
_BODY_MESSAGES = re.compile(
    r'^relay_processor_message_seconds_count\{phase="response_body"\} (\S+)$', re.M
)
_EVENTS_LOGGED = re.compile(r"^relay_events_total\{[^}]*\} (\S+)$", re.M)


class PathNotProcessed(RuntimeError):
    """A scenario's traffic did not go through its path: its numbers would be another's."""


@dataclass(frozen=True)
class Counters:
    ext_proc: dict[str, int]  # Envoy's filter counters; {} when there is no Envoy
    body_messages: int  # response body messages the processor(s) answered
    events_logged: int  # events the relay node(s) appended to session logs


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def envoy_ext_proc(admin_url: str) -> dict[str, int]:
    stats = json.loads(_get(f"{admin_url}/stats?format=json&filter=%5C.ext_proc%5C."))["stats"]
    out = dict.fromkeys(EXT_PROC_STATS, 0)
    for stat in stats:
        name = str(stat.get("name", "")).rsplit(".", 1)[-1]
        if name in out and isinstance(stat.get("value"), int):
            out[name] += stat["value"]
    return out


def snapshot(target: Target) -> Counters:
    ext_proc = envoy_ext_proc(target.admin_url) if target.admin_url else {}
    if target.path == NOOP:
        answered = json.loads(_get(target.metrics_url))["answered"]
        return Counters(ext_proc, int(answered["response_body"]), 0)
    body = logged = 0.0
    if target.path in (INLINE, DETACHED):
        for url in target.metrics_urls or (target.metrics_url,):
            text = _get(url)
            body += sum(float(v) for v in _BODY_MESSAGES.findall(text))
            logged += sum(float(v) for v in _EVENTS_LOGGED.findall(text))
    return Counters(ext_proc, int(body), int(logged))


def evidence(target: Target, before: Counters, after: Counters, result: Json) -> Json:
    """What happened between two snapshots around one load generator run, and what it lacks."""
    events = int(result["events_all"])
    proof: Json = {
        "path": target.path,
        "requests": int(result["requests"]),
        "events": events,
        "tagged_fraction": result["tagged"] / events if events else 0.0,
        "ext_proc": {k: v - before.ext_proc.get(k, 0) for k, v in after.ext_proc.items()},
        "processor_body_messages": after.body_messages - before.body_messages,
        "events_logged": after.events_logged - before.events_logged,
    }
    proof["problems"] = problems(proof)
    return proof


def problems(proof: Json) -> list[str]:
    """Why this run's traffic did not (all) go through its path; [] when it did."""
    path, events, tagged = proof["path"], proof["events"], proof["tagged_fraction"]
    if events == 0:
        return ["the client received no events"]
    if path == PLAIN:
        if tagged > 0:
            return [f"{tagged:.0%} of events carry id: lines, but no relay is in this path"]
        return []
    out: list[str] = []
    ext_proc = proof["ext_proc"]
    if not ext_proc:
        out.append("Envoy's ext_proc counters were not read")
    else:
        skipped = ext_proc["failure_mode_allowed"]
        if skipped:
            out.append(
                f"Envoy went around the processor {skipped} times (ext_proc "
                "failure_mode_allowed): it was unreachable or the relay_grpc cluster's health "
                "check marked it unhealthy (does it serve grpc.health.v1.Health?)"
            )
        if ext_proc["message_timeouts"]:
            out.append(f"{ext_proc['message_timeouts']} ext_proc messages timed out")
        if ext_proc["streams_started"] < proof["requests"]:
            out.append(
                f"Envoy started {ext_proc['streams_started']} ext_proc streams for "
                f"{proof['requests']} requests"
            )
    who = "the no-op processor" if path == NOOP else "the relay"
    if path in (NOOP, INLINE) and proof["processor_body_messages"] <= 0:
        out.append(f"{who} answered {proof['processor_body_messages']} body messages")
    if path == DETACHED and proof["events_logged"] <= 0:
        out.append("the relay logged no events")
    if path in (INLINE, DETACHED) and tagged < 1.0:
        out.append(f"only {tagged:.1%} of events reached the client tagged (must be all)")
    return out


def verify(name: str, point: Json) -> None:
    """Raise PathNotProcessed naming the scenario and every reason, if there is one."""
    proof = point["proof"]
    if proof["problems"]:
        raise PathNotProcessed(
            f"{name} did not process its path ({proof['path']}): " + "; ".join(proof["problems"])
        )
