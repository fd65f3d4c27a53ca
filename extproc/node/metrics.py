"""The relay's Prometheus metrics: one object, one registry, passed explicitly (no globals).

Everything counted per event or per ext_proc message is a plain Python number (ints, and
histograms as bucket lists) updated without a lock: the relay node runs on one event loop, and
the scrape runs on that loop too. A collector turns them into metric families at scrape time,
so the hot path pays an attribute increment, not prometheus_client's lock per call. Gauges
that count something held elsewhere (store bytes, running generations) are read from it at
scrape time.

Names follow Prometheus conventions (base units, `_total`, `_seconds`, `_bytes`); labels are
bounded enums from `extproc.vocabulary`, never a session id. Model names come from upstream
usage reports, so they are capped: past MAX_MODELS distinct names, "other".
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from extproc.session.usage import Usage
from extproc.vocabulary import (
    ENDED,
    DropReason,
    EndState,
    FenceReason,
    ReaderProtocol,
    ResumeOutcome,
    StoreOp,
    WritePath,
)

MAX_MODELS = 64
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MESSAGE_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)
COUNT_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)
# The ProcessingRequest oneof names: the `phase` label of relay_processor_message_seconds.
MESSAGE_PHASES = (
    "request_headers",
    "response_headers",
    "request_body",
    "response_body",
    "request_trailers",
    "response_trailers",
)
INLINE_CLIENT = "inline"  # relay_client_disconnects_total: an inline client gone mid-stream


class Histogram:
    """Bucket counts and a sum; `le` buckets as Prometheus has them, cumulated at scrape."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class AppendStats:
    """One write path's per-append numbers (appends are the hot path)."""

    __slots__ = ("event_bytes", "event_gap", "events", "first_event")

    def __init__(self) -> None:
        self.events = 0
        self.event_bytes = 0
        self.first_event = Histogram(LATENCY_BUCKETS)
        self.event_gap = Histogram(GAP_BUCKETS)


class RelayMetrics:
    """Every metric the relay node exports. Tests make their own registry per node."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.appends = {path: AppendStats() for path in WritePath}
        self.processor_message = {phase: Histogram(MESSAGE_BUCKETS) for phase in MESSAGE_PHASES}
        self._started = dict.fromkeys(WritePath, 0)
        self._ended = {(path, state): 0 for path in WritePath for state in ENDED}
        self._connects = dict.fromkeys(ReaderProtocol, 0)
        self._detaches = dict.fromkeys(ReaderProtocol, 0)
        self._delivered = dict.fromkeys(ReaderProtocol, 0)
        self._reconnects = dict.fromkeys(ReaderProtocol, 0)
        self._disconnects: dict[str, int] = dict.fromkeys([*ReaderProtocol, INLINE_CLIENT], 0)
        self._resumes = dict.fromkeys(ResumeOutcome, 0)
        self._drops = dict.fromkeys(DropReason, 0)
        self._store_errors = dict.fromkeys(StoreOp, 0)
        self._tokens: dict[tuple[str, str], int] = {}
        self._models: set[str] = set()
        self._producers_lost = 0
        self._fenced = dict.fromkeys(FenceReason, 0)
        self._grace_cancellations = 0
        self.replay_depth = Histogram(COUNT_BUCKETS)
        self.reader_lag = Histogram(COUNT_BUCKETS)
        self.session_readers = Histogram(COUNT_BUCKETS)
        self.store_up = 1
        self.store_capacity_bytes = 0
        # Read at scrape time from whoever holds the thing counted; the node wires them.
        self.store_bytes: Callable[[], float] = lambda: 0
        self.store_sessions: Callable[[], float] = lambda: 0
        self.store_tombstones: Callable[[], float] = lambda: 0
        self.replication_pending: Callable[[], float] = lambda: 0
        self.generations_running: Callable[[], float] = lambda: 0
        self.reader_lag_max: Callable[[], float] = lambda: 0
        self.registry.register(self)  # a collector: it has collect()

    # Sessions (the stores call these: they see every start, append and end).

    def session_started(self, path: WritePath) -> None:
        self._started[path] += 1

    def session_ended(self, path: WritePath, state: EndState, peak_readers: int) -> None:
        self._ended[path, state] += 1
        self.session_readers.observe(peak_readers)

    def count_tokens(self, usage: Usage) -> None:
        model = usage.model
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                model = "other"
            else:
                self._models.add(model)
        for kind, count in (("prompt", usage.prompt), ("completion", usage.completion)):
            if count:
                self._tokens[model, kind] = self._tokens.get((model, kind), 0) + count

    # Readers.

    def reader_attached(self, protocol: ReaderProtocol, *, replayed: int) -> None:
        self._connects[protocol] += 1
        self.replay_depth.observe(replayed)

    def reader_detached(self, protocol: ReaderProtocol, *, cut_short: bool) -> None:
        self._detaches[protocol] += 1
        if cut_short:
            self._disconnects[protocol] += 1

    def reader_wrote(self, protocol: ReaderProtocol, events: int, lag: int) -> None:
        """A reader was sent a batch: count it and how far behind the head it still is."""
        self._delivered[protocol] += events
        self.reader_lag.observe(lag)

    def inline_client_gone(self) -> None:
        self._disconnects[INLINE_CLIENT] += 1

    def resumed(self, outcome: ResumeOutcome, protocol: ReaderProtocol) -> None:
        self._resumes[outcome] += 1
        if outcome is ResumeOutcome.HIT:
            self._reconnects[protocol] += 1

    # The store and the detached path.

    def store_dropped(self, reason: DropReason) -> None:
        self._drops[reason] += 1

    def store_failed(self, op: StoreOp) -> None:
        self._store_errors[op] += 1
        self.store_up = 0

    def producer_lost(self) -> None:
        self._producers_lost += 1

    def writer_fenced(self, reason: FenceReason) -> None:
        self._fenced[reason] += 1

    def grace_cancelled(self) -> None:
        self._grace_cancellations += 1

    # The scrape.

    def collect(self) -> Iterator[Metric]:
        paths = list(WritePath)
        yield _counter("relay_sessions_started", "Sessions started", "write_path", self._started)
        ended = CounterMetricFamily(
            "relay_sessions_ended", "Sessions ended", labels=["write_path", "state"]
        )
        for (path, state), value in self._ended.items():
            ended.add_metric([path, state], value)
        yield ended
        active = GaugeMetricFamily(
            "relay_sessions_active", "Sessions still open", labels=["write_path"]
        )
        for path in paths:
            done = sum(self._ended[path, state] for state in ENDED)
            active.add_metric([path], self._started[path] - done)
        yield active
        yield _counter(
            "relay_events",
            "Events appended to session logs",
            "write_path",
            {p: self.appends[p].events for p in paths},
        )
        yield _counter(
            "relay_event_bytes",
            "Bytes of events appended",
            "write_path",
            {p: self.appends[p].event_bytes for p in paths},
        )
        yield _histogram(
            "relay_time_to_first_event_seconds",
            "From the upstream's response headers to the session's first event",
            "write_path",
            {p: self.appends[p].first_event for p in paths},
        )
        yield _histogram(
            "relay_event_gap_seconds",
            "Time between consecutive events of a session",
            "write_path",
            {p: self.appends[p].event_gap for p in paths},
        )
        yield _histogram(
            "relay_processor_message_seconds",
            "Time the processor spends on one ext_proc message",
            "phase",
            self.processor_message,
        )
        readers = GaugeMetricFamily(
            "relay_readers_active", "Readers attached to sessions", labels=["protocol"]
        )
        for protocol in ReaderProtocol:
            readers.add_metric([protocol], self._connects[protocol] - self._detaches[protocol])
        yield readers
        yield _counter("relay_reader_connects", "Readers that attached", "protocol", self._connects)
        yield _counter(
            "relay_client_disconnects",
            "Clients gone before their session ended (readers, and inline clients)",
            "protocol",
            self._disconnects,
        )
        yield _counter(
            "relay_client_reconnects",
            "Clients back with an event id (a resume that found its session)",
            "protocol",
            self._reconnects,
        )
        yield _counter(
            "relay_events_delivered", "Events written to readers", "protocol", self._delivered
        )
        yield _counter("relay_resumes", "Resume attempts by outcome", "outcome", self._resumes)
        yield _histogram(
            "relay_resume_replay_events",
            "Events replayed from the log when a reader resumed or joined late",
            None,
            {"": self.replay_depth},
        )
        yield _histogram(
            "relay_reader_lag_events",
            "How many events a reader was behind the log's head when it was written to",
            None,
            {"": self.reader_lag},
        )
        yield _gauge(
            "relay_reader_lag_max_events",
            "Events the furthest-behind attached reader still has to get (also a stuck one)",
            self.reader_lag_max(),
        )
        yield _histogram(
            "relay_session_readers",
            "Most readers a session had at once (multicast fan-out), observed at its end",
            None,
            {"": self.session_readers},
        )
        yield _gauge("relay_store_bytes", "Bytes held by session logs", self.store_bytes())
        yield _gauge(
            "relay_store_capacity_bytes", "The store's byte bound", self.store_capacity_bytes
        )
        yield _gauge("relay_store_sessions", "Sessions held", self.store_sessions())
        yield _gauge(
            "relay_store_tombstones",
            "Ids of dropped sessions remembered (a reader gets 410, not 404); bounded",
            self.store_tombstones(),
        )
        yield _counter(
            "relay_store_dropped_sessions",
            "Sessions the store let go: evicted (bytes) or expired (TTL)",
            "reason",
            self._drops,
        )
        yield _gauge(
            "relay_store_up",
            "1 while the session store answers (always 1 for the memory store)",
            self.store_up,
        )
        yield _counter(
            "relay_store_errors",
            "Failed calls to a shared store, by operation",
            "op",
            self._store_errors,
        )
        yield _gauge(
            "relay_replication_pending_sessions",
            "Sessions of this node not yet fully copied to the shared store",
            self.replication_pending(),
        )
        yield _counter(
            "relay_producer_lost",
            "Sessions ended failed because the node writing them stopped renewing its lease",
            None,
            {"": self._producers_lost},
        )
        yield _counter(
            "relay_writer_fenced",
            "Sessions this node stopped writing because Redis holds them under another owner: "
            "its lease lapsed, or another node ended them; their clients here were cut",
            "reason",
            self._fenced,
        )
        yield _counter(
            "relay_generation_grace_cancellations",
            "Detached generations cancelled because no reader came back within the grace",
            None,
            {"": self._grace_cancellations},
        )
        yield _gauge(
            "relay_generations_running",
            "Detached upstream calls in progress",
            self.generations_running(),
        )
        tokens = CounterMetricFamily(
            "relay_tokens",
            "Tokens the upstream reported in its usage chunks",
            labels=["model", "kind"],
        )
        for (model, kind), value in self._tokens.items():
            tokens.add_metric([model, kind], value)
        yield tokens


_Label = TypeVar("_Label", bound=str)  # a label value: plain text or one of the vocabulary's


def _counter(name: str, doc: str, label: str | None, values: Mapping[_Label, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label] if label else None)
    for key, value in values.items():
        family.add_metric([key] if label else [], value)
    return family


def _gauge(name: str, doc: str, value: float) -> Metric:
    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, label: str | None, values: dict[str, Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label] if label else None)
    for key, histogram in values.items():
        family.add_metric([key] if label else [], histogram.cumulative(), histogram.sum)
    return family
