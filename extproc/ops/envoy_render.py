"""Renders the Envoy config in `envoy/` for one stack: ports, the relay node, the LLM upstream.

The template is plain commented YAML with `${NAME}` placeholders, so what a platform team
reads in the repo is what runs; this module only fills in addresses. The links between Envoy
and the relay are loopback TCP ports (`envoy-config`, your own Envoy) or Unix sockets (`up`:
in a private directory, nobody can take or race them, and a restarted peer keeps its address).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from extproc.errors import ConfigError
from extproc.ops.envoy_security import DEFAULT_MAX_CONNECTIONS, NO_SECURITY, EnvoySecurity
from extproc.vocabulary import WritePath

TEMPLATE_NAME = "envoy.yaml"
_TLS_BLOCK = """\
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {host}
        common_tls_context:
          validation_context:
            trusted_ca: {{ filename: /etc/ssl/certs/ca-certificates.crt }}
"""


@dataclass(frozen=True)
class Upstream:
    """Where the LLM lives, parsed from a URL such as http://127.0.0.1:9000."""

    host: str
    port: int
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--upstream must be an http:// or https:// URL, got {url!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(
                f"--upstream takes the server root (the relay forwards /v1/...), got {url!r}"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ConfigError(f"--upstream has an invalid port: {url!r}") from exc
        return cls(parts.hostname, port, parts.scheme == "https")

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


# Sun_path holds 108 bytes with its NUL: a longer socket path cannot be bound at all.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True, kw_only=True)
class RelaySockets:
    """Unix socket paths for Envoy's links to the relay nodes and for its egress listener."""

    egress: str
    relays: tuple[tuple[str, str], ...]  # per node: (gRPC socket, HTTP socket)

    def __post_init__(self) -> None:
        for path in (self.egress, *(p for pair in self.relays for p in pair)):
            if len(path.encode()) > MAX_SOCKET_PATH:
                raise ConfigError(f"Unix socket path longer than {MAX_SOCKET_PATH} bytes: {path}")


@dataclass(frozen=True, kw_only=True)
class EnvoyPorts:
    listen_address: str = "127.0.0.1"
    listen_port: int
    admin_port: int
    relay_host: str = "127.0.0.1"
    relay_grpc_port: int = 0
    relay_http_port: int = 0
    egress_port: int = 10001  # loopback listener for the relay's own upstream calls
    more_relays: tuple[tuple[int, int], ...] = ()  # further nodes: (grpc port, http port)
    sockets: RelaySockets | None = None  # instead of the relay and egress ports above

    @property
    def relays(self) -> tuple[tuple[int, int], ...]:
        return ((self.relay_grpc_port, self.relay_http_port), *self.more_relays)

    def relay_endpoints(self, kind: int) -> str:
        """Cluster endpoints of every node's gRPC (kind 0) or HTTP (kind 1) front."""
        if self.sockets is not None:
            return "\n".join(_endpoint(_pipe(pair[kind])) for pair in self.sockets.relays)
        return "\n".join(_endpoint(_tcp(self.relay_host, p[kind])) for p in self.relays)

    def egress_address(self) -> str:
        if self.sockets is not None:
            return _pipe(self.sockets.egress, mode=0o600)
        return _tcp("127.0.0.1", self.egress_port)


def _tcp(host: str, port: int) -> str:
    return f"socket_address: {{ address: {host}, port_value: {port} }}"


def _pipe(path: str, *, mode: int | None = None) -> str:
    # Envoy reads `mode` (a listener's socket file permissions) as a decimal integer.
    return f"pipe: {{ path: {path}{'' if mode is None else f', mode: {mode}'} }}"


def _endpoint(address: str) -> str:
    return f"        - endpoint:\n            address:\n              {address}"


def template_text() -> str:
    """The shipped template: in the wheel as package data, or `envoy/` in a source checkout."""
    packaged = resources.files("extproc.ops").joinpath("envoy_template", TEMPLATE_NAME)
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parents[2] / "envoy" / TEMPLATE_NAME).read_text()


def render(
    ports: EnvoyPorts,
    upstream: Upstream,
    *,
    write_path: str = "detached",
    security: EnvoySecurity | None = None,
) -> str:
    """The config for one stack; `security` adds authentication, TLS, the LLM credential and
    Envoy's limits (extproc/envoy_security.py). Without it the template renders as before."""
    if write_path not in tuple(WritePath):
        choices = ", ".join(WritePath)
        raise ConfigError(f"write path must be one of {choices}, got {write_path!r}")
    max_connections = DEFAULT_MAX_CONNECTIONS if security is None else security.max_connections
    return Template(template_text()).substitute(
        EGRESS_ADDRESS=ports.egress_address(),
        GENERATION_WRITE_PATH=write_path,
        ADMIN_PORT=ports.admin_port,
        LISTEN_ADDRESS=ports.listen_address,
        LISTEN_PORT=ports.listen_port,
        RELAY_GRPC_ENDPOINTS=ports.relay_endpoints(0),
        RELAY_HTTP_ENDPOINTS=ports.relay_endpoints(1),
        MAX_CLUSTER_REQUESTS=max_connections,
        LLM_HOST=upstream.host,
        LLM_PORT=upstream.port,
        LLM_DISCOVERY="STATIC" if upstream.is_ip else "STRICT_DNS",
        LLM_TLS=_TLS_BLOCK.format(host=upstream.host) if upstream.tls else "",
        # A hosted API routes on its own Host name; a local one does not care.
        LLM_HOST_REWRITE="" if upstream.is_ip else ", auto_host_rewrite: true",
        **(NO_SECURITY if security is None else security.placeholders()),
    )
