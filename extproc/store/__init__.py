"""Where session logs live: `memory` (embedded, the default) or Redis Streams (shared by
several relay nodes). Both offer the `SessionStore` interface."""

from extproc.node.metrics import RelayMetrics
from extproc.store.base import SessionStore
from extproc.store.memory import MemoryStore, StoreLimits
from extproc.store.redis import DEFAULT_LEASE_S, RedisSettings, RedisStore

__all__ = [
    "DEFAULT_LEASE_S",
    "MemoryStore",
    "RedisSettings",
    "RedisStore",
    "SessionStore",
    "StoreLimits",
    "open_store",
]

MEMORY = "memory"  # --store memory


def open_store(
    url: str,
    limits: StoreLimits,
    *,
    metrics: RelayMetrics,
    node_lease: float = DEFAULT_LEASE_S,
) -> SessionStore:
    """`memory` or a redis:// URL (validated: a bad URL is a ConfigError)."""
    if url == MEMORY:
        return MemoryStore(limits, metrics=metrics)
    return RedisStore(RedisSettings(url=url, node_lease=node_lease), limits, metrics=metrics)
