"""docker-compose.yml holds together without a Docker engine: every mounted file exists, images
are pinned, ports and service names agree with the Envoy config it mounts, and that config is
a fresh render of the repo's template that Envoy itself validates."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from test_observability import SCRAPE_JOBS

from extproc.node.config import DEFAULT_DRAIN_TIMEOUT_S
from extproc.ops.supervisor import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_ENVOY = ROOT / "envoy" / "compose" / "envoy.yaml"
PINNED = re.compile(r"^[a-z0-9./_-]+:v?\d+\.\d+\.\d+[a-z0-9.-]*$")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load(COMPOSE))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def envoy_config() -> dict[str, Any]:
    return dict(load(COMPOSE_ENVOY))


def render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "render_compose_envoy", ROOT / "dashboards" / "render_compose_envoy.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flags(command: list[str]) -> dict[str, str]:
    """`--name=value` items of a compose command list."""
    return dict(item.removeprefix("--").split("=", 1) for item in command if "=" in item)


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts.append((source, target))
    return mounts


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host side of its mapping ("8080", "127.0.0.1:9901")."""
    ports = {}
    for mapping in service.get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        ports[int(container)] = host
    return ports


def socket_address(envoy_config: dict[str, Any], *, listener: str = "", cluster: str = "") -> Any:
    resources = envoy_config["static_resources"]
    if listener:
        found = next(x for x in resources["listeners"] if x["name"] == listener)
        return found["address"]["socket_address"]
    found = next(x for x in resources["clusters"] if x["name"] == cluster)
    endpoint = found["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    return endpoint["address"]["socket_address"]


def test_every_mounted_file_exists(services: dict[str, dict[str, Any]]) -> None:
    mounts = [m for service in services.values() for m in bind_mounts(service)]
    assert len(mounts) >= 5
    for source, target in mounts:
        assert (ROOT / source).exists(), f"{source} (mounted at {target}) does not exist"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
            continue
        image = service["image"]
        assert PINNED.match(image), f"{name}: image {image!r} is not pinned to a version"
    assert services["envoy"]["image"].startswith("envoyproxy/envoy:v1.40.")


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = [source for line in copies for source in line.split()]
    assert "extproc" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        for pattern in ignored:
            assert not fnmatch.fnmatch(source, pattern), f"{source} is ignored by {pattern}"
            assert not source.startswith(pattern.rstrip("/") + "/"), (source, pattern)


def test_dockerfile_copies_every_file_the_wheel_build_needs() -> None:
    """`pip install .` in the image builds the wheel from what the Dockerfile copied: every
    file pyproject.toml force-includes must be among it, or the build stops."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    forced = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), re.M)
    copied = [source.rstrip("/") for line in copies for source in line.split()]
    for source in forced:
        # The file itself, a directory holding it, or (a directory) some of its files.
        present = [
            c for c in copied if f"{source}/".startswith(f"{c}/") or c.startswith(f"{source}/")
        ]
        assert present, f"{source} (force-included in the wheel) is not copied by the Dockerfile"


def test_compose_envoy_config_is_a_fresh_render_that_envoy_validates(
    services: dict[str, dict[str, Any]],
) -> None:
    assert ("./envoy/compose/envoy.yaml", "/etc/envoy/envoy.yaml") in bind_mounts(services["envoy"])
    assert services["envoy"]["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]
    assert COMPOSE_ENVOY.read_text() == render_script().render(), (
        "envoy/compose/envoy.yaml is stale: run python dashboards/render_compose_envoy.py"
    )
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(COMPOSE_ENVOY)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ports_and_hosts_agree_with_the_envoy_config(
    services: dict[str, dict[str, Any]], envoy_config: dict[str, Any]
) -> None:
    public = socket_address(envoy_config, listener="public")
    egress = socket_address(envoy_config, listener="egress")
    admin = envoy_config["admin"]["address"]["socket_address"]
    relay_grpc = socket_address(envoy_config, cluster="relay_grpc")
    relay_http = socket_address(envoy_config, cluster="relay_http")
    llm = socket_address(envoy_config, cluster="llm")

    envoy_ports = published(services["envoy"])
    assert envoy_ports[public["port_value"]] == str(public["port_value"])
    assert envoy_ports[admin["port_value"]] == f"127.0.0.1:{admin['port_value']}"  # loopback
    assert {public["address"], egress["address"], admin["address"]} == {"0.0.0.0"}

    relay = flags(services["relay"]["command"])
    assert relay_grpc["address"] == relay_http["address"] == "relay"
    assert "relay" in services
    assert int(relay["grpc-port"]) == relay_grpc["port_value"]
    assert int(relay["http-port"]) == relay_http["port_value"]
    assert relay["egress-url"] == f"http://envoy:{egress['port_value']}"
    assert relay["host"] == "0.0.0.0"
    assert f":{relay_http['port_value']}/healthz" in " ".join(
        services["relay"]["healthcheck"]["test"]
    )
    replicas = services["relay"]["deploy"]["replicas"]
    assert replicas >= 2 and relay["store"].startswith("redis://redis:")
    assert "redis" in services and "redis" in services["relay"]["depends_on"]
    first = relay_http["port_value"]  # one host port per replica, on loopback
    assert published(services["relay"]) == {first: f"127.0.0.1:{first}-{first + replicas - 1}"}

    upstream = flags(services["demo-upstream"]["command"])
    assert llm["address"] in services
    assert int(upstream["port"]) == llm["port_value"]
    assert upstream["host"] == "0.0.0.0"
    assert f":{llm['port_value']}/healthz" in " ".join(
        services["demo-upstream"]["healthcheck"]["test"]
    )


def test_prometheus_scrapes_the_relay_and_envoy_admin(
    services: dict[str, dict[str, Any]], envoy_config: dict[str, Any]
) -> None:
    mounts = dict(bind_mounts(services["prometheus"]))
    config_path = mounts["./dashboards/prometheus/prometheus.yml"]
    assert f"--config.file={config_path}" in services["prometheus"]["command"]
    config = load(ROOT / "dashboards" / "prometheus" / "prometheus.yml")
    for rule_file in config["rule_files"]:  # relative to the config file, in the container
        mounted = str(Path(config_path).parent / rule_file)
        assert mounted in mounts.values(), rule_file
        source = next(src for src, dst in mounts.items() if dst == mounted)
        assert (ROOT / source).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {name: job["metrics_path"] for name, job in jobs.items()} == SCRAPE_JOBS
    relay_http = socket_address(envoy_config, cluster="relay_http")
    admin = envoy_config["admin"]["address"]["socket_address"]
    relay_sd = {"names": ["relay"], "type": "A", "port": relay_http["port_value"]}
    assert jobs["relay"]["dns_sd_configs"] == [relay_sd]  # every replica
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{admin['port_value']}"]


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    assert published(grafana) == {3000: "3000"}
    mounts = dict(bind_mounts(grafana))
    assert mounts["./dashboards/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = ROOT / "dashboards" / "grafana" / "provisioning"
    datasources = load(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090")
    ]
    assert "9090" in str(services["prometheus"]["ports"])
    providers = load(provisioning / "dashboards" / "stream-relay.yaml")["providers"]
    dashboard_target = mounts["./dashboards/grafana/stream-relay.json"]
    assert [p["options"]["path"] for p in providers] == [str(Path(dashboard_target).parent)]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboard_target


def test_the_relay_may_drain_before_docker_kills_it(services: dict[str, dict[str, Any]]) -> None:
    """Docker's default is SIGKILL 10 s after SIGTERM: half the relay's default drain."""
    relay = services["relay"]
    drain = float(flags(relay["command"]).get("drain-timeout", DEFAULT_DRAIN_TIMEOUT_S))
    grace = re.fullmatch(r"(\d+)s", str(relay.get("stop_grace_period", "10s")))
    assert grace is not None, relay.get("stop_grace_period")
    assert int(grace.group(1)) >= drain + 15  # the gRPC stop and last Redis copy after it
