"""Renders the Envoy config in `envoy/` for one stack: ports, the relay node, the LLM upstream.

The template is plain commented YAML with `${NAME}` placeholders, so what a platform team
reads in the repo is what runs; this module only fills in addresses. The links between Envoy
and the relay are loopback TCP ports (`envoy-config`, your own Envoy) or Unix sockets (`up`:
in a private directory, nobody can take or race them, and a restarted peer keeps its address).
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from extproc.errors import ConfigError
from extproc.ops.envoy_security import DEFAULT_MAX_CONNECTIONS, NO_SECURITY, EnvoySecurity
from extproc.vocabulary import GENERATION_PATHS, WritePath

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


def _address(host: str) -> str:
    """An address as a YAML flow scalar: an IPv6 one is quoted (a bare `::` ends the mapping's
    key), the others stay bare, as the template writes them."""
    return json.dumps(host) if ":" in host else host


def _tcp(host: str, port: int) -> str:
    return f"socket_address: {{ address: {_address(host)}, port_value: {port} }}"


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
    Envoy's limits (extproc/ops/envoy_security.py). Without it the template renders as before."""
    if write_path not in tuple(WritePath):
        choices = ", ".join(WritePath)
        raise ConfigError(f"write path must be one of {choices}, got {write_path!r}")
    max_connections = DEFAULT_MAX_CONNECTIONS if security is None else security.max_connections
    return Template(template_text()).substitute(
        EGRESS_ADDRESS=ports.egress_address(),
        GENERATION_WRITE_PATH=write_path,
        GENERATION_PATHS=json.dumps(GENERATION_PATHS),  # a JSON string is a YAML scalar
        ADMIN_PORT=ports.admin_port,
        LISTEN_ADDRESS=_address(ports.listen_address),
        LISTEN_PORT=ports.listen_port,
        RELAY_GRPC_ENDPOINTS=ports.relay_endpoints(0),
        RELAY_HTTP_ENDPOINTS=ports.relay_endpoints(1),
        MAX_CLUSTER_REQUESTS=max_connections,
        LLM_HOST=_address(upstream.host),
        LLM_PORT=upstream.port,
        LLM_DISCOVERY="STATIC" if upstream.is_ip else "STRICT_DNS",
        LLM_TLS=_TLS_BLOCK.format(host=upstream.host) if upstream.tls else "",
        # A hosted API routes on its own Host name; a local one does not care.
        LLM_HOST_REWRITE="" if upstream.is_ip else ", auto_host_rewrite: true",
        **(NO_SECURITY if security is None else security.placeholders()),
    )


# --- `envoy-config --snippet`: the pieces of the same template to merge into your own Envoy ---

_SNIPPET_HEAD = """\
# stream-relay: what to merge into an Envoy you already run (Envoy 1.40 API, v3).
# Cut from envoy/envoy.yaml, the config `stream-relay up` runs and the tests exercise, with
# its own comments; each top-level key below says where its contents go (the keys themselves
# are not Envoy fields). `cluster: llm` stands for YOUR LLM cluster: rename it.
"""
_WHERE = {
    "http_connection_manager": """\
# Merge into the HttpConnectionManager of the listener that serves your LLM API (keep your
# own values where they are stricter).""",
    "http_filters": """\
# Insert just before envoy.filters.http.router: after your authentication filters (the relay
# trusts the identity they set) and after any compressor (a compressor listed after ext_proc
# would hand the relay gzip bytes it cannot frame; listed before, its encoder runs after).""",
    "routes": """\
# Put these FIRST in the virtual host of your LLM routes: the re-routes only work inside the
# virtual host where the processor cleared the route cache, and `generations` must win over
# your own LLM routes (rename its `cluster: llm`). Leave ext_proc off on your own routes, but
# give those that stream `timeout: 0s` (Envoy's default 15 s cuts streams).""",
    "listeners": """\
# Add to static_resources.listeners; the relay's --egress-url points at it.""",
    "clusters": """\
# Add to static_resources.clusters; the endpoints are your relay nodes.""",
}
_HEADER_MUTATION = "type.googleapis.com/envoy.extensions.http.early_header_mutation." + (
    "header_mutation.v3.HeaderMutation"
)
_DISABLED_UNTIL_A_ROUTE = """\
  # Off by default: only the `generations` route below turns it on. Your own routes (the rest
  # of your LLM API included: an event stream there keeps the upstream's own ids, which its
  # clients send back in Last-Event-ID) and your other apps never reach it.
  disabled: true"""


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _find(lines: list[str], pattern: str, lo: int = 0, hi: int | None = None) -> int:
    """The index of the first line in [lo, hi) that is `pattern` once stripped."""
    for index in range(lo, len(lines) if hi is None else hi):
        if lines[index].strip() == pattern:
            return index
    raise ValueError(f"envoy template: no line {pattern!r}")


def _end(lines: list[str], start: int) -> int:
    """Where the YAML node starting at `start` (a `key:` or a `- ` item) ends: the first line
    after it that is neither blank nor indented deeper than the node (a key's list items may
    sit at the key's own indent, comments above them included)."""
    own = _indent_of(lines[start])
    key = not lines[start].lstrip().startswith("- ")
    index = start + 1
    while index < len(lines):
        line = lines[index]
        if line.strip() and _indent_of(line) <= own:
            rest = (ln for ln in lines[index:] if not ln.lstrip().startswith("#"))
            item = next(rest, "")
            if not (key and _indent_of(item) == own and item.lstrip().startswith("- ")):
                break
        index += 1
    while index > start + 1 and not lines[index - 1].strip():
        index -= 1
    return index


def _block(lines: list[str], start: int, indent: int) -> str:
    """The node at `start` with the comment lines just above it, moved to `indent` columns."""
    first = start
    while first > 0 and lines[first - 1].strip().startswith("#"):
        if _indent_of(lines[first - 1]) != _indent_of(lines[start]):
            break
        first -= 1
    shift = _indent_of(lines[start]) - indent
    return "\n".join(
        line[shift:] if line.strip() else "" for line in lines[first : _end(lines, start)]
    )


def _key_column(line: str) -> int:
    """The column where the line's key starts (after a `- ` list marker)."""
    return _indent_of(line.replace("- ", "  ", 1) if line.lstrip().startswith("- ") else line)


def _anchored(lines: list[str], anchor: str) -> tuple[int, list[str]]:
    """The column of the key that carries `&anchor` and the lines of its value: deeper lines,
    and list items at the key's own column (YAML lets a key's list sit there)."""
    for index, line in enumerate(lines):
        if line.rstrip().endswith(f": &{anchor}"):
            key = _key_column(line)
            end = index + 1
            while end < len(lines):
                below, column = lines[end], _indent_of(lines[end])
                in_value = column > key or (column == key and below.lstrip().startswith("- "))
                if below.strip() and not in_value:
                    break
                end += 1
            return key, [re.sub(r" &[\w-]+$", "", ln) for ln in lines[index + 1 : end]]
    raise ValueError(f"envoy template: no anchor &{anchor}")


def _expand_aliases(block: str, lines: list[str]) -> str:
    """`block` with each `key: *anchor` replaced by the anchored value from the template: a
    piece cut from the template cannot lean on an anchor defined outside it."""
    out: list[str] = []
    for line in block.split("\n"):
        alias = re.search(r": \*([\w-]+)$", line)
        if alias is None:
            out.append(line)
            continue
        column, value = _anchored(lines, alias.group(1))
        own = _key_column(line)
        # The anchor's name says what the value is for, in place of the comment left behind.
        out.append(f"{line[: alias.start() + 1]}  # {alias.group(1).replace('_', ' ')}")
        shift = own - column
        out.extend(" " * shift + ln if shift >= 0 else ln[-shift:] for ln in value)
    return "\n".join(out)


def _strip_early(internal_only: str) -> str:
    """The template's `internal_only_headers` list as early header removal. Envoy strips
    internal-only headers only from requests it deems external; an Envoy with
    `internal_address_config` keeps them on "internal" clients (measured on 1.40: such a client
    routed itself to the relay's resume path). Early removal applies to every request, before
    routing and before any filter."""
    names = internal_only.partition("[")[2].rstrip("]").split(",")
    removals = "\n".join(f"      - remove: {name.strip()}" for name in names)
    return f"""\
  # Only the relay sets x-relay-target and only your authentication sets the identity headers:
  # strip any copy a client sends before routing and before any filter runs (unlike
  # route_config.internal_only_headers, which spares clients in your internal_address_config).
  early_header_mutation_extensions:
  - name: envoy.http.early_header_mutation.header_mutation
    typed_config:
      "@type": {_HEADER_MUTATION}
      mutations:
{removals}"""


def snippet(
    ports: EnvoyPorts,
    upstream: Upstream | None = None,
    *,
    write_path: str = "detached",
    security: EnvoySecurity | None = None,
) -> str:
    """What to merge into an existing Envoy, cut from the rendered template (so it cannot
    drift from what `up` runs): HCM fields, the ext_proc filter (made opt-in per route), the
    relay's routes, the per-route config for your LLM routes, the egress listener and the
    relay clusters. `upstream` only decides Host rewriting toward a named LLM."""
    text = render(
        ports,
        upstream or Upstream("127.0.0.1", 80, tls=False),
        write_path=write_path,
        security=EnvoySecurity() if security is None else security,
    )
    lines = text.splitlines()
    public = _find(lines, "- name: public")
    clusters = _find(lines, "clusters:")
    hcm = (public, _end(lines, public))
    routes = _find(lines, "routes:", *hcm)
    route_end = _end(lines, _find(lines, "- name: llm", *hcm))  # the virtual host

    def in_hcm(key: str) -> str:
        matches = [i for i in range(*hcm) if lines[i].strip().startswith(key)]
        return _block(lines, matches[0], 2)

    def route(name: str) -> str:
        return _block(lines, _find(lines, f"- name: {name}", routes, route_end), 0)

    ext_proc = _block(lines, _find(lines, "- name: envoy.filters.http.ext_proc", *hcm), 0)
    head, _, rest = ext_proc.partition("\n")
    parts = {
        "http_connection_manager": "\n".join(
            [
                in_hcm("stream_idle_timeout:"),
                in_hcm("http2_protocol_options:"),
                in_hcm("upgrade_configs:"),
                _strip_early(in_hcm("internal_only_headers:")),
            ]
        ),
        "http_filters": f"{head}\n{_DISABLED_UNTIL_A_ROUTE}\n{rest}",
        "routes": "\n".join(
            route(name)
            for name in ("relay_resume", "detached", "relay_readers", "relay_grpc", "generations")
        ),
        "listeners": _block(lines, _find(lines, "- name: egress", public), 0),
        "clusters": "\n".join(
            _block(lines, _find(lines, f"- name: {name}", clusters), 0)
            for name in ("relay_grpc", "relay_http")
        ),
    }
    return _SNIPPET_HEAD + "".join(
        f"\n{_WHERE[key]}\n{key}:\n{_expand_aliases(body, lines)}\n" for key, body in parts.items()
    )
