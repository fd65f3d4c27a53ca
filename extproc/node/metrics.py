"""The relay's Prometheus metrics: one object, one registry, passed explicitly (no globals).

Names follow Prometheus conventions (base units, `_total`, `_seconds`, `_bytes`); labels are
bounded enums (write path, state, protocol, outcome), never a session id. Model names come
from upstream usage chunks, so they are capped: past MAX_MODELS distinct names, "other".
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MAX_MODELS = 64
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_MESSAGE_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1)
_COUNT_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)

RESUME_OUTCOMES = ("hit", "unknown", "expired", "forbidden", "malformed")
WRITE_PATHS = ("inline", "detached")
END_STATES = ("done", "cancelled", "failed")
# `http`: the original endpoint (resumes, a detached generation's first client).
READER_PROTOCOLS = ("http", "sse", "ws", "grpc")
STORE_OPS = ("sync", "lookup", "follow", "heartbeat", "cancel")  # shared-store calls


@dataclass(frozen=True)
class AppendMetrics:
    """One write path's per-append children, looked up once: appends are the hot path."""

    events: Counter
    event_bytes: Counter
    first_event: Histogram
    event_gap: Histogram


class RelayMetrics:
    """Every metric the relay node exports. Tests make their own registry per node."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.sessions_started = Counter(
            "relay_sessions_started_total", "Sessions started", ["write_path"], registry=r
        )
        self.sessions_ended = Counter(
            "relay_sessions_ended_total", "Sessions ended", ["write_path", "state"], registry=r
        )
        self.sessions_active = Gauge(
            "relay_sessions_active", "Sessions still open", ["write_path"], registry=r
        )
        self.events = Counter(
            "relay_events_total", "Events appended to session logs", ["write_path"], registry=r
        )
        self.event_bytes = Counter(
            "relay_event_bytes_total", "Bytes of events appended", ["write_path"], registry=r
        )
        self.first_event = Histogram(
            "relay_time_to_first_event_seconds",
            "From the upstream's response headers to the session's first event",
            ["write_path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.event_gap = Histogram(
            "relay_event_gap_seconds",
            "Time between consecutive events of a session",
            ["write_path"],
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self.processor_message = Histogram(
            "relay_processor_message_seconds",
            "Time the processor spends on one ext_proc message",
            ["phase"],
            buckets=_MESSAGE_BUCKETS,
            registry=r,
        )
        self.readers_active = Gauge(
            "relay_readers_active", "Readers attached to sessions", ["protocol"], registry=r
        )
        self.reader_connects = Counter(
            "relay_reader_connects_total", "Readers that attached", ["protocol"], registry=r
        )
        self.client_disconnects = Counter(
            "relay_client_disconnects_total",
            "Clients gone before their session ended (readers, and inline clients)",
            ["protocol"],
            registry=r,
        )
        self.client_reconnects = Counter(
            "relay_client_reconnects_total",
            "Clients back with an event id (a resume that found its session)",
            ["protocol"],
            registry=r,
        )
        self.events_delivered = Counter(
            "relay_events_delivered_total", "Events written to readers", ["protocol"], registry=r
        )
        self.resumes = Counter(
            "relay_resumes_total", "Resume attempts by outcome", ["outcome"], registry=r
        )
        self.replay_depth = Histogram(
            "relay_resume_replay_events",
            "Events replayed from the log when a reader resumed or joined late",
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.reader_lag = Histogram(
            "relay_reader_lag_events",
            "How many events a reader was behind the log's head when it was written to",
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.reader_lag_max = Gauge(
            "relay_reader_lag_max_events",
            "Events the furthest-behind attached reader still has to get (also a stuck one)",
            registry=r,
        )
        self.session_readers = Histogram(
            "relay_session_readers",
            "Most readers a session had at once (multicast fan-out), observed at its end",
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.store_bytes = Gauge("relay_store_bytes", "Bytes held by session logs", registry=r)
        self.store_capacity_bytes = Gauge(
            "relay_store_capacity_bytes", "The store's byte bound", registry=r
        )
        self.store_sessions = Gauge("relay_store_sessions", "Sessions held", registry=r)
        self.store_drops = Counter(
            "relay_store_dropped_sessions_total",
            "Sessions the store let go: evicted (bytes) or expired (TTL)",
            ["reason"],
            registry=r,
        )
        self.store_up = Gauge(
            "relay_store_up",
            "1 while the session store answers (always 1 for the memory store)",
            registry=r,
        )
        self.store_errors = Counter(
            "relay_store_errors_total",
            "Failed calls to a shared store, by operation",
            ["op"],
            registry=r,
        )
        self.replication_pending = Gauge(
            "relay_replication_pending_sessions",
            "Sessions of this node not yet fully copied to the shared store",
            registry=r,
        )
        self.producers_lost = Counter(
            "relay_producer_lost_total",
            "Sessions ended failed because the node writing them stopped renewing its lease",
            registry=r,
        )
        self.grace_cancellations = Counter(
            "relay_generation_grace_cancellations_total",
            "Detached generations cancelled because no reader came back within the grace",
            registry=r,
        )
        self.generations_running = Gauge(
            "relay_generations_running", "Detached upstream calls in progress", registry=r
        )
        self.tokens = Counter(
            "relay_tokens_total",
            "Tokens the upstream reported in its usage chunks",
            ["model", "kind"],
            registry=r,
        )
        self._models: set[str] = set()
        # Bounded label values exist from the start, at 0: dashboards show 0, not "no data",
        # and rate() sees the first increment.
        for outcome in RESUME_OUTCOMES:
            self.resumes.labels(outcome)
        self.appends = {
            path: AppendMetrics(
                self.events.labels(path),
                self.event_bytes.labels(path),
                self.first_event.labels(path),
                self.event_gap.labels(path),
            )
            for path in WRITE_PATHS
        }
        for path in WRITE_PATHS:
            for metric in (
                self.sessions_started,
                self.sessions_active,
                self.events,
                self.event_bytes,
            ):
                metric.labels(path)
            for state in END_STATES:
                self.sessions_ended.labels(path, state)
        for protocol in READER_PROTOCOLS:
            for metric in (
                self.readers_active,
                self.reader_connects,
                self.client_disconnects,
                self.client_reconnects,
                self.events_delivered,
            ):
                metric.labels(protocol)
        self.client_disconnects.labels("inline")
        for reason in ("evicted", "expired"):
            self.store_drops.labels(reason)
        for op in STORE_OPS:
            self.store_errors.labels(op)
        self.store_up.set(1)

    def reader_wrote(self, protocol: str, events: int, lag: int) -> None:
        """A reader was sent a batch: count it and how far behind the head it still is."""
        self.events_delivered.labels(protocol).inc(events)
        self.reader_lag.observe(lag)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        if model not in self._models:
            if len(self._models) >= MAX_MODELS:
                model = "other"
            else:
                self._models.add(model)
        if prompt:
            self.tokens.labels(model, "prompt").inc(prompt)
        if completion:
            self.tokens.labels(model, "completion").inc(completion)
