"""A front proxy of someone else's making (its own listener, virtual host, routes, filters and
cluster names, another app on the same listener, gzip compression) with the output of
`stream-relay envoy-config --snippet` merged in the way the snippet's comments say."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import yaml

from extproc.ops.supervisor import python_child
from mesh.harness import Ports

LISTENER = "ingress"
HOST = "api.example.com"
LLM_CLUSTER = "openai_upstream"  # the user's name for the LLM cluster (the snippet says `llm`)
LLM_ROUTES = ("openai", "ollama")

FRONT_PROXY = Path(__file__).with_name("front_proxy.yaml")


def front_proxy(ports: Ports) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        FRONT_PROXY.read_text().replace("LLM_PORT", str(ports.llm))
    )
    return config


def snippet(ports: Ports) -> dict[str, Any]:
    """What `stream-relay envoy-config --snippet` prints for these ports, parsed."""
    printed = subprocess.run(
        python_child(
            "envoy-config",
            "--snippet",
            *(
                "--relay-grpc-port",
                str(ports.relay_grpc),
                "--relay-http-port",
                str(ports.relay_http),
            ),
            *("--egress-port", str(ports.egress)),
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    parsed: dict[str, Any] = yaml.safe_load(printed)
    return parsed


def _rename_llm(node: Any) -> Any:
    """`cluster: llm` in the snippet stands for the user's LLM cluster."""
    if isinstance(node, dict):
        return {
            k: LLM_CLUSTER if k == "cluster" and v == "llm" else _rename_llm(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rename_llm(item) for item in node]
    return node


def merge(config: dict[str, Any], pieces: dict[str, Any]) -> dict[str, Any]:
    """Merge the snippet into the front proxy as its comments say."""
    merged = copy.deepcopy(config)
    pieces = _rename_llm(pieces)
    resources = merged["static_resources"]
    hcm = resources["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for key, value in pieces["http_connection_manager"].items():
        if key == "route_config":
            hcm["route_config"].update(value)
        else:
            hcm[key] = value
    filters = hcm["http_filters"]
    router = [f["name"] for f in filters].index("envoy.filters.http.router")
    filters[router:router] = pieces["http_filters"]
    host = hcm["route_config"]["virtual_hosts"][0]
    for route in host["routes"]:
        if route["name"] in LLM_ROUTES:
            route["route"]["timeout"] = "0s"
    host["routes"] = pieces["routes"] + host["routes"]
    resources["listeners"] += pieces["listeners"]
    resources["clusters"] += pieces["clusters"]
    return merged


def build(ports: Ports) -> dict[str, Any]:
    return merge(front_proxy(ports), snippet(ports))
