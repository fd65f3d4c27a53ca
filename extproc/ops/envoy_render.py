"""Renders the Envoy config in `envoy/` for one stack: ports, the relay node, the LLM upstream.

The template is plain commented YAML with `${NAME}` placeholders, so what a platform team
reads in the repo is what runs; this module only fills in addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from extproc.errors import ConfigError
from extproc.ops.envoy_security import NO_SECURITY, EnvoySecurity
from extproc.vocabulary import WritePath

TEMPLATE_NAME = "envoy.yaml"
UPSTREAM_PROBE_TIMEOUT_S = 2.0
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

    def unreachable(self, timeout_s: float = UPSTREAM_PROBE_TIMEOUT_S) -> str | None:
        """Why a TCP connection to the upstream fails right now, as a sentence (None when it
        connects): `up` warns at start, as every request would get 502 upstream_unreachable."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s):
                return None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
        return (
            f"the upstream {self.host}:{self.port} does not accept connections ({why}): "
            "requests will get 502 upstream_unreachable until it does"
        )

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True, kw_only=True)
class EnvoyPorts:
    listen_address: str = "127.0.0.1"
    listen_port: int
    admin_port: int
    relay_host: str = "127.0.0.1"
    relay_grpc_port: int
    relay_http_port: int
    egress_port: int = 10001  # loopback listener for the relay's own upstream calls
    more_relays: tuple[tuple[int, int], ...] = ()  # further nodes: (grpc port, http port)

    @property
    def relays(self) -> tuple[tuple[int, int], ...]:
        return ((self.relay_grpc_port, self.relay_http_port), *self.more_relays)


_ENDPOINT = """\
        - endpoint:
            address:
              socket_address: {{ address: {host}, port_value: {port} }}"""


def _endpoints(host: str, ports: list[int]) -> str:
    return "\n".join(_ENDPOINT.format(host=host, port=port) for port in ports)


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
    return Template(template_text()).substitute(
        EGRESS_PORT=ports.egress_port,
        GENERATION_WRITE_PATH=write_path,
        ADMIN_PORT=ports.admin_port,
        LISTEN_ADDRESS=ports.listen_address,
        LISTEN_PORT=ports.listen_port,
        RELAY_GRPC_ENDPOINTS=_endpoints(ports.relay_host, [g for g, _ in ports.relays]),
        RELAY_HTTP_ENDPOINTS=_endpoints(ports.relay_host, [h for _, h in ports.relays]),
        LLM_HOST=upstream.host,
        LLM_PORT=upstream.port,
        LLM_DISCOVERY="STATIC" if upstream.is_ip else "STRICT_DNS",
        LLM_TLS=_TLS_BLOCK.format(host=upstream.host) if upstream.tls else "",
        # A hosted API routes on its own Host name; a local one does not care.
        LLM_HOST_REWRITE="" if upstream.is_ip else ", auto_host_rewrite: true",
        **(NO_SECURITY if security is None else security.placeholders()),
    )
