"""The bench scenarios: what sits between the load generator and the one demo upstream.

Each scenario is a context manager that starts its processes, yields a `Target` (the port the
load generator talks to and the pid of each role), and stops everything on exit. Roles:
`relay` (the Python ext_proc process: the relay node, or the do-nothing one), `envoy`, `peer`
(nginx or pushpin and their helpers), `upstream` (the demo LLM, shared by all).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from extproc.bench import peers
from extproc.supervisor import Stack, StackOptions, start_stack

SCENARIOS = (
    "direct",
    "envoy",
    "extproc_noop",
    "nginx",
    "pushpin",
    "relay_inline",
    "relay_detached",
)
RELAY_SCENARIOS = ("relay_inline", "relay_detached")
ROLES = ("relay", "envoy", "peer", "upstream", "loadgen")
DESCRIPTIONS = {
    "direct": "client → demo upstream",
    "envoy": "Envoy without ext_proc",
    "extproc_noop": "Envoy + do-nothing Python grpc.aio ext_proc (same processing modes)",
    "nginx": "nginx, proxy_buffering off",
    "pushpin": "pushpin (+ zurl) as a streaming reverse proxy",
    "relay_inline": "Envoy + relay node, inline write path (ext_proc tags in flight)",
    "relay_detached": "Envoy + relay node, detached write path (relay calls upstream via egress)",
}
# Peers that come from Debian packages: the binary each needs.
NEEDS = {"nginx": "nginx", "pushpin": "pushpin"}


@dataclass
class Target:
    port: int
    pids: dict[str, int] = field(default_factory=dict)  # role -> pid of its process tree
    metrics_url: str = ""  # the relay node's /metrics, for relay scenarios
    tagged: bool = False  # events must carry `id:` lines


def _pid(stack: Stack, name: str) -> int:
    return next(c.process.pid for c in stack.children if c.name == name)


@contextmanager
def running(name: str, upstream_port: int, upstream_pid: int, workdir: Path) -> Iterator[Target]:
    """Start scenario `name` in front of the upstream; stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    roles = {"upstream": upstream_pid}
    if name == "direct":
        yield Target(upstream_port, roles)
        return
    if name in RELAY_SCENARIOS:
        options = StackOptions(
            upstream=f"http://127.0.0.1:{upstream_port}",
            port=0,
            admin_port=0,
            write_path=name.removeprefix("relay_"),
        )
        stack = start_stack(options, workdir)
        try:
            port = int(stack.base_url.rsplit(":", 1)[1])
            pids = {**roles, "relay": _pid(stack, "relay"), "envoy": _pid(stack, "envoy")}
            yield Target(port, pids, stack.metrics_url, tagged=True)
        finally:
            peers.stop(stack)
        return
    starters: dict[str, Callable[[Stack, int], int]] = {
        "envoy": peers.start_envoy_plain,
        "extproc_noop": peers.start_envoy_noop,
        "nginx": peers.start_nginx,
        "pushpin": peers.start_pushpin,
    }
    stack = Stack(workdir)
    try:
        port = starters[name](stack, upstream_port)
        pids = dict(roles)
        for child in stack.children:
            role = {"envoy": "envoy", "noop": "relay"}.get(child.name, "peer")
            if role == "peer" and "peer" in pids:  # pushpin + zurl: count both as the peer
                pids[f"peer_{child.name}"] = child.process.pid
            else:
                pids[role] = child.process.pid
        yield Target(port, pids)
    finally:
        peers.stop(stack)
