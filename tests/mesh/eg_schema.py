"""JSON Schemas for the Envoy Gateway kinds deploy/ uses, written by hand from Envoy Gateway's
API types, because no package on PyPI or npm ships Envoy Gateway's CRD schemas (searched for
this issue; its Helm chart carries the generated CRDs, but no registry reachable here does).

Source: envoyproxy/gateway `api/v1alpha1` (ext_proc_types.go, envoyextensionpolicy_types.go,
clienttrafficpolicy_types.go, connection_types.go, circuitbreaker_types.go,
healthcheck_types.go, timeout_types.go, envoyproxy_types.go) on main at commit c78106ac (newer
than v1.5: extProc has `stage`), including the CEL rule "FullDuplexStreamed needs failOpen:
false". HTTPRouteFilter from httproutefilter_types.go at commit 02c5e5bc (the kind is older;
this copy has `requestMirror` and `matches`), including its CEL rules on the path and hostname
modifiers. They cover the fields deploy/ uses and their siblings, not every field; unknown
fields are errors, as a strict apply would make them. Re-derive them when you move to another
Envoy Gateway version.
"""

from __future__ import annotations

from typing import Any

import jsonschema

Schema = dict[str, Any]


def _obj(props: Schema, required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": False,
    }


DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
QUANTITY = {"type": ["string", "integer"], "pattern": r"^[1-9]+[0-9]*([EPTGMK]i|[EPTGMk])?$"}
TARGET = _obj(
    {
        "group": {"const": "gateway.networking.k8s.io"},
        "kind": {"enum": ["Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "UDPRoute", "TLSRoute"]},
        "name": {"type": "string", "minLength": 1},
        "sectionName": {"type": "string"},
    },
    ("group", "kind", "name"),
)
BODY_MODE = {"enum": ["Streamed", "Buffered", "BufferedPartial", "FullDuplexStreamed"]}
MODE_OPTIONS = _obj(
    {"body": BODY_MODE, "attributes": {"type": "array", "items": {"type": "string"}}}
)
HEALTH_CHECK = _obj(
    {
        "active": _obj(
            {
                "type": {"enum": ["HTTP", "TCP", "GRPC"]},
                "timeout": DURATION,
                "interval": DURATION,
                "unhealthyThreshold": {"type": "integer", "minimum": 1},
                "healthyThreshold": {"type": "integer", "minimum": 1},
                "http": _obj(
                    {
                        "path": {"type": "string"},
                        "method": {"type": "string"},
                        "expectedStatuses": {"type": "array"},
                    },
                    ("path",),
                ),
                "grpc": _obj({"service": {"type": "string"}}),
                "tcp": {"type": "object"},
            },
            ("type",),
        ),
        "passive": {"type": "object"},
    }
)
CIRCUIT_BREAKER = _obj(
    {
        name: {"type": "integer", "minimum": 0}
        for name in (
            "maxConnections",
            "maxPendingRequests",
            "maxParallelRequests",
            "maxParallelRetries",
            "maxRequestsPerConnection",
        )
    }
)
BACKEND_TIMEOUT = _obj(
    {
        "tcp": _obj({"connectTimeout": DURATION}),
        "http": _obj(
            {
                "connectionIdleTimeout": DURATION,
                "maxConnectionDuration": DURATION,
                "requestTimeout": DURATION,
            }
        ),
    }
)
BACKEND_REF = _obj(
    {
        "group": {"type": "string"},
        "kind": {"type": "string"},
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "weight": {"type": "integer"},
    },
    ("name",),
)

# HTTPURLRewriteFilter: path types are only ReplaceRegexMatch (Gateway API's own URLRewrite has
# the prefix and full-path ones); `replaceRegexMatch` is required with it (a CEL rule).
URL_REWRITE = _obj(
    {
        "hostname": _obj(
            {"type": {"enum": ["Header", "Backend"]}, "header": {"type": "string"}}, ("type",)
        ),
        "path": _obj(
            {
                "type": {"enum": ["ReplaceRegexMatch"]},
                "replaceRegexMatch": _obj(
                    {
                        "pattern": {"type": "string", "minLength": 1},
                        "substitution": {"type": "string"},
                    },
                    ("pattern", "substitution"),
                ),
            },
            ("type", "replaceRegexMatch"),
        ),
        "appendXForwardedHost": {"type": "boolean"},
    }
)


def _kind(spec: Schema, required: tuple[str, ...] = ()) -> Schema:
    return _obj(
        {
            "apiVersion": {"const": "gateway.envoyproxy.io/v1alpha1"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": _obj(spec, required),
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


SCHEMAS: dict[str, Schema] = {
    "EnvoyExtensionPolicy": _kind(
        {
            "targetRefs": {"type": "array", "minItems": 1, "items": TARGET},
            "extProc": {
                "type": "array",
                "maxItems": 16,
                "items": _obj(
                    {
                        "backendRefs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1,
                            "items": BACKEND_REF,
                        },
                        "backendSettings": _obj(
                            {
                                "circuitBreaker": CIRCUIT_BREAKER,
                                "healthCheck": HEALTH_CHECK,
                                "timeout": BACKEND_TIMEOUT,
                                "connection": _obj({"bufferLimit": QUANTITY}),
                                "retry": {"type": "object"},
                                "loadBalancer": {"type": "object"},
                            }
                        ),
                        "stage": {"enum": ["Route", "Backend", "All"]},
                        "messageTimeout": DURATION,
                        "failOpen": {"type": "boolean"},
                        "processingMode": _obj(
                            {
                                "request": MODE_OPTIONS,
                                "response": MODE_OPTIONS,
                                "allowModeOverride": {"type": "boolean"},
                            }
                        ),
                        "metadata": _obj(
                            {
                                "accessibleNamespaces": {"type": "array"},
                                "writableNamespaces": {"type": "array", "maxItems": 8},
                            }
                        ),
                    },
                    ("backendRefs",),
                ),
            },
        },
        ("targetRefs",),
    ),
    "ClientTrafficPolicy": _kind(
        {
            "targetRefs": {"type": "array", "items": TARGET},
            "headers": _obj(
                {
                    "earlyRequestHeaders": _obj(
                        {
                            "set": {"type": "array"},
                            "add": {"type": "array"},
                            "remove": {
                                "type": "array",
                                "items": {"type": "string"},
                                "maxItems": 16,
                            },
                        }
                    ),
                    "enableEnvoyHeaders": {"type": "boolean"},
                    "withUnderscoresAction": {"enum": ["Allow", "RejectRequest", "DropHeader"]},
                }
            ),
            "connection": _obj(
                {
                    "bufferLimit": QUANTITY,
                    "connectionLimit": _obj(
                        {"value": {"type": "integer", "minimum": 1}, "closeDelay": DURATION},
                        ("value",),
                    ),
                }
            ),
            "http2": _obj(
                {
                    "initialStreamWindowSize": QUANTITY,
                    "initialConnectionWindowSize": QUANTITY,
                    "maxConcurrentStreams": {"type": "integer"},
                }
            ),
            "timeout": _obj(
                {
                    "tcp": _obj({"idleTimeout": DURATION}),
                    "http": _obj(
                        {
                            "requestReceivedTimeout": DURATION,
                            "idleTimeout": DURATION,
                            "streamIdleTimeout": DURATION,
                        }
                    ),
                }
            ),
        },
        ("targetRefs",),
    ),
    "BackendTrafficPolicy": _kind(
        {
            "targetRefs": {"type": "array", "items": TARGET},
            "connection": _obj({"bufferLimit": QUANTITY}),
            "circuitBreaker": CIRCUIT_BREAKER,
            "healthCheck": HEALTH_CHECK,
            "timeout": BACKEND_TIMEOUT,
        },
        ("targetRefs",),
    ),
    "HTTPRouteFilter": _kind(
        {
            "urlRewrite": URL_REWRITE,
            "directResponse": _obj(
                {
                    "contentType": {"type": "string"},
                    "body": {"type": "object"},
                    "statusCode": {"type": "integer"},
                    "header": {"type": "object"},
                }
            ),
            "credentialInjection": {"type": "object"},
            "requestMirror": {"type": "object"},
            "matches": {"type": "array", "maxItems": 8, "items": {"type": "object"}},
        }
    ),
    "EnvoyProxy": _kind(
        {
            "provider": _obj(
                {
                    "type": {"const": "Kubernetes"},
                    "kubernetes": _obj(
                        {
                            "envoyService": _obj(
                                {
                                    "type": {"enum": ["ClusterIP", "LoadBalancer", "NodePort"]},
                                    "annotations": {"type": "object"},
                                }
                            ),
                            "envoyDeployment": _obj(
                                {"replicas": {"type": "integer", "minimum": 0}}
                            ),
                        }
                    ),
                },
                ("type",),
            )
        }
    ),
}


def errors(doc: dict[str, Any]) -> list[str]:
    """What is wrong with one gateway.envoyproxy.io document (empty: valid)."""
    schema = SCHEMAS.get(doc["kind"])
    if schema is None:
        return [f"no schema for kind {doc['kind']}"]
    found = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    hostname = (doc.get("spec", {}).get("urlRewrite") or {}).get("hostname") or {}
    if ("header" in hostname) != (hostname.get("type") == "Header"):  # HTTPHostnameModifier
        found.append("urlRewrite/hostname: header is set if and only if type is Header")
    for ext_proc in doc.get("spec", {}).get("extProc", []):  # the CEL rule on ExtProc
        mode = ext_proc.get("processingMode") or {}
        bodies = ((mode.get("request") or {}).get("body"), (mode.get("response") or {}).get("body"))
        if ext_proc.get("failOpen") and "FullDuplexStreamed" in bodies:
            found.append("extProc: FullDuplexStreamed requires failOpen: false")
    return found
