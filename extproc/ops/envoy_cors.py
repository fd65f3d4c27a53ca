"""Browsers on other origins (`--cors-origin`), with Envoy's own CORS filter and policy.

Granted origins may stream, resume (a preflight allows `Last-Event-ID`), read every response
header (`x-relay-session` included) and use EventSource and WebSocket on sessions; any other
origin gets no grant, and its WebSocket upgrades are refused (CORS does not cover WebSocket).
No credentials mode: callers authenticate with headers or `?share=`, never cookies. With no
origins nothing is rendered and the template is as before.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from extproc.errors import ConfigError, OriginNotAllowed
from extproc.ops.envoy_yaml import DISABLED_ON_ROUTE, T, scalar

# Upstream CORS headers are replaced by the policy's: an LLM proxy that grants every origin
# (LiteLLM sends `access-control-allow-origin: *`) must not widen what the operator chose.
_UPSTREAM_CORS = (
    "access-control-allow-origin, access-control-allow-credentials, "
    "access-control-allow-methods, access-control-allow-headers, "
    "access-control-expose-headers, access-control-max-age"
)
# `*` covers every request header but Authorization, and every response header, for requests
# without credentials (the Fetch standard); the named ones also serve browsers without it.
ALLOW_HEADERS = "authorization, content-type, last-event-id, x-api-key, x-relay-share, *"
EXPOSE_HEADERS = "x-relay-session, x-request-id, *"
ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
MAX_AGE_S = 600


def parse_origin(text: str) -> str:
    """A `--cors-origin`: scheme, host and optional port, nothing else (as browsers send it)."""
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 (reading it validates it)
    except ValueError:
        raise ConfigError(f"--cors-origin has an invalid port: {text!r}") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or text != text.strip()
    ):
        raise ConfigError(
            f"--cors-origin takes an origin such as https://app.example.com:8443 "
            f"(scheme, host, port; no path, no '*'), got {text!r}"
        )
    # As a browser sends it: lower case, no default port.
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.netloc.lower().rpartition(":")[0] if parts.port == default else parts.netloc
    return f"{parts.scheme}://{host.lower()}"


def cors_placeholders(origins: tuple[str, ...]) -> dict[str, str]:
    """The template's CORS placeholders for these origins (all empty without any)."""
    if not origins:
        return {"CORS_FILTER": "", "CORS_POLICY": "", "CORS_ROUTES": ""}
    allowed = ", ".join(f"{{ exact: {scalar(o)} }}" for o in origins)
    others = "".join(
        f"\n                  - {{ name: origin, invert_match: true, "
        f"string_match: {{ exact: {scalar(o)} }} }}"
        for o in origins
    )
    refused = OriginNotAllowed("this origin may not open a WebSocket here (--cors-origin)")
    return {
        "CORS_FILTER": """
          # First, before authentication: a preflight carries no credentials and is answered
          # here (200, with a grant only for a --cors-origin), never refused with 401.
          - name: envoy.filters.http.cors
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors""",
        "CORS_POLICY": f"""
              # --cors-origin: browsers on these origins only. The upstream's own CORS headers
              # are dropped first, so only this policy grants anything.
              response_headers_to_remove: [{_UPSTREAM_CORS}]
              response_headers_to_add:  # grants differ by origin: caches must keep them apart
              - header: {{ key: vary, value: origin }}
                append_action: APPEND_IF_EXISTS_OR_ADD
              typed_per_filter_config:
                envoy.filters.http.cors:
                  "@type": {T}extensions.filters.http.cors.v3.CorsPolicy
                  allow_origin_string_match: [{allowed}]
                  allow_methods: {scalar(ALLOW_METHODS)}
                  allow_headers: {scalar(ALLOW_HEADERS)}
                  expose_headers: {scalar(EXPOSE_HEADERS)}
                  max_age: "{MAX_AGE_S}"
                  forward_not_matching_preflights: false  # other origins' preflights stop here""",
        "CORS_ROUTES": f"""
              - name: cors_preflight  # answered by the CORS filter (it needs a route with a
                match:                # cluster, so not a direct_response); never forwarded
                  prefix: /
                  headers:
                  - {{ name: ":method", string_match: {{ exact: OPTIONS }} }}
                  - {{ name: access-control-request-method, present_match: true }}
                route: {{ cluster: llm }}
                typed_per_filter_config:
                  envoy.filters.http.ext_proc: {DISABLED_ON_ROUTE}
              - name: websocket_other_origin  # CORS does not cover WebSocket: refuse it here
                match:
                  prefix: /relay/v1/
                  headers:
                  - {{ name: upgrade, string_match: {{ exact: websocket, ignore_case: true }} }}
                  - {{ name: origin, present_match: true }}{others}
                direct_response:
                  status: {refused.http_status}
                  body: {{ inline_string: {scalar(refused.json_body().decode())} }}
                response_headers_to_add:
                - header: {{ key: content-type, value: application/json }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD""",
    }


def granted_origin_headers(origin: str) -> str:
    """What Envoy's CORS filter would add for a granted origin, for a `direct_response` route
    (the filter skips those): so a page can read the answer."""
    return f"""
                - header: {{ key: access-control-allow-origin, value: {scalar(origin)} }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                - header: {{ key: access-control-expose-headers, value: {scalar(EXPOSE_HEADERS)} }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD"""
