"""Where session logs live: `memory` (embedded, the default) or Redis Streams (shared by
several relay nodes). Both offer the `SessionStore` interface."""

from extproc.node.metrics import RelayMetrics
from extproc.store.base import SessionStore
from extproc.store.memory import MemoryStore, StoreLimits
from extproc.store.redis.store import DEFAULT_LEASE_S, RedisSettings, RedisStore

__all__ = [
    "DEFAULT_LEASE_S",
    "MemoryStore",
    "RedisSettings",
    "RedisStore",
    "SessionStore",
    "StoreLimits",
    "open_store",
]


def open_store(
    url: str,
    limits: StoreLimits,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    metrics: RelayMetrics | None = None,
) -> SessionStore:
    """`memory` or a redis:// URL (validated: a bad URL is a ConfigError)."""
    if url == "memory":
        return MemoryStore(limits, metrics=metrics)
    return RedisStore(RedisSettings(url=url, lease_s=lease_s), limits, metrics=metrics)
