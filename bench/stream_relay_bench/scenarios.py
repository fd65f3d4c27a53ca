"""The bench scenarios: what sits between the load generator and the one demo upstream.

Each scenario is a context manager that starts its processes, yields a `Target` (the port the
load generator talks to and the pid of each role), and stops everything on exit. Roles:
`relay` (the Python ext_proc process: the relay node, or the do-nothing one; every node of a
scale-out stack, summed), `envoy`, `peer` (nginx or pushpin and their helpers), `upstream` (the
demo LLM, shared by all), `redis` (the scale-out scenarios' own redis-server).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from extproc.ops.supervisor import Stack, StackOptions, start_stack
from stream_relay_bench import peers

# What a plain `stream-relay bench` runs (the main comparison).
DEFAULT_SCENARIOS = (
    "direct",
    "envoy",
    "extproc_noop",
    "nginx",
    "pushpin",
    "relay_inline",
    "relay_detached",
)
# Scale-out: N inline relay nodes sharing sessions through their own redis-server.
REDIS_NODES = {f"relay_inline_redis_{n}": n for n in (1, 2, 3)}
SCENARIOS = (*DEFAULT_SCENARIOS, *REDIS_NODES)
# `--scenarios scaleout`: the Redis rows against one node on the memory store, in one run.
GROUPS = {"scaleout": ("relay_inline", *REDIS_NODES)}
RELAY_SCENARIOS = ("relay_inline", "relay_detached")
ROLES = ("relay", "envoy", "peer", "upstream", "loadgen")
EXTRA_ROLES = ("redis",)  # shown only when a scenario has them, so older tables stay as they were
DESCRIPTIONS = {
    "direct": "client → demo upstream",
    "envoy": "Envoy without ext_proc",
    "extproc_noop": "Envoy + do-nothing Python grpc.aio ext_proc (same processing modes)",
    "nginx": "nginx, proxy_buffering off",
    "pushpin": "pushpin (+ zurl) as a streaming reverse proxy",
    "relay_inline": "Envoy + relay node, inline write path (ext_proc tags in flight)",
    "relay_detached": "Envoy + relay node, detached write path (relay calls upstream via egress)",
    **{
        name: f"Envoy + {n} relay node{'s' if n > 1 else ''}, inline, Redis Streams store"
        for name, n in REDIS_NODES.items()
    },
}
# Peers that come from Debian packages: the binary each needs.
NEEDS = {
    "nginx": "nginx",
    "pushpin": "pushpin",
    **{name: "redis-server" for name in REDIS_NODES},
}


# What a scenario's traffic must have gone through, proved after every measurement (proof.py).
PLAIN = "plain"  # no ext_proc: events arrive untagged
NOOP = "noop"  # Envoy's ext_proc filter and the do-nothing processor answered every chunk
INLINE = "inline"  # the relay node's processor tagged every event in flight
DETACHED = "detached"  # the relay node called the upstream and served the tagged log


@dataclass
class Target:
    port: int
    pids: dict[str, tuple[int, ...]] = field(default_factory=dict)  # role -> its tree roots
    metrics_url: str = ""  # the (first) relay node's /metrics; the no-op's /stats (JSON)
    path: str = PLAIN  # what the traffic must have gone through
    metrics_urls: tuple[str, ...] = ()  # every relay node's /metrics
    redis_url: str = ""  # the scenario's own redis-server, if any
    admin_url: str = ""  # Envoy's admin (ext_proc counters), when there is an Envoy

    @property
    def tagged(self) -> bool:
        """Events must carry `id:` lines."""
        return self.path in (INLINE, DETACHED)


def _pids(stack: Stack, *names: str) -> tuple[int, ...]:
    return tuple(c.process.pid for c in stack.children if c.name in names)


def _relay_names(nodes: int) -> tuple[str, ...]:
    return ("relay", *(f"relay-{i}" for i in range(2, nodes + 1)))  # as supervisor names them


@contextmanager
def running(
    name: str,
    upstream_port: int,
    upstream_pid: int,
    workdir: Path,
    *,
    noop_args: tuple[str, ...] = (),
) -> Iterator[Target]:
    """Start scenario `name` in front of the upstream; stop it on exit. `noop_args` go to the
    no-op processor of `extproc_noop` (the bench's tests start a broken one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    roles: dict[str, tuple[int, ...]] = {"upstream": (upstream_pid,)}
    if name == "direct":
        yield Target(upstream_port, roles)
        return
    if name in RELAY_SCENARIOS or name in REDIS_NODES:
        nodes = REDIS_NODES.get(name, 1)
        redis = Stack(workdir / "redis")
        try:
            redis_url = ""
            if name in REDIS_NODES:
                redis.workdir.mkdir(exist_ok=True)
                redis_url = peers.start_redis(redis)
            options = StackOptions(
                upstream=f"http://127.0.0.1:{upstream_port}",
                port=0,
                admin_port=0,
                write_path="detached" if name == "relay_detached" else "inline",
                nodes=nodes,
                relay_args=("--store", redis_url) if redis_url else (),
            )
            stack = start_stack(options, workdir)
            try:
                port = int(stack.base_url.rsplit(":", 1)[1])
                pids = {
                    **roles,
                    "relay": _pids(stack, *_relay_names(nodes)),
                    "envoy": _pids(stack, "envoy"),
                }
                if redis_url:
                    pids["redis"] = _pids(redis, "redis")
                yield Target(
                    port,
                    pids,
                    stack.metrics_url,
                    DETACHED if name == "relay_detached" else INLINE,
                    tuple(f"{url}/metrics" for url in stack.relay_http_urls),
                    redis_url,
                    stack.admin_url,
                )
            finally:
                peers.stop(stack)
        finally:
            peers.stop(redis)
        return
    starters: dict[str, Callable[[Stack, int], int]] = {
        "envoy": peers.start_envoy_plain,
        "extproc_noop": partial(peers.start_envoy_noop, noop_args=noop_args),
        "nginx": peers.start_nginx,
        "pushpin": peers.start_pushpin,
    }
    stack = Stack(workdir)
    try:
        port = starters[name](stack, upstream_port)
        pids = dict(roles)
        for child in stack.children:  # pushpin + zurl: both count as the peer
            role = {"envoy": "envoy", "noop": "relay"}.get(child.name, "peer")
            pids[role] = (*pids.get(role, ()), child.process.pid)
        path = NOOP if name == "extproc_noop" else PLAIN
        yield Target(port, pids, stack.metrics_url, path, admin_url=stack.admin_url)
    finally:
        peers.stop(stack)
