"""The store's two Redis connections and the one place Redis errors become relay errors.

Commands fail fast (a reader gets 503 `store_unavailable` at once); blocking reads and pub/sub
wait longer than any command timeout, on a connection of their own. Every call runs inside
`call(op)`: a RedisError is counted under its operation and raised as StoreUnavailable, so
background loops and request handlers see one kind of failure.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError

from extproc.errors import StoreUnavailable
from extproc.node.metrics import RelayMetrics
from extproc.store.redis.schema import RedisSettings
from extproc.vocabulary import StoreOp

log = logging.getLogger("stream_relay.store")

_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class RedisCalls:
    def __init__(self, settings: RedisSettings, metrics: RelayMetrics) -> None:
        self._metrics = metrics
        common: dict[str, object] = {"socket_connect_timeout": 1.0, "health_check_interval": 10}
        self.redis = aioredis.from_url(
            settings.url, socket_timeout=2.0, retry=Retry(NoBackoff(), 1), **common
        )
        self.blocking = aioredis.from_url(
            settings.url, socket_timeout=None, retry=Retry(ExponentialBackoff(), 1), **common
        )
        self._failures = 0

    @contextlib.contextmanager
    def call(self, op: StoreOp) -> Iterator[None]:
        """Run Redis calls; a RedisError is counted under `op` and raised as StoreUnavailable."""
        try:
            yield
        except RedisError as exc:
            if self._failures == 0:
                log.warning("redis %s failed: %r", op, exc)
            self._failures += 1
            self._metrics.store_failed(op)
            raise StoreUnavailable("the session store (Redis) cannot be reached") from exc
        if self._failures:
            log.info("redis reachable again after %d failed calls", self._failures)
            self._failures = 0
        self._metrics.store_up = 1

    def backoff(self) -> float:
        """How long a background loop waits before trying again after a failure."""
        return _BACKOFF_S[min(self._failures, len(_BACKOFF_S) - 1)]

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()
