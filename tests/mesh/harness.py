"""One platform's stack on loopback: the demo upstream, a relay node configured as
deploy/kubernetes configures it (relay.toml, the Deployment's serve flags), and a real Envoy
running the bootstrap a builder made for that platform; optionally a second Envoy of the same
platform whose ext_proc service refuses connections (the processor down, the relay's HTTP front
and the LLM up). Every child is stopped by `stop()`."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from extproc.ops.supervisor import (
    Child,
    Stack,
    StartupError,
    envoy_binary,
    free_port,
    http_ok,
    python_child,
    read_ports,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RELAY_TOML = DEPLOY / "kubernetes" / "relay.toml"
DEMO_RATE = 200.0  # events/s unless a test asks for another (x-demo-rate)


@dataclass(frozen=True)
class Ports:
    """Where the builders point Envoy: the relay node, the LLM, the egress listener."""

    relay_grpc: int
    relay_http: int
    llm: int
    egress: int


Builder = Callable[[Ports], dict[str, Any]]


def h2c_protocol_options() -> dict[str, Any]:
    """A cluster's upstream protocol as the platforms render h2c (appProtocol
    kubernetes.io/h2c); a fresh copy, as patches may merge into it."""
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def loopback_endpoint(name: str, port: int) -> dict[str, Any]:
    """A cluster's load_assignment: its one host on this machine, where the tests run it."""
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    endpoint = {"endpoint": {"address": address}}
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}


@dataclass
class MeshStack:
    """A running platform stack; `host` is the Host header its virtual host answers."""

    name: str
    stack: Stack
    listener: str
    host: str
    relay_flags: tuple[str, ...]
    ports: Ports
    base_url: str = ""
    relay: Child | None = field(default=None, repr=False)
    # The second Envoy's public URL (start_without_processor), and the bound, never listening
    # socket its ext_proc service points at: connections to it are refused.
    no_processor_url: str = ""
    refusing: socket.socket | None = field(default=None, repr=False)

    @property
    def admin_url(self) -> str:
        return self.stack.admin_url

    @property
    def upstream_url(self) -> str:
        return self.stack.upstream_url

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.admin_url}/stats?format=json", timeout=5) as got:
            stats = json.load(got)["stats"]
        return {s["name"]: int(s["value"]) for s in stats if "value" in s}

    def llm_calls(self) -> int:
        """Chat completions the demo LLM has answered (its own count, not Envoy's)."""
        with urllib.request.urlopen(f"{self.upstream_url}/demo/stats", timeout=5) as got:
            return int(json.load(got)["chat_completions"])

    def kill_relay(self) -> None:
        assert self.relay is not None
        self.relay.process.send_signal(signal.SIGKILL)
        self.relay.process.wait(timeout=10)

    def stop(self) -> None:
        self.stack.stop()
        if self.refusing is not None:
            self.refusing.close()


def relay_argv(ports_file: Path, egress_url: str, extra: tuple[str, ...]) -> list[str]:
    """`serve` as the Deployment runs it (its --config is deploy/kubernetes/relay.toml), with
    loopback ports, the memory store (one node here) and this platform's egress."""
    return python_child(
        "serve",
        "--config",
        str(RELAY_TOML),
        *("--store", "memory", "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"),
        *("--egress-url", egress_url, "--ports-file", str(ports_file)),
        *extra,
    )


def _admin_statuses(admin_url: str, what: str) -> list[dict[str, Any]] | None:
    """Envoy admin's /listeners or /clusters as JSON; None while Envoy cannot answer."""
    try:
        with urllib.request.urlopen(f"{admin_url}/{what}?format=json", timeout=1) as got:
            statuses: list[dict[str, Any]] = json.load(got)[f"{what[:-1]}_statuses"]
    except (OSError, ValueError, KeyError):
        return None
    return statuses


def _listener_port(admin_url: str, name: str) -> int | None:
    listeners = _admin_statuses(admin_url, "listeners")
    if listeners is None:
        return None
    for listener in listeners:
        if listener.get("name") == name:
            return int(listener["local_address"]["socket_address"]["port_value"])
    return None


def start(
    name: str,
    workdir: Path,
    build: Builder,
    *,
    listener: str,
    host: str,
    relay_flags: tuple[str, ...] = (),
    egress_url: Callable[[Ports], str] | None = None,
) -> MeshStack:
    """Start upstream, relay node and Envoy; on any failure stop what started and raise."""
    stack = Stack(workdir)
    try:
        return _start(stack, name, build, listener, host, relay_flags, egress_url)
    except BaseException:
        stack.stop()
        raise


def _start(
    stack: Stack,
    name: str,
    build: Builder,
    listener: str,
    host: str,
    relay_flags: tuple[str, ...],
    egress_url: Callable[[Ports], str] | None,
) -> MeshStack:
    upstream_file = stack.workdir / "upstream.ports"
    upstream = stack.spawn(
        "demo-upstream",
        python_child(
            "demo-upstream",
            "--port",
            "0",
            "--rate",
            str(DEMO_RATE),
            "--ports-file",
            str(upstream_file),
        ),
    )
    wait_until("its ports file", upstream, lambda: read_ports(upstream_file) is not None)
    llm_port = (read_ports(upstream_file) or {})["http_port"]
    stack.upstream_url = f"http://127.0.0.1:{llm_port}"
    wait_until("healthy", upstream, lambda: http_ok(f"{stack.upstream_url}/healthz"))

    egress_port = free_port()
    draft = Ports(relay_grpc=0, relay_http=0, llm=llm_port, egress=egress_port)
    stack.egress_url = (
        egress_url(draft) if egress_url is not None else f"http://127.0.0.1:{egress_port}"
    )
    relay_file = stack.workdir / "relay.ports"
    relay = stack.spawn("relay", relay_argv(relay_file, stack.egress_url, relay_flags))
    wait_until("its ports file", relay, lambda: read_ports(relay_file) is not None)
    bound = read_ports(relay_file) or {}
    stack.relay_http_url = f"http://127.0.0.1:{bound['http_port']}"
    wait_until("healthy", relay, lambda: http_ok(f"{stack.relay_http_url}/healthz"))
    ports = Ports(bound["grpc_port"], bound["http_port"], llm_port, egress_port)

    envoy, stack.admin_url, port = _spawn_envoy(stack, "envoy", build(ports), listener)
    running = MeshStack(name, stack, listener, host, relay_flags, ports, relay=relay)
    running.base_url = f"http://127.0.0.1:{port}"
    # Envoy's active health checks must see the relay before traffic can reach it.
    relay_ports = {ports.relay_grpc, ports.relay_http}
    wait_until(
        "the relay healthy in Envoy", envoy, lambda: hosts_healthy(stack.admin_url, relay_ports)
    )
    return running


def _spawn_envoy(
    stack: Stack, name: str, config: dict[str, Any], listener: str
) -> tuple[Child, str, int]:
    """Start an Envoy on `config`; wait until it is ready. Its child, admin URL and the port of
    `listener`."""
    path = stack.workdir / f"{name}.json"
    path.write_text(json.dumps(config, indent=1))
    admin_file = stack.workdir / f"{name}.admin"
    envoy = stack.spawn(
        name,
        [
            envoy_binary(),
            *("-c", str(path), "--disable-hot-restart", "--log-level", "warning"),
            *("--admin-address-path", str(admin_file)),
        ],
    )
    wait_until(
        "its admin address",
        envoy,
        lambda: admin_file.is_file() and bool(admin_file.read_text().strip()),
    )
    admin_url = f"http://{admin_file.read_text().strip()}"
    wait_until("ready", envoy, lambda: http_ok(f"{admin_url}/ready"))
    port = _listener_port(admin_url, listener)
    if port is None:
        raise StartupError(f"{name} has no listener {listener!r}")
    return envoy, admin_url, port


def start_without_processor(running: MeshStack, build: Builder) -> None:
    """A second Envoy for this stack, built for the same platform, whose ext_proc service (and
    gRPC reader route) is a port that refuses connections: to it the relay's processor is
    down, while the relay's HTTP front and the LLM are up. Its egress listener, where the
    platform has one, gets a port of its own."""
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    running.refusing = refusing
    ports = replace(running.ports, relay_grpc=refusing.getsockname()[1], egress=free_port())
    envoy, admin_url, port = _spawn_envoy(
        running.stack, "envoy-no-processor", build(ports), running.listener
    )
    wait_until(
        "the relay's HTTP front healthy in Envoy",
        envoy,
        lambda: hosts_healthy(admin_url, {ports.relay_http}),
    )
    running.no_processor_url = f"http://127.0.0.1:{port}"


def hosts_healthy(admin_url: str, ports: set[int]) -> bool:
    """Every host of Envoy's clusters on one of these ports is healthy (per Envoy's admin)."""
    clusters = _admin_statuses(admin_url, "clusters")
    if clusters is None:
        return False
    for cluster in clusters:
        for host in cluster.get("host_statuses", []):
            if host["address"]["socket_address"]["port_value"] not in ports:
                continue
            if host["health_status"].get("eds_health_status") != "HEALTHY" or any(
                flag for key, flag in host["health_status"].items() if key.startswith("failed")
            ):
                return False
    return True
