"""Envoy's side of security through a real Envoy: API key and JWT authentication on every route
to the relay, the x-relay-identity header (set by Envoy only), the LLM credential injected by
Envoy and never leaked, TLS, and the rendered configs Envoy itself validates."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from aiohttp import web
from conftest import make_stack
from credentials import jwks_and_signer, self_signed_cert
from test_cli import banner_url, read_banner

from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER
from extproc.errors import ConfigError
from extproc.ops.cli import auth_line
from extproc.ops.envoy_render import EnvoyPorts, Upstream, render
from extproc.ops.envoy_security import (
    EnvoySecurity,
    JwtSettings,
    TlsFiles,
    parse_api_keys,
)
from extproc.ops.supervisor import (
    Stack,
    StackOptions,
    envoy_binary,
    python_child,
    read_ports,
    start_envoy,
    start_stack,
    wait_until,
)
from extproc.proto.relay.v1 import relay_pb2_grpc
from extproc.proto.relay.v1.relay_pb2 import SubscribeRequest

CLI = [sys.executable, "-m", "extproc.ops.cli"]
ALICE_KEY = "sk-alice-4f1c2a9e7b"
BOB_KEY = "sk-bob-83d0c6e15a"
LLM_KEY = "llm-upstream-key-7d3b9e2f51c4"
KEYS_FILE = f"# client key\nalice {ALICE_KEY}\n\nbob   {BOB_KEY}  # second client\n"
ISSUER, AUDIENCE = "https://issuer.test", "stream-relay"
CHAT = {
    "model": "demo-llm",
    "messages": [{"role": "user", "content": "who am i"}],
    "max_tokens": 4,
    "stream": True,
}


class Creds:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.keys = directory / "api-keys"
        self.keys.write_text(KEYS_FILE)
        self.llm_key = directory / "llm-key"
        self.llm_key.write_text(LLM_KEY + "\n")
        self.jwks, self.sign = jwks_and_signer(directory)

    def jwt(self, sub: str = "carol", **claims: object) -> str:
        return self.sign({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, **claims})

    def security(self, **overrides: Any) -> EnvoySecurity:
        settings: dict[str, Any] = {
            "api_keys": parse_api_keys(self.keys),
            "jwt": JwtSettings.load(self.jwks, ISSUER, AUDIENCE),
        }
        return EnvoySecurity(**(settings | overrides))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return Creds(tmp_path_factory.mktemp("creds"))


@pytest.fixture(scope="module")
def secured(creds: Creds, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API keys or JWT, and the LLM key injected by Envoy (the demo upstream requires it)."""
    stack = make_stack(
        tmp_path_factory.mktemp("secured"),
        security=creds.security(),
        upstream_key_file=creds.llm_key,
    )
    yield stack
    stack.stop()


# --- configuration ---------------------------------------------------------------------------


def _ports() -> EnvoyPorts:
    return EnvoyPorts(
        listen_port=8080, admin_port=9901, relay_grpc_port=50051, relay_http_port=8081
    )


def _validate(config: str, path: Path) -> None:
    path.write_text(config)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize(
    "combo", ["limits only", "api keys", "jwt", "api keys or jwt", "everything", "https llm"]
)
def test_rendered_security_configs_validate(creds: Creds, tmp_path: Path, combo: str) -> None:
    cert, key, _ = self_signed_cert(tmp_path)
    credential = tmp_path / "credential"
    credential.write_text(f"Bearer {LLM_KEY}")
    security = {
        "limits only": EnvoySecurity(),
        "api keys": creds.security(jwt=None),
        "jwt": creds.security(api_keys=()),
        "api keys or jwt": creds.security(),
        "everything": creds.security(
            tls=TlsFiles.load(cert, key),
            upstream_credential_file=credential,
            max_request_bytes=1 << 20,
        ),
        "https llm": creds.security(upstream_credential_file=credential),
    }[combo]
    upstream = "https://api.openai.com" if combo == "https llm" else "http://127.0.0.1:8000"
    config = render(_ports(), Upstream.from_url(upstream), security=security)
    assert LLM_KEY not in config  # Envoy reads it from the file
    _validate(config, tmp_path / "envoy.yaml")


def _public_hcm(config: str) -> dict[str, Any]:
    public = next(x for x in yaml.safe_load(config)["static_resources"]["listeners"])
    assert public["name"] == "public"
    return dict(public["filter_chains"][0]["filters"][0]["typed_config"])


def test_auth_runs_before_ext_proc_on_every_route_but_the_demo_page(creds: Creds) -> None:
    hcm = _public_hcm(
        render(_ports(), Upstream.from_url("http://127.0.0.1:8000"), security=creds.security())
    )
    names = [f["name"] for f in hcm["http_filters"]]
    ext_proc = names.index("envoy.filters.http.ext_proc")
    assert names.index("envoy.filters.http.jwt_authn") < ext_proc
    assert names.index("envoy.filters.http.api_key_auth") < ext_proc
    assert names[-1] == "envoy.filters.http.router"
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    for route in routes:
        per_filter = route.get("typed_per_filter_config", {})
        auth_off = [n for n in per_filter if n.endswith(("jwt_authn", "api_key_auth"))]
        assert auth_off == ([] if route["name"] != "relay_demo_page" else auth_off), route
        if route["name"] == "relay_demo_page":
            assert route["match"] == {"prefix": "/relay/v1/demo/"}
            assert len(auth_off) == 2
    internal = hcm["route_config"]["internal_only_headers"]
    assert {"x-relay-target", IDENTITY_HEADER, JWT_PAYLOAD_HEADER} <= set(internal)


def test_the_body_limit_route_covers_exactly_the_generation_paths() -> None:
    hcm = _public_hcm(
        render(
            _ports(),
            Upstream.from_url("http://127.0.0.1:8000"),
            security=EnvoySecurity(max_request_bytes=1000),
        )
    )
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    assert next(iter(routes)) == "request_too_large"  # before any re-route can apply
    limit = routes["request_too_large"]["match"]
    assert limit["safe_regex"] == routes["generations"]["match"]["safe_regex"]
    assert limit["headers"][0]["range_match"]["start"] == 1001


def test_without_security_the_template_renders_no_security_blocks() -> None:
    config = render(_ports(), Upstream.from_url("http://127.0.0.1:8000"))
    for absent in (IDENTITY_HEADER, "overload_manager", "api_key_auth", "transport_socket"):
        assert absent not in config
    assert "${" not in config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("alice\n", 1, "want 'client-name key'"),
        ("# ok\nalice sk-1234567890 extra\n", 2, "want 'client-name key'"),
        ("alice short\n", 1, "8 to 512"),
        ("al/ice sk-1234567890\n", 1, "client name"),
        ("alice sk-1234567890\nbob sk-1234567890\n", 2, "duplicate key"),
        ("alice sk-1234567890\nalice sk-0987654321\n", 2, "duplicate client"),
    ],
)
def test_bad_api_key_files_name_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=problem) as failure:
        parse_api_keys(path)
    assert str(failure.value).startswith(f"{path}:{line}: ")


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_bad_security_flags_print_one_line_and_exit_2(tmp_path: Path, creds: Creds) -> None:
    bad_keys = _write(tmp_path, "alice sk-1234567890\nbob\n")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    missing = str(tmp_path / "missing")
    cases = [
        (["--api-keys", str(bad_keys)], f"{bad_keys}:2"),
        (["--api-keys", str(tmp_path / "empty-dir-file")], "--api-keys"),
        (["--jwks", str(not_pem)], "--jwks"),
        (["--jwt-issuer", "x"], "--jwks"),
        (["--tls", missing, missing], "--tls"),
        (["--tls", str(not_pem), str(not_pem)], "--tls"),
        (["--upstream-key-file", missing], "--upstream-key-file"),
        (["--max-connections", "0"], "--max-connections"),
        (["--max-request-headers-kb", "9000"], "max request headers"),
    ]
    for args, names in cases:
        result = _run_cli("up", "--demo", "--port", "0", "--admin-port", "0", *args)
        assert result.returncode == 2, (args, result)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert names in lines[0], (args, lines)
        assert result.stdout == ""


# --- authentication through Envoy -----------------------------------------------------------


def test_generation_needs_an_api_key_or_a_jwt(secured: Stack, creds: Creds) -> None:
    url = f"{secured.base_url}/v1/chat/completions"
    accepted = {
        "bearer api key": bearer(ALICE_KEY),
        "x-api-key": {"x-api-key": BOB_KEY},
        "jwt": bearer(creds.jwt()),
    }
    for name, headers in accepted.items():
        response = httpx.post(url, json=CHAT, headers=headers, timeout=30)
        assert response.status_code == 200, (name, response.text)
        session = response.headers["x-relay-session"]
        assert response.content.startswith(f"id: {session}:1\n".encode()), name
    refused = {
        "nothing": {},
        "wrong key": bearer("sk-wrong-1234567890"),
        "key in the wrong scheme": {"authorization": f"Basic {ALICE_KEY}"},
        "bad signature": bearer(creds.jwt()[:-6] + "AAAAAA"),
        "expired": bearer(creds.jwt(exp=1_000_000)),
        "other issuer": bearer(creds.sign({"sub": "x", "iss": "evil", "aud": AUDIENCE})),
        "other audience": bearer(creds.sign({"sub": "x", "iss": ISSUER, "aud": "other"})),
        "no subject": bearer(creds.sign({"iss": ISSUER, "aud": AUDIENCE})),
        "spoofed identity only": {IDENTITY_HEADER: "key:alice", JWT_PAYLOAD_HEADER: "e30"},
        # api_key_auth reads Authorization first: a failed JWT there shadows x-api-key.
        "failed jwt with a key": bearer(creds.jwt(exp=1_000_000)) | {"x-api-key": BOB_KEY},
    }
    for name, headers in refused.items():
        response = httpx.post(url, json=CHAT, headers=headers, timeout=30)
        assert response.status_code == 401, (name, response.status_code, response.text)
        assert "x-relay-session" not in response.headers


def test_every_relay_route_is_behind_authentication(secured: Stack) -> None:
    base = secured.base_url
    session = httpx.post(
        f"{base}/v1/chat/completions", json=CHAT, headers=bearer(ALICE_KEY), timeout=30
    ).headers["x-relay-session"]
    requests = [
        ("GET", f"/relay/v1/sessions/{session}", {}),
        ("GET", f"/relay/v1/sessions/{session}/events", {}),
        ("GET", f"/relay/v1/sessions/{session}/ws", {}),
        ("DELETE", f"/relay/v1/sessions/{session}", {}),
        ("POST", "/v1/chat/completions", {"last-event-id": f"{session}:2"}),  # resume
        ("GET", "/v1/models", {}),  # any other route to the LLM
    ]
    for method, path, headers in requests:
        with httpx.Client(timeout=30) as client:
            refused = client.request(method, base + path, json=CHAT, headers=headers)
            assert refused.status_code == 401, (method, path)
            allowed = client.request(
                method, base + path, json=CHAT, headers=headers | bearer(BOB_KEY)
            )
            assert allowed.status_code not in (401, 403), (method, path, allowed.text)
    # The demo page's static files stay open; everything they call needs credentials.
    assert httpx.get(f"{base}/relay/v1/demo/", timeout=30).status_code == 200


async def test_grpc_subscribe_is_behind_authentication(secured: Stack) -> None:
    target = httpx.URL(secured.base_url).netloc.decode()
    async with httpx.AsyncClient(timeout=30) as client:
        started = await client.post(
            f"{secured.base_url}/v1/chat/completions", json=CHAT, headers=bearer(ALICE_KEY)
        )
    session = started.headers["x-relay-session"]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = relay_pb2_grpc.RelayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Subscribe(SubscribeRequest(session=session)):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = (("authorization", f"Bearer {ALICE_KEY}"),)
        events = [
            r async for r in stub.Subscribe(SubscribeRequest(session=session), metadata=metadata)
        ]
        assert events[-1].WhichOneof("kind") == "end"


# --- what the LLM sees, and where its key is not --------------------------------------------


def test_llm_gets_the_injected_key_and_never_the_callers_credentials(
    secured: Stack, creds: Creds
) -> None:
    spoof = {IDENTITY_HEADER: "key:admin", JWT_PAYLOAD_HEADER: "e30"}
    for headers in (
        bearer(ALICE_KEY) | spoof,
        {"x-api-key": BOB_KEY} | spoof,
        bearer(creds.jwt()) | spoof | {"x-api-key": "sk-not-checked-1234"},  # JWT wins
    ):
        response = httpx.get(f"{secured.base_url}/demo/echo-headers", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        seen = response.json()["headers"]
        assert seen["authorization"] == ["<redacted: the required key>"]
        for gone in (IDENTITY_HEADER, JWT_PAYLOAD_HEADER, "x-api-key"):
            assert gone not in seen, (gone, seen)
    # Without Envoy's injection the demo upstream refuses: the key really is required.
    direct = httpx.get(f"{secured.upstream_url}/demo/echo-headers", timeout=30)
    assert direct.status_code == 401


def test_detached_generations_get_the_key_through_egress(secured: Stack) -> None:
    # The relay calls the LLM itself (detached path): only Envoy's egress can add the key.
    response = httpx.post(
        f"{secured.base_url}/v1/chat/completions", json=CHAT, headers=bearer(ALICE_KEY), timeout=30
    )
    assert response.status_code == 200
    assert response.content.rstrip().endswith(b"data: [DONE]")
    info = httpx.get(
        f"{secured.base_url}/relay/v1/sessions/{response.headers['x-relay-session']}",
        headers=bearer(ALICE_KEY),
        timeout=30,
    ).json()
    assert info["state"] == "done"
    assert info["write_path"] == "detached"


def test_the_llm_key_appears_in_no_response_log_or_metric(secured: Stack, creds: Creds) -> None:
    seen: list[bytes] = []
    for method, path, headers in [
        ("POST", "/v1/chat/completions", bearer(ALICE_KEY)),
        ("POST", "/v1/chat/completions", {"x-demo-status": "401"} | bearer(ALICE_KEY)),
        ("GET", "/demo/echo-headers", bearer(creds.jwt())),
        ("GET", "/v1/models", {}),
        ("GET", "/relay/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA", bearer(BOB_KEY)),
    ]:
        response = httpx.request(
            method, secured.base_url + path, json=CHAT, headers=headers, timeout=30
        )
        seen += [response.content, str(response.headers).encode()]
    seen.append(httpx.get(secured.metrics_url, timeout=30).content)
    seen.append(httpx.get(f"{secured.admin_url}/config_dump", timeout=30).content)
    seen.append(httpx.get(f"{secured.admin_url}/stats", timeout=30).content)
    for path in secured.workdir.iterdir():
        if path.name != "llm-credential":  # the one file Envoy reads the key from
            seen.append(path.read_bytes())
    for blob in seen:
        assert LLM_KEY.encode() not in blob
    credential = secured.workdir / "llm-credential"
    assert credential.stat().st_mode & 0o077 == 0  # only this user can read it
    assert (secured.workdir / "envoy.yaml").stat().st_mode & 0o077 == 0  # it has the API keys


# --- the identity reaches the relay's HTTP front, set by Envoy only -------------------------


class Recorder:
    """Stands in for the relay's HTTP front: records what Envoy sends it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, list[str], list[str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path == "/healthz":  # Envoy's active health check of relay_http
            return web.Response(text="ok")
        identities = request.headers.getall(IDENTITY_HEADER, [])
        payloads = request.headers.getall(JWT_PAYLOAD_HEADER, [])
        self.requests.append((request.path, identities, payloads))
        return web.Response(text="recorded")


@pytest.fixture
async def recorded(creds: Creds, tmp_path: Path) -> AsyncIterator[tuple[Stack, Recorder]]:
    """A real Envoy with the real rendered config and a real relay node doing ext_proc, but
    the relay_http cluster pointing at a recorder."""
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    recorder_port = int(runner.addresses[0][1])
    stack = Stack(tmp_path)
    try:
        ports_file = tmp_path / "relay.ports"
        relay = stack.spawn(
            "relay",
            python_child(
                "serve", "--grpc-port", "0", "--http-port", "0", "--ports-file", str(ports_file)
            ),
        )
        wait_until("its ports file", relay, lambda: read_ports(ports_file) is not None)
        grpc_port = (read_ports(ports_file) or {})["grpc_port"]
        config = tmp_path / "envoy.yaml"
        config.write_text(
            render(
                EnvoyPorts(
                    listen_port=0,
                    admin_port=0,
                    relay_grpc_port=grpc_port,
                    relay_http_port=recorder_port,
                    egress_port=0,
                ),
                Upstream.from_url("http://127.0.0.1:9"),  # never reached here
                security=creds.security(),
            )
        )
        port = start_envoy(stack, config)
        stack.base_url = f"http://127.0.0.1:{port}"
        # The sync waits above blocked this loop, so the recorder may have failed Envoy's first
        # health checks: wait (without blocking it) until Envoy routes to it again.
        async with httpx.AsyncClient(timeout=5) as admin, asyncio.timeout(20):
            while not await _relay_http_healthy(admin, stack.admin_url):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling another process, bounded by the timeout
        yield stack, recorder
    finally:
        stack.stop()
        await runner.cleanup()


async def _relay_http_healthy(admin: httpx.AsyncClient, admin_url: str) -> bool:
    clusters = (await admin.get(f"{admin_url}/clusters?format=json")).json()["cluster_statuses"]
    relay_http = next(c for c in clusters if c["name"] == "relay_http")
    return all(
        not host["health_status"].get("failed_active_health_check")
        for host in relay_http["host_statuses"]
    )


async def test_identity_reaches_the_relay_front_as_envoy_set_it(
    recorded: tuple[Stack, Recorder], creds: Creds
) -> None:
    stack, recorder = recorded
    # Claiming to be an internal request does not keep a client's copy either.
    admin_jwt = creds.jwt("admin").split(".")[1]  # a verified payload, replayed as a header
    spoof = {
        IDENTITY_HEADER: "key:admin",
        JWT_PAYLOAD_HEADER: admin_jwt,
        "x-forwarded-for": "127.0.0.1",
        "x-envoy-internal": "true",
    }
    carol = creds.jwt("carol")
    cases = [
        # (request, the identity header and the JWT payload the relay front must receive)
        (("GET", "/relay/v1/sessions/s/events", bearer(ALICE_KEY)), (["key:alice"], [])),
        (("GET", "/relay/v1/sessions/s", {"x-api-key": BOB_KEY}), (["key:bob"], [])),
        # detached: the payload exactly as signed, so the owner key comes from its exact bytes
        (("POST", "/v1/chat/completions", bearer(carol)), ([], [carol.split(".")[1]])),
        (
            (
                "POST",
                "/v1/chat/completions",
                bearer(ALICE_KEY) | {"last-event-id": "A" * 22 + ":1"},
            ),
            (["key:alice"], []),
        ),
    ]
    relay_paths: set[str] = set()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        for (method, path, headers), identity in cases:
            for extra in ({}, spoof):  # a client's own copy never gets through
                recorder.requests.clear()
                response = await client.request(method, path, json=CHAT, headers=headers | extra)
                assert response.text == "recorded", (path, response.status_code, response.text)
                assert len(recorder.requests) == 1
                relay_path, identities, payloads = recorder.requests[0]
                assert (identities, payloads) == identity, (path, extra, relay_path)
                relay_paths.add(relay_path)
        # The generation was re-routed by the real processor, the resume by the route table.
        assert {"/_relay/detach/v1/chat/completions", "/_relay/resume/v1/chat/completions"} <= (
            relay_paths
        )
        refused = await client.get("/relay/v1/sessions/s", headers=spoof)
        assert refused.status_code == 401


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_stack(
    tmp_path_factory: pytest.TempPathFactory, creds: Creds
) -> Iterator[tuple[Stack, Any]]:
    """TLS and the LLM key, no client authentication."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key, context = self_signed_cert(directory)
    stack = make_stack(
        directory,
        security=EnvoySecurity(tls=TlsFiles.load(cert, key)),
        upstream_key_file=creds.llm_key,
    )
    yield stack, context
    stack.stop()


@pytest.mark.parametrize(("http2", "version"), [(False, "HTTP/1.1"), (True, "HTTP/2")])
def test_tls_serves_verified_streams_over_h1_and_h2(
    tls_stack: tuple[Stack, Any], http2: bool, version: str
) -> None:
    stack, context = tls_stack
    assert stack.base_url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=context, http2=http2, http1=not http2, timeout=30) as client:
        with client.stream("POST", f"{stack.base_url}/v1/chat/completions", json=CHAT) as response:
            assert response.http_version == version
            body = response.read()
        session = response.headers["x-relay-session"]
        assert body.startswith(f"id: {session}:1\n".encode())
        assert body.count(f"id: {session}:".encode()) == 4 + 3  # role, 4 tokens, finish, DONE
    with pytest.raises(httpx.ConnectError):  # a client that verifies refuses an unknown cert
        httpx.get(f"{stack.base_url}/v1/models", timeout=30)
    with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP on the TLS port
        httpx.get(stack.base_url.replace("https", "http"), timeout=30)


def test_without_authentication_a_clients_authorization_is_overwritten(
    tls_stack: tuple[Stack, Any],
) -> None:
    stack, context = tls_stack
    response = httpx.get(
        f"{stack.base_url}/demo/echo-headers",
        headers=bearer("sk-client-supplied-123") | {IDENTITY_HEADER: "key:admin"},
        verify=context,
        timeout=30,
    )
    assert response.status_code == 200
    seen = response.json()["headers"]
    assert seen["authorization"] == ["<redacted: the required key>"]
    assert IDENTITY_HEADER not in seen


def test_startup_fails_cleanly_with_an_unreadable_upstream_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--upstream-key-file"):
        start_stack_with_key(tmp_path, tmp_path / "missing")


def start_stack_with_key(tmp_path: Path, key: Path) -> None:
    stack = start_stack(StackOptions(port=0, admin_port=0, upstream_key_file=key), tmp_path)
    stack.stop()


def test_api_keys_file_accepts_comments_and_blank_lines(creds: Creds) -> None:
    keys = parse_api_keys(creds.keys)
    assert [(k.client, k.key) for k in keys] == [("alice", ALICE_KEY), ("bob", BOB_KEY)]


def test_jwt_without_issuer_or_audience_is_announced_loudly(creds: Creds) -> None:
    scoped = EnvoySecurity(jwt=JwtSettings.load(creds.jwks, ISSUER, AUDIENCE))
    assert "WARNING" not in auth_line(scoped)
    for issuer, audience in ((ISSUER, ""), ("", AUDIENCE), ("", "")):
        unscoped = EnvoySecurity(jwt=JwtSettings.load(creds.jwks, issuer, audience))
        assert "WARNING: JWTs are accepted from ANY issuer for ANY audience" in auth_line(unscoped)
    assert "authentication OFF" in auth_line(EnvoySecurity())


def test_up_wires_every_security_flag(creds: Creds, tmp_path: Path) -> None:
    cert, key, context = self_signed_cert(tmp_path)
    process = subprocess.Popen(
        [
            *CLI,
            *("up", "--demo", "--port", "0", "--admin-port", "0"),
            *("--api-keys", str(creds.keys), "--jwks", str(creds.jwks)),
            *("--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE, "--jwt-max-lifetime", "600"),
            *("--upstream-key-file", str(creds.llm_key), "--tls", str(cert), str(key)),
            *("--max-request-bytes", "4096"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        text = read_banner(process)
        assert "authentication API keys or JWT; sessions belong to who created them" in text
        assert "WARNING" not in text, text
        base = banner_url(text, "base URL")
        assert base.startswith("https://")
        with httpx.Client(base_url=base, verify=context, timeout=30) as client:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
            short_lived = bearer(creds.jwt(exp=int(time.time()) + 300))
            for headers in (bearer(ALICE_KEY), short_lived):
                response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
                assert response.status_code == 200, response.text  # the LLM key was injected
                assert response.content.startswith(b"id: ")
            # --jwt-max-lifetime 600: a token valid for an hour is refused
            long_lived = bearer(creds.jwt(exp=int(time.time()) + 3600))
            response = client.post("/v1/chat/completions", json=CHAT, headers=long_lived)
            assert response.status_code == 401
            padded = CHAT | {"padding": "p" * 4096}
            response = client.post("/v1/chat/completions", json=padded, headers=bearer(BOB_KEY))
            assert response.status_code == 413
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
