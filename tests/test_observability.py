"""Dashboards and alerts against a real Prometheus scraping a live stack.

A real Prometheus (Debian's package; scripts/test installs it) scrapes the relay's /metrics and
Envoy's /stats/prometheus every second, with dashboards/prometheus/alerts.yml loaded, while
the test drives traffic: complete sessions with usage, readers, drops, resumes that hit and
miss, a store filled past 90% with evictions, and finally the relay node killed so Envoy fails
open. Then every dashboard query and alert expression goes to Prometheus's query API: all must
parse, the ones this traffic exercises must return series, and every metric they name must be
exported by the relay or Envoy.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import make_stack
from test_detached import open_stream, read_events
from test_e2e import chat, events_of

from extproc.ops.supervisor import Stack, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "dashboards" / "grafana" / "stream-relay.json"
ALERTS = ROOT / "dashboards" / "prometheus" / "alerts.yml"
COMPOSE_PROMETHEUS = ROOT / "dashboards" / "prometheus" / "prometheus.yml"
# The jobs of dashboards/prometheus/prometheus.yml (test_compose checks they agree): the
# dashboards and alerts may rely on these job names.
SCRAPE_JOBS = {"relay": "/metrics", "envoy": "/stats/prometheus"}
# Grafana's built-in variables, as Grafana would expand them for a 5-minute view.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "5m"}
STORE_BYTES = 1024 * 1024  # the smallest store the relay accepts: easy to fill
DEADLINE_S = 30.0

# Dashboard queries that return nothing after this test's traffic, with the reason. Every
# other panel query must return at least one series.
DASHBOARD_NOT_EXERCISED: dict[str, str] = {}
# Panels whose value must be above zero somewhere after the traffic, not only present.
DASHBOARD_POSITIVE = {
    "Events appended/s",
    "Event bytes/s",
    "Time to first event",
    "Inter-event gap",
    "Client disconnects/s",
    "Resume outcomes/s",
    "Resume miss ratio",
    "Tokens/s",
    "Store used",
    "Store size",
    "ext_proc streams/s",
}
# Alerts the traffic drives over their threshold: their expression must return series at the
# moment named (after the traffic, or after the relay node was killed).
ALERTS_EXERCISED = {
    "RelayClientDisconnectSpike": "traffic",
    "RelayResumeMissRate": "traffic",
    "RelayStoreNearCapacity": "traffic",
    "RelayExtProcFailingOpen": "relay_down",
    "RelayExtProcErrors": "relay_down",
    "RelayTargetDown": "relay_down",
}
SEVERITIES = {"critical", "warning", "info"}


def wait_for(what: str, check: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling other processes' state, bounded by the deadline


def prometheus_binaries() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        pytest.fail("prometheus/promtool not on PATH: scripts/test installs Debian's prometheus")
    return prometheus, promtool


def prometheus_config(targets: dict[str, str], *, interval: str = "1s") -> dict[str, object]:
    """The compose scrape jobs, pointed at `targets` (job -> host:port), with the alert rules."""
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": path,
                "static_configs": [{"targets": [targets[job]]}],
            }
            for job, path in SCRAPE_JOBS.items()
        ],
    }


def write_prometheus_config(workdir: Path, stack: Stack) -> Path:
    host_port = {
        "relay": stack.relay_http_url.removeprefix("http://"),
        "envoy": stack.admin_url.removeprefix("http://"),
    }
    path = workdir / "prometheus.yml"
    path.write_text(json.dumps(prometheus_config(host_port), indent=2))  # JSON is YAML
    return path


class Prometheus:
    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for("prometheus to be ready", self._ready)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str, at: float | None = None) -> dict[str, object]:
        params = {"query": expr, "time": f"{time.time() if at is None else at:.3f}"}
        return dict(httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json())

    def series(self, expr: str, at: float | None = None) -> list[dict[str, object]]:
        answer = self.query(expr, at)
        assert answer["status"] == "success", (expr, answer)
        data = answer["data"]
        assert isinstance(data, dict)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": result}]
        assert isinstance(result, list)
        return result

    def scraped_since(self, job: str, since: float) -> bool:
        samples = self.series(f'timestamp(up{{job="{job}"}})')
        return any(float(s["value"][1]) >= since for s in samples)  # type: ignore[index]

    def wait_scraped_after(self, since: float) -> None:
        wait_for(
            "Prometheus to scrape every target",
            lambda: all(self.scraped_since(job, since) for job in SCRAPE_JOBS),
        )

    def get(self, path: str) -> dict[str, object]:
        answer = httpx.get(f"{self.url}{path}", timeout=10).json()
        assert answer["status"] == "success", answer
        return dict(answer["data"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- what the relay and Envoy export ------------------------------------------------------

_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("", "_count", "_sum")}


def exported_names(text: str) -> set[str]:
    """Every sample name an exposition declares or carries (a histogram: _bucket/_count/_sum)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.update(name + suffix for suffix in _SUFFIXES.get(kind.strip(), ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


# -- the metric names a PromQL expression uses ----------------------------------------------

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left"}
_KEYWORDS |= {"group_right", "offset", "bool", "inf", "nan", "atan2"}
_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}  # made by Prometheus


def metric_names(expr: str) -> set[str]:
    """Identifiers used as series selectors: followed by `{`, `[`, whitespace, `)` or the end,
    never by `(` (functions, aggregations), less keywords; strings, label matchers, grouping
    label lists and range durations are removed first."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = re.findall(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=[{\[\s)]|$)(?!\s*\()", text)
    return {name for name in found if name.lower() not in _KEYWORDS}


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (instance, le) (rate(a_bucket{x="y z", w=~"q"}[5m])))'
        " > 100 unless sum without (le) (b) / on(job) group_left(k) c offset 5m and up == 0"
        ' or sum (d_total{e = "f"}[$__rate_interval])'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c", "up", "d_total"}


# -- the dashboard and the rules -------------------------------------------------------------


def dashboard() -> dict[str, object]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, object]]:
    found = dashboard()["panels"]
    assert isinstance(found, list)
    return [p for p in found if p["type"] != "row"]


def panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr with Grafana's variables expanded) for every panel target."""
    queries = []
    for panel in panels():
        for target in panel["targets"]:  # type: ignore[attr-defined]
            expr = str(target["expr"])
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr!r}"
            queries.append((str(panel["title"]), str(target["refId"]), expr))
    return queries


def test_dashboard_is_current_grafana_with_a_datasource_variable() -> None:
    board = dashboard()
    assert board["uid"] == "stream-relay"
    assert isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 39
    assert board["id"] is None  # provisioned: Grafana assigns the id
    variables = board["templating"]["list"]  # type: ignore[index]
    datasource = [v for v in variables if v["name"] == "datasource"]
    assert datasource == [datasource[0]]
    assert datasource[0]["type"] == "datasource"
    assert datasource[0]["query"] == "prometheus"
    every = board["panels"]
    assert isinstance(every, list)
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for panel in panels():
        title = panel["title"]
        assert panel["type"] in ("timeseries", "stat"), title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        grid = panel["gridPos"]
        assert isinstance(grid, dict)
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, title
        targets = panel["targets"]
        assert isinstance(targets, list)
        assert targets, title
        for target in targets:
            assert target["datasource"] == panel["datasource"], title
    exprs = "\n".join(expr for _, _, expr in panel_queries())
    # What the issue asks the dashboard to show, by the metric behind it.
    for needed in (
        "relay_events_total",  # throughput
        "relay_sessions_active",  # active streams
        "relay_readers_active",  # readers
        "relay_client_disconnects_total",
        "relay_client_reconnects_total",
        "relay_resumes_total",
        "relay_reader_lag_events_bucket",
        "envoy_cluster_upstream_flow_control_paused_reading_total",  # backpressure
        "relay_store_bytes",
        "relay_store_dropped_sessions_total",  # evictions
        "envoy_http_ext_proc_failure_mode_allowed",
        "envoy_http_ext_proc_streams_failed",
        "envoy_http_ext_proc_message_timeouts",
        "relay_tokens_total",
    ):
        assert needed in exprs, needed
    for histogram in ("relay_time_to_first_event_seconds", "relay_event_gap_seconds"):
        for quantile in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le) (rate({histogram}_bucket" in exprs


# -- the live run ----------------------------------------------------------------------------


def relay_samples(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(stack.metrics_url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def relay_value(stack: Stack, name: str, **labels: str) -> float:
    return relay_samples(stack).get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class Observed:
    stack: Stack
    prometheus: Prometheus
    sessions: list[str]
    after_traffic: float  # a moment when Prometheus had scraped all of the traffic
    after_relay_down: float  # a moment when Envoy had failed open and the relay was down
    relay_text: str
    envoy_text: str


def _stream(stack: Stack, payload: dict[str, object], **headers: str) -> httpx.Response:
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=payload, headers=headers, timeout=30
    )
    assert response.status_code in (200, 400, 404, 410), response.text
    return response


def _drop(stack: Stack, payload: dict[str, object], events: int) -> tuple[str, bytes]:
    """A client that reads `events` events of a live generation and goes away."""
    with httpx.Client(timeout=30) as client:
        chunks = open_stream(client, stack, payload, **{"x-demo-rate": "100"})
        session = next(chunks).decode()
        head = read_events(chunks, events)
        chunks.close()
    return session, head


def _fill_store(stack: Stack, sessions: list[str]) -> str:
    """Two large sessions (the second evicts the first), then top up past 92% of the store.
    Returns the evicted session."""
    big = chat(max_tokens=3000, prompt="fill the store")
    evicted = _stream(stack, big, **{"x-demo-rate": "0"}).headers["x-relay-session"]
    sessions.append(evicted)
    sessions.append(_stream(stack, big, **{"x-demo-rate": "0"}).headers["x-relay-session"])
    wait_for(
        "the first large session to be evicted",
        lambda: relay_value(stack, "relay_store_dropped_sessions_total", reason="evicted") >= 1,
    )
    for _ in range(20):
        held = relay_value(stack, "relay_store_bytes")
        if held >= 0.92 * STORE_BYTES:
            break
        per_event = 320  # about one demo event plus the store's bookkeeping
        tokens = max(1, min(4096, int((0.95 * STORE_BYTES - held - 2048) / per_event)))
        payload = chat(max_tokens=tokens, prompt="top up")
        sessions.append(_stream(stack, payload, **{"x-demo-rate": "0"}).headers["x-relay-session"])
    assert relay_value(stack, "relay_store_bytes") >= 0.92 * STORE_BYTES
    return evicted


def generate_traffic(stack: Stack, prometheus: Prometheus) -> list[str]:
    sessions: list[str] = []
    usage = {"stream_options": {"include_usage": True}}
    url = f"{stack.base_url}/v1/chat/completions"

    # Phase 1: one of each kind of series, then let Prometheus see them, so that the counters
    # created by their first increment also show a rate once phase 2 moves them.
    sessions.append(_stream(stack, chat(max_tokens=6, **usage)).headers["x-relay-session"])
    dropped, head = _drop(stack, chat(max_tokens=30, prompt="drop and resume"), 3)
    sessions.append(dropped)
    last_id = events_of(head)[-1].split(b"\n", 1)[0].removeprefix(b"id: ").decode()
    resumed = _stream(
        stack, chat(max_tokens=30, prompt="drop and resume"), **{"Last-Event-ID": last_id}
    )
    assert resumed.status_code == 200
    wait_for(
        "Prometheus to see the first disconnect and usage report",
        lambda: (
            bool(prometheus.series("relay_client_disconnects_total"))
            and bool(prometheus.series("relay_tokens_total"))
        ),
    )

    # Phase 2: more of everything.
    for n in range(3):
        answer = _stream(stack, chat(max_tokens=8, prompt=f"usage {n}", **usage))
        sessions.append(answer.headers["x-relay-session"])
    finished = sessions[-1]
    events_url = f"{stack.base_url}/relay/v1/sessions/{finished}/events"
    assert httpx.get(events_url, timeout=30).status_code == 200  # a reader, from the start
    resumed_sse = httpx.get(events_url, params={"after": f"{finished}:3"}, timeout=30)
    assert resumed_sse.status_code == 200  # a resume over SSE
    for n in range(15):  # a burst of clients that drop a live generation
        sessions.append(_drop(stack, chat(max_tokens=200, prompt=f"drop {n}"), 1)[0])
    assert _stream(stack, chat(), **{"Last-Event-ID": f"{'Z' * 22}:1"}).status_code == 404
    assert httpx.get(events_url, params={"after": "garbage"}, timeout=30).status_code == 400
    wait_for(  # first: running generations would move the store's size and its LRU order
        "the dropped generations to end (grace period)",
        lambda: (
            relay_value(stack, "relay_generations_running") == 0
            and relay_value(stack, "relay_client_disconnects_total", protocol="http") >= 16
        ),
    )
    evicted = _fill_store(stack, sessions)
    gone = httpx.post(url, json=chat(), headers={"Last-Event-ID": f"{evicted}:1"}, timeout=30)
    assert gone.status_code == 410, gone.text  # a resume that misses: the session was evicted
    return sessions


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    binary, _ = prometheus_binaries()
    workdir = tmp_path_factory.mktemp("observability")
    stack = make_stack(
        workdir,
        relay_args=("--store-max-bytes", str(STORE_BYTES), "--detach-grace", "0.5"),
    )
    prometheus: Prometheus | None = None
    try:
        prometheus = Prometheus(binary, write_prometheus_config(workdir, stack), workdir)
        prometheus.wait_scraped_after(0)
        sessions = generate_traffic(stack, prometheus)
        relay_text = httpx.get(stack.metrics_url, timeout=10).text
        envoy_text = httpx.get(f"{stack.admin_url}/stats/prometheus", timeout=10).text
        # Two scrapes after the traffic: a series born at its very end then has the two
        # samples that rate() needs.
        for _ in range(2):
            prometheus.wait_scraped_after(time.time())
        after_traffic = time.time()

        # The relay node dies: Envoy fails open, and says so.
        relay = next(child for child in stack.children if child.name == "relay")
        relay.process.send_signal(signal.SIGTERM)
        relay.process.wait(timeout=10)
        for _ in range(3):
            untagged = _stream(stack, chat())
            assert untagged.status_code == 200
            assert "x-relay-session" not in untagged.headers
        wait_for(
            "Prometheus to see Envoy fail open",
            lambda: (
                # all three: a scrape taken between two of them must not end the wait
                bool(prometheus.series("sum(envoy_http_ext_proc_failure_mode_allowed) >= 3"))
                and bool(prometheus.series('up{job="relay"} == 0'))
            ),
        )
        yield Observed(
            stack, prometheus, sessions, after_traffic, time.time(), relay_text, envoy_text
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()


def _values(series: list[dict[str, object]]) -> list[float]:
    return [float(s["value"][1]) for s in series]  # type: ignore[index]


def test_every_dashboard_query_parses_and_returns_series(observed: Observed) -> None:
    prometheus, at = observed.prometheus, observed.after_traffic
    empty, positive = [], set()
    for title, ref, expr in panel_queries():
        answer = prometheus.query(expr, at)
        assert answer["status"] == "success", f"{title} {ref}: {expr}\n{answer}"
        series = prometheus.series(expr, at)
        if not series and title not in DASHBOARD_NOT_EXERCISED:
            empty.append(f"{title} {ref}: {expr}")
        if any(value > 0 for value in _values(series)):  # NaN is not > 0
            positive.add(title)
    assert not empty, "panel queries without series:\n" + "\n".join(empty)
    assert not DASHBOARD_POSITIVE - positive, (
        f"panels that stayed at zero: {sorted(DASHBOARD_POSITIVE - positive)}"
    )


def alert_rules(prometheus: Prometheus) -> list[dict[str, object]]:
    groups = prometheus.get("/api/v1/rules")["groups"]
    assert isinstance(groups, list)
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_load_and_are_complete(observed: Observed) -> None:
    rules = alert_rules(observed.prometheus)
    assert {r["name"] for r in rules} >= set(ALERTS_EXERCISED) | {
        "RelayReadersLagging",
        "RelayNoEventsWhileSessionsActive",
    }
    for rule in rules:
        name = rule["name"]
        assert rule["type"] == "alerting", name
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert isinstance(rule["duration"], int | float), name
        assert rule["duration"] > 0, f"{name} has no `for:`"
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict)
        assert isinstance(annotations, dict)
        assert labels.get("severity") in SEVERITIES, name
        assert annotations.get("summary"), name
        assert annotations.get("description"), name


def test_every_alert_expression_parses_and_the_exercised_ones_fire(observed: Observed) -> None:
    prometheus = observed.prometheus
    moments = {"traffic": observed.after_traffic, "relay_down": observed.after_relay_down}
    silent = []
    for rule in alert_rules(prometheus):
        name, expr = str(rule["name"]), str(rule["query"])
        for moment, at in moments.items():
            answer = prometheus.query(expr, at)
            assert answer["status"] == "success", f"{name}: {expr}\n{answer}"
            if ALERTS_EXERCISED.get(name) == moment and not prometheus.series(expr, at):
                silent.append(f"{name} ({moment}): {expr}")
    assert not silent, "alerts the traffic should have triggered:\n" + "\n".join(silent)


def test_every_metric_in_a_query_is_exported(observed: Observed) -> None:
    exported = exported_names(observed.relay_text) | exported_names(observed.envoy_text)
    exprs = [(f"panel {title} {ref}", expr) for title, ref, expr in panel_queries()]
    exprs += [
        (f"alert {rule['name']}", str(rule["query"])) for rule in alert_rules(observed.prometheus)
    ]
    unknown = [
        f"{where}: {name}"
        for where, expr in exprs
        for name in sorted(metric_names(expr) - exported - _SYNTHETIC)
    ]
    assert not unknown, "metrics nobody exports:\n" + "\n".join(unknown)
    assert sum(len(metric_names(expr)) for _, expr in exprs) > len(exprs)  # the parser works


def test_envoy_stats_are_scraped_with_ext_proc_and_flow_control(observed: Observed) -> None:
    prometheus = observed.prometheus
    at = observed.after_relay_down
    prefix = 'envoy_http_conn_manager_prefix="relay"'
    for name in (
        "envoy_http_ext_proc_failure_mode_allowed",
        "envoy_http_ext_proc_message_timeouts",
        "envoy_http_ext_proc_streams_failed",
        "envoy_http_ext_proc_streams_started",
        "envoy_http_ext_proc_spurious_msgs_received",
    ):
        assert prometheus.series(f'{name}{{job="envoy", {prefix}}}', at), name
    assert (
        _values(prometheus.series(f"envoy_http_ext_proc_failure_mode_allowed{{{prefix}}}", at))[0]
        >= 3
    )
    for name in (
        'envoy_cluster_upstream_flow_control_paused_reading_total{envoy_cluster_name="llm"}',
        'envoy_cluster_upstream_flow_control_backed_up_total{envoy_cluster_name="relay_http"}',
        f"envoy_http_downstream_flow_control_paused_reading_total{{{prefix}}}",
    ):
        assert prometheus.series(name, at), name


def test_metrics_never_carry_a_session_id(observed: Observed) -> None:
    assert len(observed.sessions) > 20
    for session in observed.sessions:
        assert session not in observed.relay_text
        assert session not in observed.envoy_text


def test_promtool_checks_rules_and_configs(tmp_path: Path) -> None:
    _, promtool = prometheus_binaries()
    checks = [
        ["check", "rules", str(ALERTS)],
        ["check", "config", str(COMPOSE_PROMETHEUS)],
    ]
    generated = tmp_path / "prometheus.yml"
    generated.write_text(
        json.dumps(prometheus_config({"relay": "127.0.0.1:8081", "envoy": "127.0.0.1:9901"}))
    )
    checks.append(["check", "config", str(generated)])
    for args in checks:
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
