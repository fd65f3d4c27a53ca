"""Relay node settings: keyword-only, named defaults, validated once at load.

Every setting is named as its flag (`--session-max-bytes` is `session_max_bytes`), so the
command line, the TOML file, `up`'s hand-over to its relay processes and the code read one
name. RELAY_FLAGS lists the ones `up` passes on to every `serve` it starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from extproc.access.quota import DEFAULT_MAX_SESSIONS_PER_IDENTITY
from extproc.detached.generations import DetachSettings
from extproc.errors import ConfigError
from extproc.readers.registry import ReaderLimits
from extproc.session.framing import DEFAULT_MAX_FRAME_BYTES
from extproc.store import DEFAULT_LEASE_S, RedisSettings, StoreLimits
from extproc.vocabulary import WritePath

DEFAULT_HOST = "127.0.0.1"
DEFAULT_GRPC_PORT = 50051  # `serve`'s defaults; NodeSettings' own (0) pick free ports
DEFAULT_HTTP_PORT = 8081
# `serve`'s write path for generations whose route names none: inline works behind any Envoy
# that runs the relay as ext_proc; detached also needs the re-route routes and --egress-url.
DEFAULT_NODE_WRITE_PATH = WritePath.INLINE
MAX_PORT = 65535
MIN_EVENT_BYTES = 1024
DEFAULT_DRAIN_TIMEOUT_S = 20.0  # SIGTERM: how long running work may finish before it is cut


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    host: str = DEFAULT_HOST
    grpc_port: int = 0  # ext_proc and relay.v1 over HTTP/2; 0 picks a free port
    http_port: int = 0  # resumes, reader endpoints, /metrics, /healthz
    # The same two servers on Unix sockets too (`up` links Envoy to them there); "" = none.
    grpc_socket: str = ""
    http_socket: str = ""
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S  # SIGTERM: running work may finish so long
    store: str = "memory"  # or redis://host:port/db: sessions shared by several nodes
    node_lease: float = DEFAULT_LEASE_S  # with Redis: a node silent this long is dead
    max_event_bytes: int = DEFAULT_MAX_FRAME_BYTES  # largest upstream event we frame
    max_sessions_per_identity: int = DEFAULT_MAX_SESSIONS_PER_IDENTITY
    # For a POST to a generation path whose Envoy route sends no x-relay-write-path metadata
    # (Envoy Gateway cannot send any); a route's metadata always wins.
    write_path: WritePath = DEFAULT_NODE_WRITE_PATH
    limits: StoreLimits = field(default_factory=StoreLimits)
    detach: DetachSettings = field(default_factory=DetachSettings)
    readers: ReaderLimits = field(default_factory=ReaderLimits)

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= MAX_PORT:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0..{MAX_PORT}, got {port}")
        if self.store != "memory":
            RedisSettings(url=self.store, node_lease=self.node_lease)  # validates both
        if self.max_event_bytes < MIN_EVENT_BYTES:
            raise ConfigError(
                f"--max-event-bytes must be at least {MIN_EVENT_BYTES}, got {self.max_event_bytes}"
            )
        if self.max_sessions_per_identity < 1:
            raise ConfigError("--max-sessions-per-identity must be >= 1")
        if not 0 <= self.drain_timeout < math.inf:
            raise ConfigError(f"--drain-timeout must be >= 0 and finite, got {self.drain_timeout}")

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> NodeSettings:
        """From parsed flags (argparse's namespace as a dict): each group takes its fields."""
        own = {f.name for f in fields(cls) if f.name not in _GROUPS}
        return cls(
            **{name: flags[name] for name in own if name in flags},
            limits=StoreLimits(**_pick(StoreLimits, flags)),
            detach=DetachSettings(**_pick(DetachSettings, flags)),
            readers=ReaderLimits(**_pick(ReaderLimits, flags)),
        )


_GROUPS = {"limits": StoreLimits, "detach": DetachSettings, "readers": ReaderLimits}
_SET_BY_UP = {
    "host",
    "grpc_port",
    "http_port",
    "grpc_socket",
    "http_socket",
    "egress_url",
    "max_tombstones",
}


def _pick(group: type, flags: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: flags[f.name] for f in fields(group) if f.name in flags}


# The flags `up` passes on to each relay node it starts, as `serve` spells them.
RELAY_FLAGS: tuple[str, ...] = tuple(
    name
    for name in (
        *(f.name for f in fields(NodeSettings) if f.name not in _GROUPS),
        *(f.name for group in _GROUPS.values() for f in fields(group)),
    )
    if name not in _SET_BY_UP
)
