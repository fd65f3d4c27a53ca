"""The Envoy config an Istio ingress gateway would run for deploy/istio, as a static bootstrap.

Built as istiod builds a gateway's config, where it matters to the relay: one listener
`0.0.0.0_8080` for Gateway server port 80, route config `http.8080`, a virtual host per
VirtualService host with its http[] rules in order (named as the rules; no route timeout and
no stream duration limit, Istio's default retry policy; header and uri matches, `rewrite.uri`
and `rewrite.uriRegexRewrite` as pilot/pkg/networking/core/route/route.go translates them),
clusters `outbound|PORT||HOST` with Istio's effectively unlimited circuit breakers and the
DestinationRules' outlier detection, and the gateway's default HTTP filters (Istio's own
Wasm/stats extensions are left out: they are not in upstream Envoy). Then every configPatch of
envoyfilter.yaml is applied with Istio's semantics: MERGE (proto merge: messages merge, lists
append, scalars replace), INSERT_BEFORE. The relay's egress in Istio is the LLM Service
through the relay pod's own sidecar; here the relay calls the demo LLM directly (that sidecar
hop is not modelled).
"""

from __future__ import annotations

from typing import Any

from mesh.harness import Ports, h2c_protocol_options, loopback_endpoint
from mesh.manifests import Doc, documents, duration, of_kind, one

T = "type.googleapis.com/envoy."
LISTENER = "0.0.0.0_8080"
HOST = "llm.example.com"
_UNLIMITED = 4294967295
_RETRY = {
    "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
    "num_retries": 2,
    "retriable_status_codes": [503],
    "host_selection_retry_max_attempts": "5",
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": f"{T}extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
}


def manifests() -> list[Doc]:
    return documents("istio/*.yaml")


def cluster_name(host: str, port: int) -> str:
    return f"outbound|{port}||{host}"


def merge(into: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """Proto merge as EnvoyFilter MERGE does it: messages merge, lists append, scalars replace."""
    for key, item in value.items():
        if isinstance(item, dict) and isinstance(into.get(key), dict):
            merge(into[key], item)
        elif isinstance(item, list) and isinstance(into.get(key), list):
            into[key] = into[key] + item
        else:
            into[key] = item
    return into


def _string_match(match: Doc) -> dict[str, Any]:
    """An Istio StringMatch as ConvertToEnvoyMatch writes it (`regex: "*"`, Istio's presence
    match, is not modelled)."""
    ((kind, value),) = match.items()
    if kind == "regex":
        assert value != "*"
        return {"safe_regex": {"regex": value}}
    assert kind in ("exact", "prefix"), f"unmodelled string match {kind}"
    return {kind: value}


def _route(rule: Doc) -> dict[str, Any]:
    match: dict[str, Any] = {"prefix": "/"}
    first = (rule.get("match") or [{}])[0]
    uri = first.get("uri", {})
    if "prefix" in uri:
        match = {"prefix": uri["prefix"]}
    elif "regex" in uri:
        match = {"safe_regex": {"regex": uri["regex"]}}
    elif "exact" in uri:
        match = {"path": uri["exact"]}
    headers = first.get("headers", {})
    if headers:  # TranslateRouteMatch sorts them by name
        match["headers"] = [
            {"name": k, "string_match": _string_match(headers[k])} for k in sorted(headers)
        ]
    destination = rule["route"][0]["destination"]
    action: dict[str, Any] = {
        "cluster": cluster_name(destination["host"], destination["port"]["number"]),
        "timeout": "0s",  # Istio: no route timeout unless the VirtualService sets one
        "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"},
        "retry_policy": _RETRY,
    }
    rewrite = rule.get("rewrite", {})
    if "uriRegexRewrite" in rewrite:  # applyHTTPRouteDestination: regex first, then uri
        regex = rewrite["uriRegexRewrite"]
        action["regex_rewrite"] = {
            "pattern": {"regex": regex["match"]},
            "substitution": regex["rewrite"],
        }
    elif "uri" in rewrite:
        action["prefix_rewrite"] = rewrite["uri"]
    return {
        "name": rule["name"],
        "match": match,
        "route": action,
        "decorator": {"operation": f"{destination['host']}:{destination['port']['number']}/*"},
    }


def _cluster(name: str, port: int, *, http2: bool, rule: Doc | None) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": _UNLIMITED,
                    "max_pending_requests": _UNLIMITED,
                    "max_requests": _UNLIMITED,
                    "max_retries": _UNLIMITED,
                }
            ]
        },
        "load_assignment": loopback_endpoint(name, port),
    }
    if http2:  # appProtocol kubernetes.io/h2c
        cluster["typed_extension_protocol_options"] = h2c_protocol_options()
    outlier = (rule or {}).get("trafficPolicy", {}).get("outlierDetection")
    if outlier:
        cluster["outlier_detection"] = {
            "consecutive_gateway_failure": outlier["consecutiveGatewayErrors"],
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 0,
            "interval": duration(outlier["interval"]),
            "base_ejection_time": duration(outlier["baseEjectionTime"]),
            "max_ejection_percent": outlier["maxEjectionPercent"],
        }
    return cluster


def build(ports: Ports) -> dict[str, Any]:
    docs = manifests()
    service = one(docs, "VirtualService", "llm")["spec"]
    rules = {d["spec"]["host"]: d for d in of_kind(docs, "DestinationRule")}
    local = {
        ("relay-grpc.stream-relay.svc.cluster.local", 50051): ports.relay_grpc,
        ("relay-http.stream-relay.svc.cluster.local", 8081): ports.relay_http,
        ("llm.llm.svc.cluster.local", 8000): ports.llm,
    }
    clusters = {
        host: _cluster(
            cluster_name(host, port), local_port, http2=port == 50051, rule=rules.get(host)
        )
        for (host, port), local_port in local.items()
    }
    routes = [_route(rule) for rule in service["http"]]
    hcm: dict[str, Any] = {
        "@type": f"{T}extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": f"outbound_{LISTENER}",
        "use_remote_address": True,
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "route_config": {
            "name": "http.8080",
            "validate_clusters": False,
            "virtual_hosts": [
                {"name": f"{HOST}:80", "domains": [HOST, f"{HOST}:*"], "routes": routes}
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.grpc_stats",
                "typed_config": {
                    "@type": f"{T}extensions.filters.http.grpc_stats.v3.FilterConfig",
                    "emit_filter_state": True,
                    "stats_for_all_methods": False,
                },
            },
            {
                "name": "envoy.filters.http.fault",
                "typed_config": {"@type": f"{T}extensions.filters.http.fault.v3.HTTPFault"},
            },
            {
                "name": "envoy.filters.http.cors",
                "typed_config": {"@type": f"{T}extensions.filters.http.cors.v3.Cors"},
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{T}extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    listener: dict[str, Any] = {
        "name": LISTENER,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    for patch in one(docs, "EnvoyFilter", "stream-relay")["spec"]["configPatches"]:
        _apply(patch, listener, hcm, routes, clusters)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": list(clusters.values())},
    }


def _apply(
    patch: Doc,
    listener: dict[str, Any],
    hcm: dict[str, Any],
    routes: list[dict[str, Any]],
    clusters: dict[str, dict[str, Any]],
) -> None:
    """One configPatch, applied where Istio would; a patch that matches nothing fails the build
    (Istio would silently skip it: the test must notice)."""
    kind, match = patch["applyTo"], patch["match"]
    operation, value = patch["patch"]["operation"], patch["patch"]["value"]
    assert match["context"] == "GATEWAY"
    if "listener" in match:
        assert match["listener"]["portNumber"] == 8080, "the gateway pod's port for server port 80"
    if kind == "NETWORK_FILTER":
        assert operation == "MERGE"
        assert (
            match["listener"]["filterChain"]["filter"]["name"]
            == "envoy.filters.network.http_connection_manager"
        )
        merge(hcm, {k: v for k, v in value["typed_config"].items() if k != "@type"})
    elif kind == "HTTP_FILTER":
        assert operation == "INSERT_BEFORE"
        sub = match["listener"]["filterChain"]["filter"]["subFilter"]["name"]
        names = [f["name"] for f in hcm["http_filters"]]
        hcm["http_filters"].insert(names.index(sub), value)
    elif kind == "HTTP_ROUTE":
        assert operation == "MERGE"
        name = match["routeConfiguration"]["vhost"]["route"]["name"]
        targets = [r for r in routes if r["name"] == name]
        assert targets, f"EnvoyFilter patches route {name!r}, which the VirtualService lacks"
        for route in targets:
            merge(route, value)
    elif kind == "CLUSTER":
        assert operation == "MERGE"
        merge(clusters[match["cluster"]["service"]], value)
    elif kind == "LISTENER":
        assert operation == "MERGE"
        merge(listener, value)
    else:
        raise AssertionError(f"unmodelled EnvoyFilter patch {kind}")
