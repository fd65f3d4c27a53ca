"""The Envoy config Envoy Gateway would push for deploy/envoy-gateway (with example/ standing in
for the user's Gateway, LLM route and LLM), as a static bootstrap.

Modelled on Envoy Gateway's translator (envoyproxy/gateway, internal/gatewayapi and
internal/xds/translator) where it matters to the relay:
- the EnvoyExtensionPolicy's ext_proc filter sits in the listener's HCM `disabled: true` and is
  enabled, with an empty FilterConfig, on the xDS routes of the policy's target only; its gRPC
  service timeout is hard-coded to 10 s; message_timeout, failure_mode_allow, processing_mode
  and allow_mode_override come from the policy (`request: {...}` -> headers SEND; unset fields
  keep Envoy's defaults); no allowed_override_modes, no per-route overrides (so no
  x-relay-write-path metadata: the node's --write-path decides);
- routes of every HTTPRoute/GRPCRoute on the listener, sorted as sort.go sorts them (Exact >
  RegularExpression > PathPrefix, then longer paths, then more header matches); PathPrefix "/"
  is `prefix: /`, other prefixes `path_separated_prefix` without the trailing slash;
  ReplacePrefixMatch is `prefix_rewrite` with the trailing slash trimmed; an ExtensionRef to an
  HTTPRouteFilter (same namespace as the route) with `ReplaceRegexMatch` is `regex_rewrite`
  (filters.go processExtensionRefHTTPFilter, xds/translator route.go); header matches are
  `string_match` exact or safe_regex; `timeouts.request`
  (or a BackendTrafficPolicy's requestTimeout) becomes the route timeout, and without either the
  route has none, i.e. Envoy's 15 s default; GRPCRoute service matches are prefix matches;
- ClientTrafficPolicy: early header removal, listener buffer limit, HTTP/2 windows, stream idle
  timeout; BackendTrafficPolicy and backendSettings: cluster buffer limits, circuit breakers,
  active HTTP/gRPC health checks;
- the egress Gateway is a listener of its own with the llm-egress route and no ext_proc.
Left out (they do not touch the relay's path): access logs, stats sinks, xDS names of secrets,
EG's own readiness listener, TLS.
"""

from __future__ import annotations

from typing import Any

from mesh.harness import Ports, h2c_protocol_options, loopback_endpoint
from mesh.manifests import Doc, documents, duration, of_kind, one, quantity

T = "type.googleapis.com/envoy."
GATEWAY = ("llm", "eg")  # namespace, name of the user's Gateway in example/
LISTENER = "http"
MUTATION = "header_mutation.v3.HeaderMutation"
EXT_PROC_TIMEOUT = "10s"  # defaultExtServiceRequestTimeout in EG's translator
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": f"{T}extensions.filters.http.router.v3.Router"},
}
_PATH_RANK = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2}


def manifests() -> list[Doc]:
    return documents("envoy-gateway/*.yaml", "envoy-gateway/example/*.yaml")


def listener_name() -> str:
    return f"{GATEWAY[0]}/{GATEWAY[1]}/{LISTENER}"


def _service_port(ports: Ports, name: str, port: int) -> int:
    """The loopback port standing in for a Kubernetes Service of the manifests."""
    local = {("llm", 8000): ports.llm, ("relay-http", 8081): ports.relay_http}
    local[("relay-grpc", 50051)] = ports.relay_grpc
    return local[(name, port)]


def _cluster(
    name: str, port: int, *, http2: bool = False, settings: Doc | None = None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "per_connection_buffer_limit_bytes": 32768,  # EG's default
        "load_assignment": loopback_endpoint(name, port),
    }
    if http2:
        cluster["typed_extension_protocol_options"] = h2c_protocol_options()
    settings = settings or {}
    if "connection" in settings and "bufferLimit" in settings["connection"]:
        cluster["per_connection_buffer_limit_bytes"] = quantity(
            settings["connection"]["bufferLimit"]
        )
    if "circuitBreaker" in settings:
        breaker = settings["circuitBreaker"]
        names = {
            "maxConnections": "max_connections",
            "maxPendingRequests": "max_pending_requests",
            "maxParallelRequests": "max_requests",
        }
        cluster["circuit_breakers"] = {
            "thresholds": [{names[k]: v for k, v in breaker.items() if k in names}]
        }
    active = settings.get("healthCheck", {}).get("active")
    if active:
        check: dict[str, Any] = {
            "timeout": duration(active["timeout"]),
            "interval": duration(active["interval"]),
            "unhealthy_threshold": active["unhealthyThreshold"],
            "healthy_threshold": active["healthyThreshold"],
        }
        if active["type"] == "GRPC":
            check["grpc_health_check"] = {}
        else:
            check["http_health_check"] = {"path": active["http"]["path"]}
        cluster["health_checks"] = [check]
    return cluster


def _policies_for(docs: list[Doc], kind: str, route: Doc) -> list[Doc]:
    namespace = route["metadata"]["namespace"]
    return [
        p
        for p in of_kind(docs, kind)
        if p["metadata"]["namespace"] == namespace
        and any(
            t["kind"] == route["kind"] and t["name"] == route["metadata"]["name"]
            for t in p["spec"]["targetRefs"]
        )
    ]


def _path_match(match: Doc) -> tuple[str, str]:
    path = match.get("path", {"type": "PathPrefix", "value": "/"})
    if "method" in match:  # GRPCRoute: service only -> a prefix "/<service>"
        return "PathPrefix", f"/{match['method']['service']}"
    return path.get("type", "PathPrefix"), path["value"]


def _xds_match(kind: str, value: str, headers: list[Doc]) -> dict[str, Any]:
    if kind == "Exact":
        xds: dict[str, Any] = {"path": value}
    elif kind == "RegularExpression":
        xds = {"safe_regex": {"regex": value}}
    elif value == "/":
        xds = {"prefix": "/"}
    else:
        xds = {"path_separated_prefix": value.rstrip("/")}
    if headers:
        xds["headers"] = [{"name": h["name"], "string_match": _string_match(h)} for h in headers]
    return xds


def _string_match(match: Doc) -> dict[str, Any]:
    """A Gateway API header match as EG's buildXdsStringMatcher writes it (Exact by default)."""
    kind = match.get("type", "Exact")
    if kind == "RegularExpression":
        return {"safe_regex": {"regex": match["value"]}}
    assert kind == "Exact", f"unmodelled header match type {kind}"
    return {"exact": match["value"]}


def _rewrite(docs: list[Doc], namespace: str, rule: Doc) -> dict[str, Any]:
    """The route action fields of a rule's filters: URLRewrite ReplacePrefixMatch is a
    prefix_rewrite with the trailing slash trimmed; an ExtensionRef to an HTTPRouteFilter in
    the route's namespace with ReplaceRegexMatch is a regex_rewrite. Anything else fails the
    build rather than being left out silently."""
    action: dict[str, Any] = {}
    for f in rule.get("filters", []):
        if f["type"] == "URLRewrite":
            replacement = f["urlRewrite"]["path"]["replacePrefixMatch"]
            action["prefix_rewrite"] = replacement.rstrip("/")
        elif f["type"] == "ExtensionRef":
            ref = f["extensionRef"]
            assert (ref["group"], ref["kind"]) == ("gateway.envoyproxy.io", "HTTPRouteFilter")
            found = [
                d
                for d in of_kind(docs, "HTTPRouteFilter")
                if (d["metadata"]["namespace"], d["metadata"]["name"]) == (namespace, ref["name"])
            ]  # EG looks the filter up in the route's own namespace only
            assert len(found) == 1, f"no HTTPRouteFilter {namespace}/{ref['name']}"
            path = found[0]["spec"]["urlRewrite"]["path"]
            assert path["type"] == "ReplaceRegexMatch"
            regex = path["replaceRegexMatch"]
            action["regex_rewrite"] = {
                "pattern": {"regex": regex["pattern"]},
                "substitution": regex["substitution"],
            }
        else:
            raise AssertionError(f"unmodelled HTTPRoute filter {f['type']}")
    return action


def _routes(
    docs: list[Doc],
    ports: Ports,
    clusters: dict[str, dict[str, Any]],
    filter_name: str,
    policy: Doc,
) -> list[dict[str, Any]]:
    ns, gateway = GATEWAY
    target = policy["spec"]["targetRefs"][0]
    entries: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
    for route in of_kind(docs, "HTTPRoute") + of_kind(docs, "GRPCRoute"):
        parents = route["spec"]["parentRefs"]
        meta = route["metadata"]
        if not any(
            p["name"] == gateway and p.get("namespace", meta["namespace"]) == ns for p in parents
        ):
            continue
        btps = _policies_for(docs, "BackendTrafficPolicy", route)
        settings: Doc = btps[0]["spec"] if btps else {}
        kind = "httproute" if route["kind"] == "HTTPRoute" else "grpcroute"
        for i, rule in enumerate(route["spec"]["rules"]):
            backend = rule["backendRefs"][0]
            cluster_name = f"{kind}/{meta['namespace']}/{meta['name']}/rule/{i}"
            clusters[cluster_name] = _cluster(
                cluster_name,
                _service_port(ports, backend["name"], backend["port"]),
                http2=route["kind"] == "GRPCRoute",
                settings=settings,
            )
            timeout = rule.get("timeouts", {}).get("request") or settings.get("timeout", {}).get(
                "http", {}
            ).get("requestTimeout")
            extproc = (
                target["kind"] == route["kind"]
                and target["name"] == meta["name"]
                and policy["metadata"]["namespace"] == meta["namespace"]
                and target.get("sectionName") in (None, rule.get("name"))
            )
            for j, match in enumerate(rule.get("matches", [{}])):
                path_kind, value = _path_match(match)
                headers = match.get("headers", [])
                action: dict[str, Any] = {"cluster": cluster_name}
                if timeout is not None:
                    action["timeout"] = duration(timeout)
                action.update(_rewrite(docs, meta["namespace"], rule))
                host = route["spec"]["hostnames"][0].replace(".", "_")
                xds: dict[str, Any] = {
                    "name": f"{cluster_name}/match/{j}/{host}",
                    "match": _xds_match(path_kind, value, headers),
                    "route": action,
                }
                if extproc:
                    xds["typed_per_filter_config"] = {
                        filter_name: {"@type": f"{T}config.route.v3.FilterConfig", "config": {}}
                    }
                rank = (_PATH_RANK[path_kind], -len(value), -len(headers))
                entries.append((rank, xds))
    entries.sort(key=lambda entry: entry[0])  # stable: equal ranks keep manifest order
    return [xds for _, xds in entries]


def _ext_proc_filter(name: str, cluster: str, spec: Doc) -> dict[str, Any]:
    mode = spec.get("processingMode", {})
    body = {
        "Streamed": "STREAMED",
        "Buffered": "BUFFERED",
        "BufferedPartial": "BUFFERED_PARTIAL",
        "FullDuplexStreamed": "FULL_DUPLEX_STREAMED",
    }
    processing_mode: dict[str, Any] = {
        "request_header_mode": "SEND" if "request" in mode else "SKIP",
        "response_header_mode": "SEND" if "response" in mode else "SKIP",
    }
    for side in ("request", "response"):
        if (mode.get(side) or {}).get("body"):
            processing_mode[f"{side}_body_mode"] = body[mode[side]["body"]]
    config: dict[str, Any] = {
        "@type": f"{T}extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {
            "envoy_grpc": {"cluster_name": cluster, "authority": "relay-grpc.stream-relay:50051"},
            "timeout": EXT_PROC_TIMEOUT,
        },
        "processing_mode": processing_mode,
        "allow_mode_override": bool(mode.get("allowModeOverride", False)),
    }
    if "messageTimeout" in spec:
        config["message_timeout"] = duration(spec["messageTimeout"])
    if "failOpen" in spec:
        config["failure_mode_allow"] = spec["failOpen"]
    return {"name": name, "disabled": True, "typed_config": config}


def _hcm(
    stat_prefix: str,
    routes: list[dict[str, Any]],
    filters: list[dict[str, Any]],
    route_config: str,
    domains: list[str],
    client: Doc,
) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "@type": f"{T}extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "http2_protocol_options": {
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "route_config": {
            "name": route_config,
            "virtual_hosts": [
                {
                    "name": f"{route_config}/{domains[0].replace('.', '_')}",
                    "domains": domains,
                    "routes": routes,
                }
            ],
        },
        "http_filters": [*filters, ROUTER],
    }
    remove = client.get("headers", {}).get("earlyRequestHeaders", {}).get("remove", [])
    if remove:
        hcm["early_header_mutation_extensions"] = [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": f"{T}extensions.http.early_header_mutation.{MUTATION}",
                    "mutations": [{"remove": header} for header in remove],
                },
            }
        ]
    http2 = client.get("http2", {})
    if "initialStreamWindowSize" in http2:
        hcm["http2_protocol_options"]["initial_stream_window_size"] = quantity(
            http2["initialStreamWindowSize"]
        )
    if "initialConnectionWindowSize" in http2:
        hcm["http2_protocol_options"]["initial_connection_window_size"] = quantity(
            http2["initialConnectionWindowSize"]
        )
    idle = client.get("timeout", {}).get("http", {}).get("streamIdleTimeout")
    hcm["stream_idle_timeout"] = duration(idle) if idle else "300s"
    return hcm


def _listener(name: str, port: int, hcm: dict[str, Any], client: Doc) -> dict[str, Any]:
    limit = client.get("connection", {}).get("bufferLimit")
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "per_connection_buffer_limit_bytes": quantity(limit) if limit else 32768,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def build(ports: Ports) -> dict[str, Any]:
    docs = manifests()
    policy = one(docs, "EnvoyExtensionPolicy", "stream-relay")
    ns, name = policy["metadata"]["namespace"], policy["metadata"]["name"]
    ext_proc = policy["spec"]["extProc"][0]
    ext_cluster = f"envoyextensionpolicy/{ns}/{name}/extproc/0"
    filter_name = f"envoy.filters.http.ext_proc/{ext_cluster}"
    backend = ext_proc["backendRefs"][0]
    clusters: dict[str, dict[str, Any]] = {
        ext_cluster: _cluster(
            ext_cluster,
            _service_port(ports, backend["name"], backend["port"]),
            http2=True,
            settings=ext_proc.get("backendSettings"),
        ),
    }
    gateway = one(docs, "Gateway", GATEWAY[1])
    section = next(li for li in gateway["spec"]["listeners"] if li["name"] == LISTENER)
    client_policies = [
        p
        for p in of_kind(docs, "ClientTrafficPolicy")
        if any(t["kind"] == "Gateway" and t["name"] == GATEWAY[1] for t in p["spec"]["targetRefs"])
    ]
    client = client_policies[0]["spec"] if client_policies else {}
    routes = _routes(docs, ports, clusters, filter_name, policy)
    public = _listener(
        listener_name(),
        0,
        _hcm(
            f"http-{section['port']}",
            routes,
            [_ext_proc_filter(filter_name, ext_cluster, ext_proc)],
            listener_name(),
            [section["hostname"]],
            client,
        ),
        client,
    )
    # The egress Gateway: another Envoy in EG, here another listener; no policy attaches to it.
    egress_route = one(docs, "HTTPRoute", "llm-egress")
    egress_backend = egress_route["spec"]["rules"][0]["backendRefs"][0]
    egress_cluster = "httproute/llm/llm-egress/rule/0"
    llm_settings = one(docs, "BackendTrafficPolicy", "llm-streams")["spec"]
    clusters[egress_cluster] = _cluster(
        egress_cluster,
        _service_port(ports, egress_backend["name"], egress_backend["port"]),
        settings=llm_settings,
    )
    egress_rule = egress_route["spec"]["rules"][0]
    egress_routes = [
        {
            "name": "httproute/llm/llm-egress/rule/0/match/0/*",
            "match": {"prefix": "/"},
            "route": {
                "cluster": egress_cluster,
                "timeout": duration(egress_rule["timeouts"]["request"]),
            },
        }
    ]
    egress = _listener(
        "llm/relay-egress/http",
        ports.egress,
        _hcm("http-10001", egress_routes, [], "llm/relay-egress/http", ["*"], {}),
        {},
    )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [public, egress], "clusters": list(clusters.values())},
    }
