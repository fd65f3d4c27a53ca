"""The Envoy side of security: client authentication, the caller's identity header, TLS on the
public listener, the LLM credential and Envoy's own limits, rendered into `envoy/envoy.yaml`.

Invariants: `x-relay-identity` reaches the relay only as Envoy set it (clients' copies are
stripped by `internal_only_headers`, and the LLM never sees it); keys and certificates are read
by Envoy from files, never printed; with `security=None` the template renders as it always did.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# One name for what Envoy sets and the relay reads: an API key's client name, and a verified
# JWT's payload exactly as signed (base64url), from which the relay derives the owner key.
from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER
from extproc.errors import ConfigError, RequestTooLarge
from extproc.ops.envoy_cors import cors_placeholders, granted_origin_headers
from extproc.ops.envoy_yaml import DISABLED_ON_ROUTE, T, scalar
from extproc.vocabulary import GENERATION_PATHS

API_KEY_HEADER = "x-api-key"
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_MAX_REQUEST_HEADERS_KB = 60  # Envoy's own default, made explicit
MAX_REQUEST_HEADERS_KB_LIMIT = 8192  # the largest value Envoy accepts
DEFAULT_REQUEST_HEADERS_TIMEOUT_S = 10.0
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_KEY = re.compile(r"[\x21-\x7e]{8,512}")  # printable ASCII, no spaces: survives any header


@dataclass(frozen=True)
class ApiKey:
    client: str
    key: str


def parse_api_keys(path: Path) -> tuple[ApiKey, ...]:
    """`client-name key` per line; `#` comments and blank lines are skipped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--api-keys: cannot read {path}: {exc}") from None
    keys: list[ApiKey] = []
    seen_keys: set[str] = set()
    seen_clients: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{where}: want 'client-name key', got {len(parts)} fields")
        client, key = parts
        if _CLIENT_NAME.fullmatch(client) is None:
            raise ConfigError(f"{where}: client name must match {_CLIENT_NAME.pattern}")
        if _KEY.fullmatch(key) is None:
            raise ConfigError(f"{where}: key must be 8 to 512 printable ASCII characters")
        if key in seen_keys:
            raise ConfigError(f"{where}: duplicate key (already given to another line)")
        if client in seen_clients:
            raise ConfigError(f"{where}: duplicate client name {client!r}")
        seen_keys.add(key)
        seen_clients.add(client)
        keys.append(ApiKey(client, key))
    if not keys:
        raise ConfigError(f"--api-keys: {path} has no keys")
    return tuple(keys)


DEFAULT_JWT_MAX_LIFETIME_S = 86400  # a token may be valid for at most this long from now


@dataclass(frozen=True, kw_only=True)
class JwtSettings:
    jwks_file: Path
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    max_lifetime_s: int = DEFAULT_JWT_MAX_LIFETIME_S  # `exp` is always required

    def __post_init__(self) -> None:
        if self.max_lifetime_s < 1:
            raise ConfigError(f"--jwt-max-lifetime must be >= 1 s, got {self.max_lifetime_s}")

    @property
    def unscoped(self) -> bool:
        """No issuer or no audience is checked: any token the JWKS signs is accepted."""
        return not self.issuer or not self.audiences

    @classmethod
    def load(
        cls,
        jwks_file: Path,
        issuer: str = "",
        audience: str = "",
        max_lifetime_s: int = DEFAULT_JWT_MAX_LIFETIME_S,
    ) -> JwtSettings:
        try:
            jwks = json.loads(jwks_file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--jwks: cannot read {jwks_file}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"--jwks: {jwks_file} is not JSON: {exc}") from None
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
            raise ConfigError(f"--jwks: {jwks_file} is not a JWKS (no 'keys' list)")
        return cls(
            jwks_file=jwks_file.resolve(),
            issuer=issuer,
            audiences=(audience,) if audience else (),
            max_lifetime_s=max_lifetime_s,
        )


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    @classmethod
    def load(cls, cert: Path, key: Path) -> TlsFiles:
        for what, path, marker in (("certificate", cert, "CERTIFICATE"), ("key", key, "KEY")):
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--tls: cannot read the {what} {path}: {exc}") from None
            if "-----BEGIN " not in text or marker not in text:
                raise ConfigError(f"--tls: {path} is not a PEM {what}")
        return cls(cert.resolve(), key.resolve())


def read_upstream_key(path: Path) -> str:
    """The LLM API key: the file's one non-empty line."""
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--upstream-key-file: cannot read {path}: {exc}") from None
    if len(lines) != 1 or _KEY.fullmatch(lines[0]) is None:
        raise ConfigError(
            f"--upstream-key-file: {path} must hold one key (8 to 512 printable ASCII characters)"
        )
    return lines[0]


@dataclass(frozen=True, kw_only=True)
class EnvoySecurity:
    """Everything security-related in one Envoy config. Defaults: authentication off, limits on."""

    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtSettings | None = None
    # A file holding the whole header value, `Bearer <key>`: Envoy reads it, nobody prints it.
    upstream_credential_file: Path | None = None
    tls: TlsFiles | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_request_headers_kb: int = DEFAULT_MAX_REQUEST_HEADERS_KB
    request_headers_timeout_s: float = DEFAULT_REQUEST_HEADERS_TIMEOUT_S
    max_request_bytes: int | None = None  # declared generation bodies at Envoy (413); None: off
    cors_origins: tuple[str, ...] = ()  # --cors-origin: browser origins granted (envoy_cors.py)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError(f"max connections must be positive, got {self.max_connections}")
        if not 1 <= self.max_request_headers_kb <= MAX_REQUEST_HEADERS_KB_LIMIT:
            raise ConfigError(
                f"max request headers must be 1..{MAX_REQUEST_HEADERS_KB_LIMIT} KiB, "
                f"got {self.max_request_headers_kb}"
            )
        if self.request_headers_timeout_s < 0.001:  # Envoy reads 0 as "no timeout"
            raise ConfigError("request headers timeout must be at least 0.001 s")

    @property
    def authenticated(self) -> bool:
        return bool(self.api_keys) or self.jwt is not None

    def placeholders(self) -> dict[str, str]:
        """The template's security placeholders, filled in."""
        return {
            "OVERLOAD_MANAGER": self._overload_manager(),
            "STATIC_SECRETS": self._secrets(),
            "ADMIN_EXTRA": "\n  ignore_global_conn_limit: true  # reachable at the limit",
            "EGRESS_EXTRA": "\n    ignore_global_conn_limit: true  # the relay's own calls",
            "PUBLIC_HCM_LIMITS": (
                f"\n          max_request_headers_kb: {self.max_request_headers_kb}"
                f"\n          request_headers_timeout: {self.request_headers_timeout_s:.3f}s"
            ),
            "INTERNAL_ONLY_EXTRA": f", {IDENTITY_HEADER}, {JWT_PAYLOAD_HEADER}",
            "AUTH_FILTERS": self._auth_filters(),
            "AUTH_OPEN_ROUTES": self._open_routes(),
            "LIMIT_ROUTES": self._limit_routes(),
            "PUBLIC_TLS": self._public_tls(),
            "LLM_UPSTREAM_FILTERS": self._llm_upstream_filters(),
            **cors_placeholders(self.cors_origins),
        }

    def _overload_manager(self) -> str:
        return f"""\
# Envoy refuses downstream connections beyond this many (all listeners except egress and
# admin): a flood of idle sockets cannot exhaust file descriptors or memory.
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": {T}extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: {self.max_connections}

"""

    def _secrets(self) -> str:
        if self.upstream_credential_file is None:
            return ""
        return f"""
  secrets:
  - name: llm_credential  # the whole Authorization value; read by Envoy from the file only
    generic_secret:
      secret: {{ filename: {scalar(self.upstream_credential_file)} }}"""

    def _auth_filters(self) -> str:
        """jwt_authn, then api_key_auth: both before ext_proc."""
        filters = ""
        both = bool(self.api_keys) and self.jwt is not None
        if self.jwt is not None:
            jwt = self.jwt
            issuer = f"\n                  issuer: {scalar(jwt.issuer)}" if jwt.issuer else ""
            audiences = (
                f"\n                  audiences: [{', '.join(scalar(a) for a in jwt.audiences)}]"
                if jwt.audiences
                else ""
            )
            # With API keys too, a missing or failed JWT is not yet a 401: api_key_auth decides.
            requires = (
                "{ requires_any: { requirements: [{ provider_name: relay }, "
                "{ allow_missing_or_failed: {} }] } }"
                if both
                else "{ provider_name: relay }"
            )
            filters += f"""
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": {T}extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                relay:{issuer}{audiences}
                  local_jwks: {{ filename: {scalar(jwt.jwks_file)} }}
                  from_headers: [{{ name: authorization, value_prefix: "Bearer " }}]
                  forward: false  # the token is removed before any upstream sees it
                  subjects: {{ safe_regex: {{ regex: ".+" }} }}  # no sub, no identity: refused
                  require_expiration: true  # a token without `exp` is refused
                  max_lifetime: {jwt.max_lifetime_s}s  # nor one valid longer than this from now
                  # The verified payload as signed (base64url): the relay derives the owner
                  # key from its exact `iss` and `sub`, which no header can fold.
                  forward_payload_header: {JWT_PAYLOAD_HEADER}
              rules:
              - match: {{ prefix: / }}
                requires: {requires}"""
        if self.api_keys:
            credentials = "".join(
                f"\n              - {{ client: {scalar('key:' + k.client)}, key: {scalar(k.key)} }}"
                for k in self.api_keys
            )
            api_key_auth = f"""\
"@type": {T}extensions.filters.http.api_key_auth.v3.ApiKeyAuth
              credentials:{credentials}
              # `Authorization: Bearer <key>` (the filter strips "Bearer ") or `x-api-key: <key>`.
              key_sources: [{{ header: authorization }}, {{ header: {API_KEY_HEADER} }}]
              # The client name (rendered as key:<name>) becomes the identity; the key is
              # removed from the request.
              forwarding: {{ header: {IDENTITY_HEADER}, hide_credentials: true }}"""
            if both:
                # A request whose JWT verified skips the API key check.
                indented = api_key_auth.replace("\n              ", "\n                  ")
                filters += f"""
          - name: envoy.filters.http.api_key_auth
            typed_config:
              "@type": {T}extensions.common.matching.v3.ExtensionWithMatcher
              extension_config:
                name: envoy.filters.http.api_key_auth
                typed_config:
                  {indented}
              xds_matcher:
                matcher_list:
                  matchers:
                  - predicate:
                      single_predicate:
                        input:
                          name: jwt_subject
                          typed_config:
                            "@type": {T}type.matcher.v3.HttpRequestHeaderMatchInput
                            header_name: {JWT_PAYLOAD_HEADER}
                        value_match: {{ safe_regex: {{ google_re2: {{}}, regex: ".+" }} }}
                    on_match:
                      action:
                        name: skip_api_key_auth
                        typed_config:
                          "@type": {T}extensions.filters.common.matcher.action.v3.SkipFilter"""
            else:
                filters += f"""
          - name: envoy.filters.http.api_key_auth
            typed_config:
              {api_key_auth}"""
        return filters

    def _open_routes(self) -> str:
        """The demo page's static files stay reachable without credentials."""
        if not self.authenticated:
            return ""
        names = [
            name
            for name, on in (
                ("envoy.filters.http.jwt_authn", self.jwt is not None),
                ("envoy.filters.http.api_key_auth", bool(self.api_keys)),
                ("envoy.filters.http.ext_proc", True),
            )
            if on
        ]
        per_filter = "".join(f"\n                  {n}: {DISABLED_ON_ROUTE}" for n in names)
        return f"""
              - name: relay_demo_page  # static files only; their API calls need credentials
                match: {{ prefix: /relay/v1/demo/ }}
                route: {{ cluster: relay_http, timeout: 0s, idle_timeout: 600s }}
                typed_per_filter_config:{per_filter}"""

    def _limit_routes(self) -> str:
        """First in the route table: a generation body declared (content-length) larger than
        the limit is refused before any of it is read. Chunked bodies are bounded by the relay
        (--max-request-bytes, 429) on the detached path; Envoy's buffer filter is not used: it
        deadlocks with ext_proc on bodies above a few times its limit (SECURITY.md)."""
        if self.max_request_bytes is None:
            return ""
        # Envoy's CORS filter skips direct responses: a granted origin gets its grant from a
        # route of its own, so a page can read the 413.
        granted = [
            self._limit_route(f"request_too_large_{n}", origin)
            for n, origin in enumerate(self.cors_origins, 1)
        ]
        return "".join([*granted, self._limit_route("request_too_large", None)])

    def _limit_route(self, name: str, origin: str | None) -> str:
        assert self.max_request_bytes is not None
        error = RequestTooLarge(f"request body larger than {self.max_request_bytes} bytes")
        only_origin = (
            f"\n                  - {{ name: origin, string_match: {{ exact: {scalar(origin)} }} }}"
            if origin is not None
            else ""
        )
        grant = granted_origin_headers(origin) if origin is not None else ""
        return f"""
              - name: {name}
                match:
                  safe_regex: {{ regex: {scalar(GENERATION_PATHS)} }}
                  headers:
                  - name: content-length
                    range_match: {{ start: {self.max_request_bytes + 1}, end: {2**63 - 1} }}\
{only_origin}
                direct_response:
                  status: {error.http_status}
                  body: {{ inline_string: {scalar(error.json_body().decode())} }}
                response_headers_to_add:
                - header: {{ key: content-type, value: application/json }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD{grant}
                typed_per_filter_config:
                  envoy.filters.http.ext_proc: {DISABLED_ON_ROUTE}"""

    def _public_tls(self) -> str:
        if self.tls is None:
            return ""
        return f"""
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": {T}extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{ filename: {scalar(self.tls.cert)} }}
              private_key: {{ filename: {scalar(self.tls.key)} }}"""

    def _llm_upstream_filters(self) -> str:
        """Upstream filters of cluster llm, so both the public routes and egress get them."""
        inject = ""
        if self.upstream_credential_file is not None:
            inject = f"""
        - name: envoy.filters.http.credential_injector
          typed_config:
            "@type": {T}extensions.filters.http.credential_injector.v3.CredentialInjector
            overwrite: true  # whatever Authorization a client sent never reaches the LLM
            credential:
              name: envoy.http.injected_credentials.generic
              typed_config:
                "@type": {T}extensions.http.injected_credentials.generic.v3.Generic
                credential: {{ name: llm_credential }}
                header: Authorization"""
        names = [IDENTITY_HEADER, JWT_PAYLOAD_HEADER] + ([API_KEY_HEADER] if self.api_keys else [])
        removed = ", ".join(f"{{ remove: {name} }}" for name in names)
        return f"""
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": {T}extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http_protocol_options: {{}} }}
        http_filters:
        - name: envoy.filters.http.header_mutation
          typed_config:
            "@type": {T}extensions.filters.http.header_mutation.v3.HeaderMutation
            mutations:
              # The caller's identity and JWT payload (and, with --api-keys, a leftover
              # x-api-key) are for the relay; the LLM gets none of them.
              request_mutations: [{removed}]{inject}
        - name: envoy.filters.http.upstream_codec
          typed_config:
            "@type": {T}extensions.filters.http.upstream_codec.v3.UpstreamCodec"""


NO_SECURITY: dict[str, str] = dict.fromkeys(EnvoySecurity().placeholders(), "")
