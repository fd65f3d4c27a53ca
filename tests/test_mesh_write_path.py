"""`serve --write-path`: the node's write path for generations whose Envoy route names none
(Envoy Gateway cannot send per-route metadata). It applies to POSTs to the generation paths
only, matched by the expression Envoy's `generations` route uses; a route's metadata wins."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingResponse

from extproc.access.quota import SessionQuota
from extproc.inline.processor import ROUTE_HEADER, StreamProcessor
from extproc.node.config import NodeSettings
from extproc.node.metrics import RelayMetrics
from extproc.ops.cli import _relay_argv, build_parser, main
from extproc.ops.envoy_render import EnvoyPorts, Upstream, render
from extproc.ops.flags import config_argv
from extproc.store import MemoryStore, StoreLimits
from extproc.vocabulary import GENERATION_PATHS, WritePath

GENERATIONS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/api/chat",
    "/api/generate",
)
NOT_GENERATIONS = (
    "/v1/embeddings",
    "/v1/models",
    "/v1/chat/completions/extra",
    "/x/v1/chat/completions",
    "/v1/chat",
    "/api/chatty",
)


def _headers(method: str, path: str) -> HttpHeaders:
    pairs = {":method": method, ":path": path, ":authority": "relay"}
    return HttpHeaders(
        headers=HeaderMap(
            headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
        )
    )


def _target(
    method: str, path: str, *, route: WritePath | None, default: WritePath | None
) -> tuple[str | None, WritePath | None]:
    """Where the processor sends the request (x-relay-target or None) and its route."""
    processor = StreamProcessor(
        MemoryStore(StoreLimits(), metrics=RelayMetrics()),
        SessionQuota(64),
        max_event_bytes=1 << 20,
        on_usage=lambda _: None,
        route=route,
        default_route=default,
    )
    reply: ProcessingResponse = processor.on_request_headers(_headers(method, path))
    mutations = reply.request_headers.response.header_mutation.set_headers
    targets = [m.header.raw_value.decode() for m in mutations if m.header.key == ROUTE_HEADER]
    return (targets[0] if targets else None), processor.route


@pytest.mark.parametrize("path", [*GENERATIONS, "/v1/chat/completions?stream=true"])
def test_a_generation_post_takes_the_node_default(path: str) -> None:
    assert _target("POST", path, route=None, default=WritePath.DETACHED) == (
        "detached",
        WritePath.DETACHED,
    )
    assert _target("POST", path, route=None, default=WritePath.INLINE) == (None, WritePath.INLINE)


@pytest.mark.parametrize("path", NOT_GENERATIONS)
def test_other_paths_are_no_generation(path: str) -> None:
    assert _target("POST", path, route=None, default=WritePath.DETACHED) == (None, None)


@pytest.mark.parametrize("method", ["GET", "PUT", "HEAD"])
def test_only_a_post_is_a_generation(method: str) -> None:
    assert _target(method, "/v1/chat/completions", route=None, default=WritePath.DETACHED) == (
        None,
        None,
    )


def test_the_routes_metadata_wins_over_the_node_default() -> None:
    path = "/v1/chat/completions"
    assert _target("POST", path, route=WritePath.INLINE, default=WritePath.DETACHED) == (
        None,
        WritePath.INLINE,
    )
    assert _target("POST", path, route=WritePath.DETACHED, default=WritePath.INLINE) == (
        "detached",
        WritePath.DETACHED,
    )
    # A route that names a write path keeps it for any path (the route decided).
    assert (
        _target("POST", "/v1/embeddings", route=WritePath.DETACHED, default=None)[0] == "detached"
    )


def test_envoy_and_the_relay_match_the_same_generation_paths() -> None:
    """One expression: the template's `generations` route is rendered from GENERATION_PATHS."""
    ports = EnvoyPorts(
        listen_port=8080, admin_port=9901, relay_grpc_port=50051, relay_http_port=8081
    )
    config = yaml.safe_load(render(ports, Upstream.from_url("http://127.0.0.1:8000")))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    assert routes["generations"]["match"]["safe_regex"]["regex"] == GENERATION_PATHS


def _serve(*argv: str) -> NodeSettings:
    parser = build_parser()
    return NodeSettings.from_flags(vars(parser.parse_args(config_argv(parser, ["serve", *argv]))))


def test_serve_defaults_to_inline_and_reads_the_flag_and_the_toml(tmp_path: Path) -> None:
    assert _serve().write_path is WritePath.INLINE
    assert (
        _serve("--write-path", "detached", "--egress-url", "http://e:1").write_path
        is WritePath.DETACHED
    )
    toml = tmp_path / "relay.toml"
    toml.write_text('write-path = "detached"\negress-url = "http://e:1"\n')
    assert _serve("--config", str(toml)).write_path is WritePath.DETACHED
    assert _serve("--config", str(toml), "--write-path", "inline").write_path is WritePath.INLINE


def test_up_passes_its_write_path_to_its_nodes() -> None:
    up = build_parser().parse_args(["up", "--demo", "--write-path", "inline"])
    handed = _relay_argv(up)
    assert handed[handed.index("--write-path") + 1] == "inline"


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--write-path", "detached"], "--egress-url"),  # detached needs Envoy's egress
        (["--write-path", "sideways"], "--write-path"),
    ],
)
def test_bad_write_paths_fail_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], names: str
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0], err
