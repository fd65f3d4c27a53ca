"""The Redis (or Valkey) Streams store, shared by several relay nodes."""

from extproc.store.redis.schema import DEFAULT_LEASE_S, RedisSettings
from extproc.store.redis.store import RedisStore

__all__ = ["DEFAULT_LEASE_S", "RedisSettings", "RedisStore"]
