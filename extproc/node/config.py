"""Relay node settings: keyword-only, named defaults, validated once at load."""

from __future__ import annotations

from dataclasses import dataclass, field

from extproc.access.grants import AccessLimits
from extproc.detached.generations import DetachSettings
from extproc.errors import ConfigError
from extproc.session.framing import DEFAULT_MAX_FRAME_BYTES
from extproc.store import DEFAULT_LEASE_S, RedisSettings, StoreLimits

DEFAULT_HOST = "127.0.0.1"
MAX_PORT = 65535


@dataclass(frozen=True, kw_only=True)
class NodeSettings:
    host: str = DEFAULT_HOST
    grpc_port: int = 0  # ext_proc (and later relay.v1) over HTTP/2; 0 picks a free port
    http_port: int = 0  # resumes, reader endpoints, /metrics, /healthz
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES  # largest upstream event we frame
    store: StoreLimits = field(default_factory=StoreLimits)
    store_url: str = "memory"  # or redis://host:port/db: sessions shared by several nodes
    lease_s: float = DEFAULT_LEASE_S  # with Redis: a node silent this long is dead
    detach: DetachSettings = field(default_factory=DetachSettings)
    access: AccessLimits = field(default_factory=AccessLimits)

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= MAX_PORT:
                raise ConfigError(f"{name.replace('_', '-')} must be 0..{MAX_PORT}, got {port}")
        if self.store_url != "memory":
            RedisSettings(url=self.store_url, lease_s=self.lease_s)  # validates both
        if self.max_frame_bytes < 1024:
            raise ConfigError(f"max event bytes must be at least 1024, got {self.max_frame_bytes}")
