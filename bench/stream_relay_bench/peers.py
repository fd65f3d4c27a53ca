"""Start the processes a bench scenario needs, as children of one `Stack` each.

Every child runs in its own process group with its own config and files in the run's temp
dir (nginx and pushpin too: never the system service); `stop()` here kills whole groups, so
workers forked by nginx or pushpin's runner go with their parent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path
from string import Template

from extproc.ops.envoy_render import EnvoyPorts, Upstream, render
from extproc.ops.supervisor import (
    Stack,
    free_port,
    http_ok,
    read_ports,
    start_envoy,
    wait_until,
)

READY_TIMEOUT_S = 30.0
# Debian package per peer binary; the first that installs wins.
PEER_PACKAGES = {
    "nginx": ("nginx-light", "nginx"),
    "pushpin": ("pushpin",),
    "redis-server": ("redis-server",),
}

NGINX_CONF = """\
# bench: nginx as a streaming (SSE) reverse proxy in front of the demo upstream
worker_processes 2;
daemon off;
master_process on;
user root;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    upstream llm {
        server 127.0.0.1:$llm_port;
        keepalive 512;
    }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;     # every chunk goes out as it arrives: SSE
            proxy_read_timeout 600s;
        }
    }
}
"""
ZURL_CONF = """\
[General]
instance_id=
in_spec={in_}
in_stream_spec={in_stream}
out_spec={out}
in_req_spec=
defpolicy=allow
allow=
deny=
max_open_requests=20000
buffer_size=200000
timeout=600
in_hwm=1000
out_hwm=1000
"""


def ensure_installed(binary: str) -> str:
    """'' when `binary` is on PATH (installing its Debian package if needed), else why not."""
    if shutil.which(binary):
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{binary} is not installed and apt-get is not usable here (not root or no apt)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    errors = []
    for package in PEER_PACKAGES[binary]:
        print(f"bench: installing {package} with apt-get", file=sys.stderr)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", package],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0 and shutil.which(binary):
            return ""
        errors.append(
            f"apt-get install {package}: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        )
    return "; ".join(errors)


def stop(stack: Stack) -> None:
    """Stop the stack's children, then SIGKILL what is left of their process groups."""
    stack.stop()
    for child in stack.children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signal.SIGKILL)


def _wait_http(stack: Stack, url: str) -> None:
    wait_until(f"{url} to answer", stack.children[-1], lambda: http_ok(url))


def start_upstream(stack: Stack) -> int:
    """The demo upstream with `x_demo_ts` stamps in every chunk; returns its port."""
    ports = stack.workdir / "upstream.ports"
    argv = ["-m", "extproc.ops.cli", "demo-upstream", "--port", "0", "--timestamps"]
    child = stack.spawn("upstream", [sys.executable, *argv, "--ports-file", str(ports)])
    wait_until("its ports file", child, lambda: read_ports(ports) is not None)
    port = (read_ports(ports) or {})["http_port"]
    stack.upstream_url = f"http://127.0.0.1:{port}"
    _wait_http(stack, f"{stack.upstream_url}/healthz")
    return port


def _start_envoy(stack: Stack, config: str) -> int:
    path = stack.workdir / "envoy.yaml"
    path.write_text(config)
    return start_envoy(stack, path)


def start_envoy_plain(stack: Stack, llm_port: int) -> int:
    """Envoy with no ext_proc filter (the bench's own small template); returns its port."""
    text = resources.files("stream_relay_bench").joinpath("envoy_plain.yaml").read_text()
    return _start_envoy(stack, Template(text).substitute(LISTEN_PORT=0, LLM_PORT=llm_port))


def start_envoy_noop(stack: Stack, llm_port: int, *, noop_args: tuple[str, ...] = ()) -> int:
    """The relay's own Envoy config (inline write path) whose ext_proc is the do-nothing
    server in noop_extproc.py; returns Envoy's port. The no-op's message counts are at
    `stack.metrics_url` (JSON)."""
    ports = stack.workdir / "noop.ports"
    argv = [sys.executable, "-m", "stream_relay_bench.noop_extproc", "--ports-file", str(ports)]
    child = stack.spawn("noop", [*argv, *noop_args])
    wait_until("its ports file", child, lambda: read_ports(ports) is not None)
    grpc_port, http_port = ((read_ports(ports) or {})[k] for k in ("grpc_port", "http_port"))
    stack.metrics_url = f"http://127.0.0.1:{http_port}/stats"
    config = render(
        EnvoyPorts(
            listen_port=0,
            admin_port=0,
            relay_grpc_port=grpc_port,
            relay_http_port=free_port(),
            egress_port=free_port(),
        ),
        Upstream("127.0.0.1", llm_port, tls=False),
        write_path="inline",
    )
    return _start_envoy(stack, config)


def start_nginx(stack: Stack, llm_port: int) -> int:
    """nginx (2 workers, like Envoy's 2 worker threads) with proxy_buffering off."""
    port, conf = free_port(), stack.workdir / "nginx.conf"
    conf.write_text(
        Template(NGINX_CONF).substitute(dir=stack.workdir, port=port, llm_port=llm_port)
    )
    stack.spawn("nginx", ["nginx", "-p", str(stack.workdir), "-c", str(conf)])
    _wait_http(stack, f"http://127.0.0.1:{port}/healthz")
    return port


def start_pushpin(stack: Stack, llm_port: int) -> int:
    """pushpin (its runner starts condure, pushpin-proxy and pushpin-handler) with one route
    to the demo upstream; a response without GRIP headers is proxied as a plain stream."""
    port, workdir = free_port(), stack.workdir
    (workdir / "pushpin-run").mkdir(exist_ok=True)
    (workdir / "pushpin-log").mkdir(exist_ok=True)
    (workdir / "routes").write_text(f"* 127.0.0.1:{llm_port}\n")
    replace = {
        "rundir": str(workdir / "pushpin-run"),
        "logdir": str(workdir / "pushpin-log"),
        "http_port": str(port),
        "routesfile": str(workdir / "routes"),
        "push_in_spec": f"tcp://127.0.0.1:{free_port()}",
        "push_in_sub_specs": f"tcp://127.0.0.1:{free_port()}",
        "push_in_http_port": str(free_port()),
        "command_spec": f"tcp://127.0.0.1:{free_port()}",
    }
    # pushpin-proxy makes upstream calls through zurl; Debian's zurl config (and the runner's
    # template) deny 127.*, so ours runs as its own child with loopback allowed.
    zurl = {name: f"ipc://{workdir}/pushpin-run/zurl-{name}" for name in ("in", "in-stream", "out")}
    (workdir / "zurl.conf").write_text(
        ZURL_CONF.format(in_=zurl["in"], in_stream=zurl["in-stream"], out=zurl["out"])
    )
    lines = []
    for line in Path("/etc/pushpin/pushpin.conf").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        lines.append(f"{key}={replace.pop(key)}" if "=" in line and key in replace else line)
        if line.strip() == "[proxy]":
            lines += [
                f"zurl_out_specs={zurl['in']}",
                f"zurl_out_stream_specs={zurl['in-stream']}",
                f"zurl_in_specs={zurl['out']}",
            ]
    (workdir / "pushpin.conf").write_text("\n".join(lines) + "\n")
    stack.spawn("zurl", ["zurl", f"--config={workdir / 'zurl.conf'}"])
    argv = [
        "pushpin",
        "--config",
        str(workdir / "pushpin.conf"),
        "--merge-output",
        "--port",
        f"127.0.0.1:{port}",
    ]
    stack.spawn("pushpin", argv)
    _wait_http(stack, f"http://127.0.0.1:{port}/healthz")
    return port


def redis_answers_ping(port: int) -> bool:
    """A redis-server is up on this loopback port (one PING, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(stack: Stack) -> str:
    """A private redis-server (loopback, no persistence, files in the stack's dir) for the
    scale-out scenarios; returns its URL."""
    port = free_port()
    argv = [
        "redis-server",
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(stack.workdir)),
        *("--save", "", "--appendonly", "no", "--daemonize", "no"),
    ]
    wait_until("PONG", stack.spawn("redis", argv), lambda: redis_answers_ping(port))
    return f"redis://127.0.0.1:{port}/0"
