"""`stream-relay envoy-config --snippet`: what to merge into an Envoy you already run. It is cut
from the rendered template (nothing of it can drift from what `up` runs and tests), it says
where each piece goes and documents the fields a platform team must understand. The merge into
someone else's front proxy runs end to end in tests/test_mesh.py (platform `plain`)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mesh import plain
from mesh.harness import Ports

from extproc.ops.cli import main
from extproc.ops.envoy_render import EnvoyPorts, Upstream, _expand_aliases, render, snippet
from extproc.ops.envoy_security import EnvoySecurity
from extproc.ops.supervisor import envoy_binary

PORTS = EnvoyPorts(listen_port=8080, admin_port=9901, relay_grpc_port=50051, relay_http_port=8081)
PIECES = (
    "http_connection_manager",
    "http_filters",
    "routes",
    "listeners",
    "clusters",
)
# Fields a platform team must understand: each has a comment on its line, just above it or as
# the first line inside it.
DOCUMENTED = (
    "stream_idle_timeout",
    "http2_protocol_options",
    "early_header_mutation_extensions",
    "disabled",
    "timeout",
    "failure_mode_allow",
    "message_timeout",
    "processing_mode",
    "allowed_override_modes",
    "prefix_rewrite",
    "idle_timeout",
    "circuit_breakers",
    "health_checks",
    "per_connection_buffer_limit_bytes",
    "overrides",
)


def _template() -> dict[str, Any]:
    rendered: dict[str, Any] = yaml.safe_load(
        render(PORTS, Upstream("127.0.0.1", 80, tls=False), security=EnvoySecurity())
    )
    return rendered


def _public_hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = next(li for li in config["static_resources"]["listeners"] if li["name"] == "public")
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_every_piece_is_the_templates_own() -> None:
    pieces = yaml.safe_load(snippet(PORTS))
    assert tuple(pieces) == PIECES
    template = _template()
    hcm = _public_hcm(template)
    for key in ("stream_idle_timeout", "http2_protocol_options", "upgrade_configs"):
        assert pieces["http_connection_manager"][key] == hcm[key]
    (removal,) = pieces["http_connection_manager"]["early_header_mutation_extensions"]
    stripped = [m["remove"] for m in removal["typed_config"]["mutations"]]
    assert stripped == hcm["route_config"]["internal_only_headers"]  # the same list, earlier
    (ext_proc,) = pieces["http_filters"]
    template_ext_proc = next(f for f in hcm["http_filters"] if f["name"] == ext_proc["name"])
    assert ext_proc == {**template_ext_proc, "disabled": True}  # opt-in per route, else as is
    template_routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    for route in pieces["routes"]:
        assert route == template_routes[route["name"]]
    assert [r["name"] for r in pieces["routes"]] == [
        "relay_resume",
        "detached",
        "relay_readers",
        "relay_grpc",
        "generations",
    ]
    listeners = {li["name"]: li for li in template["static_resources"]["listeners"]}
    assert pieces["listeners"] == [listeners["egress"]]
    clusters = {c["name"]: c for c in template["static_resources"]["clusters"]}
    assert pieces["clusters"] == [clusters["relay_grpc"], clusters["relay_http"]]


def test_it_says_where_each_piece_goes_and_documents_its_fields() -> None:
    lines = snippet(PORTS).splitlines()
    for piece in PIECES:  # a comment block right above each top-level key
        assert lines[lines.index(f"{piece}:") - 1].startswith("# "), piece
    for field in DOCUMENTED:
        at = [
            i
            for i, line in enumerate(lines)
            if line.strip().startswith((f"{field}:", f"- {field}:"))
        ]
        assert at, field
        commented = [
            i
            for i in at
            if "#" in lines[i] or any(lines[j].strip().startswith("#") for j in (i - 1, i + 1))
        ]
        assert commented, f"{field} has no comment in the snippet"


def test_the_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--relay-grpc-port", "50051", "--relay-http-port", "8081", "--egress-port", "10001"]
    assert main(["envoy-config", "--snippet", *args]) == 0
    assert capsys.readouterr().out == snippet(PORTS)
    assert main(["envoy-config", "--snippet", "--write-path", "inline", *args]) == 0
    inline = yaml.safe_load(capsys.readouterr().out)
    generations = next(r for r in inline["routes"] if r["name"] == "generations")
    metadata = generations["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["overrides"]
    assert metadata["grpc_initial_metadata"] == [{"key": "x-relay-write-path", "value": "inline"}]
    assert main(["envoy-config"]) == 2  # the whole config still needs its upstream


def test_merged_into_a_front_proxy_envoy_accepts_it(tmp_path: Path) -> None:
    merged = plain.build(Ports(relay_grpc=50051, relay_http=8081, llm=8000, egress=10001))
    config = tmp_path / "front-proxy.yaml"
    config.write_text(yaml.safe_dump(merged))
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("template", "piece", "expected"),
    [
        (["a: &items", "- x: 1", "- x: 2", "b: 3"], "c: *items", {"c": [{"x": 1}, {"x": 2}]}),
        (["- f: &flags", "    k: 1", "  s: 2"], "- g: *flags", [{"g": {"k": 1}}]),
        (["a:", "  m: &deep", "    - 1", "  n: 2"], "  z: *deep", {"z": [1]}),
    ],
)
def test_an_alias_becomes_its_anchors_value(
    template: list[str], piece: str, expected: object
) -> None:
    """A piece cut from the template carries the value an alias stands for (a list at its key's
    own column included), so it loads without the anchor."""
    expanded = _expand_aliases(piece.strip(), template)
    assert "*" not in expanded
    assert yaml.safe_load(expanded) == expected
