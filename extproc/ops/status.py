"""`stream-relay status`: a one-screen summary of a running relay node, read from its /metrics.

For people without Grafana at hand: two scrapes `interval` seconds apart give the rates
(events/s); everything else is the second scrape. Only the relay's own metrics are read,
so it works against any relay node, under `stream-relay up` or docker compose alike. Without
a URL it reads the first node of the stack this user's `stream-relay up` runs (its state
file, extproc/ops/stack_state.py), else `serve`'s default port.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from extproc.node.config import DEFAULT_HOST, DEFAULT_HTTP_PORT
from extproc.ops.stack_state import running_stacks
from extproc.vocabulary import ENDED, DropReason, ReaderProtocol, ResumeOutcome, WritePath

DEFAULT_METRICS_URL = f"http://{DEFAULT_HOST}:{DEFAULT_HTTP_PORT}/metrics"  # `serve`'s default
DEFAULT_INTERVAL_S = 1.0
FETCH_TIMEOUT_S = 5.0

# sample name -> every (labels, value) of it
Samples = dict[str, list[tuple[dict[str, str], float]]]


class StatusError(Exception):
    """The metrics could not be read; the message is one line for the user."""


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def fetch(url: str, timeout: float = FETCH_TIMEOUT_S) -> Samples:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise StatusError(f"cannot read relay metrics at {url}: HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot read relay metrics at {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read relay metrics at {url}: {exc}") from None
    try:
        samples = parse(text)
    except ValueError as exc:
        raise StatusError(f"{url} is not Prometheus text format: {exc}") from None
    if not any(name.startswith("relay_") for name in samples):
        raise StatusError(f"no relay metrics at {url}: is it a relay node's /metrics?")
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    return sum(
        value
        for sample_labels, value in samples.get(name, [])
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


def by_label(
    samples: Samples, name: str, label: str, known: tuple[str, ...] = ()
) -> dict[str, float]:
    """`name` summed per value of `label`; `known` values first, at 0 when absent."""
    values = dict.fromkeys(known, 0.0)
    for sample_labels, value in samples.get(name, []):
        key = sample_labels.get(label, "")
        values[key] = values.get(key, 0.0) + value
    return values


@dataclass(frozen=True)
class Status:
    url: str
    interval_s: float
    sessions_active: dict[str, float]
    sessions_started: float
    sessions_ended: dict[str, float]
    generations_running: float
    readers: dict[str, float]
    events_per_s: float
    events_total: float
    disconnects: float
    reconnects: float
    resumes: dict[str, float]
    store_bytes: float
    store_capacity_bytes: float
    store_sessions: float
    store_drops: dict[str, float]
    tokens: dict[str, float]


def _rate(before: Samples, after: Samples, name: str, elapsed: float) -> float:
    # A counter that went down means the node restarted in between: no rate to tell.
    return max(0.0, total(after, name) - total(before, name)) / elapsed if elapsed > 0 else 0.0


def summarize(before: Samples, after: Samples, elapsed: float, url: str) -> Status:
    return Status(
        url=url,
        interval_s=elapsed,
        sessions_active=by_label(after, "relay_sessions_active", "write_path", tuple(WritePath)),
        sessions_started=total(after, "relay_sessions_started_total"),
        sessions_ended=by_label(after, "relay_sessions_ended_total", "state", ENDED),
        generations_running=total(after, "relay_generations_running"),
        readers=by_label(after, "relay_readers_active", "protocol", tuple(ReaderProtocol)),
        events_per_s=_rate(before, after, "relay_events_total", elapsed),
        events_total=total(after, "relay_events_total"),
        disconnects=total(after, "relay_client_disconnects_total"),
        reconnects=total(after, "relay_client_reconnects_total"),
        resumes=by_label(after, "relay_resumes_total", "outcome", tuple(ResumeOutcome)),
        store_bytes=total(after, "relay_store_bytes"),
        store_capacity_bytes=total(after, "relay_store_capacity_bytes"),
        store_sessions=total(after, "relay_store_sessions"),
        store_drops=by_label(
            after, "relay_store_dropped_sessions_total", "reason", tuple(DropReason)
        ),
        tokens=by_label(after, "relay_tokens_total", "kind", ("prompt", "completion")),
    )


def _n(value: float) -> str:
    return f"{value:.0f}"


def _pairs(values: dict[str, float]) -> str:
    return ", ".join(f"{key} {_n(value)}" for key, value in values.items())


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def render(status: Status) -> str:
    """The summary: one line per topic, labelled in a left column."""
    used = status.store_bytes / status.store_capacity_bytes if status.store_capacity_bytes else 0.0
    readers = sum(status.readers.values())
    rows = [
        (
            "sessions",
            f"{_n(sum(status.sessions_active.values()))} open ({_pairs(status.sessions_active)}), "
            f"{_n(status.sessions_started)} started, "
            f"{_n(sum(status.sessions_ended.values()))} ended ({_pairs(status.sessions_ended)})",
        ),
        ("generations", f"{_n(status.generations_running)} detached upstream calls running"),
        ("readers", f"{_n(readers)} attached: {_pairs(status.readers)}"),
        (
            "events",
            f"{status.events_per_s:.1f}/s appended, {_n(status.events_total)} in total",
        ),
        (
            "clients",
            f"{_n(status.disconnects)} disconnects, {_n(status.reconnects)} reconnects",
        ),
        ("resumes", _pairs(status.resumes)),
        (
            "store",
            f"{_size(status.store_bytes)} of {_size(status.store_capacity_bytes)} "
            f"({used:.1%}), {_n(status.store_sessions)} sessions, "
            f"{_n(status.store_drops.get(DropReason.EVICTED, 0.0))} evicted, "
            f"{_n(status.store_drops.get(DropReason.EXPIRED, 0.0))} expired",
        ),
        ("tokens", _pairs(status.tokens)),
    ]
    header = f"stream-relay status  {status.url}  (rates over {status.interval_s:.1f}s)"
    return "\n".join([header, *(f"  {name:<12} {text}" for name, text in rows)])


def collect(url: str, interval_s: float) -> Status:
    """Two scrapes `interval_s` apart, summarized."""
    before = fetch(url)
    first = time.monotonic()
    time.sleep(interval_s)  # the measuring window of the rates, chosen by the user
    after = fetch(url)
    return summarize(before, after, time.monotonic() - first, url)


def default_url() -> str:
    """The first relay node of the one stack `up` runs for this user, else serve's default."""
    stacks = running_stacks()
    if not stacks:
        return DEFAULT_METRICS_URL
    if len(stacks) > 1:
        listed = ", ".join(f"{s.metrics_urls[0]} (pid {s.pid})" for s in stacks)
        raise StatusError(f"{len(stacks)} stacks are up; pass --metrics-url, one of: {listed}")
    return stacks[0].metrics_urls[0]


def run(
    url: str | None = None,
    interval_s: float = DEFAULT_INTERVAL_S,
    *,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] = print,
) -> int:
    """Print the summary; an unreadable endpoint gives one line on `err` and status 1."""
    try:
        status = collect(url or default_url(), interval_s)
    except StatusError as exc:
        err(f"stream-relay: {exc}")
        return 1
    out(render(status))
    return 0
