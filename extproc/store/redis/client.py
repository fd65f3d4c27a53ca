"""The store's two Redis connections and the one place Redis errors become relay errors.

Commands fail fast (a reader gets 503 `store_unavailable` at once); blocking reads and pub/sub
wait longer than any command timeout, on a connection of their own. Every call runs inside
`call(op)`: a RedisError is counted under its operation and raised as StoreUnavailable, so
background loops and request handlers see one kind of failure. Commands are packed in one
pass (`LinearPacking`): a replication round has hundreds of arguments.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from redis import asyncio as aioredis
from redis._parsers.encoders import Encoder
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError

from extproc.errors import StoreUnavailable
from extproc.node.metrics import RelayMetrics
from extproc.store.redis.schema import RedisSettings
from extproc.vocabulary import StoreOp

log = logging.getLogger("stream_relay.store")

_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class LinearPacking:
    """A connection mixin: the Redis protocol for one command in a single join. redis-py's own
    `pack_command` joins everything packed so far again for every argument (up to 6 KB at a
    time), which made packing a 500-argument round most of the relay's replication cost."""

    encoder: Encoder

    def pack_command(self, *args: object) -> list[bytes]:
        name = args[0]
        if isinstance(name, str):  # e.g. "SCRIPT LOAD": Redis wants the words apart
            args = (*name.encode().split(), *args[1:])
        pieces = [b"*%d\r\n" % len(args)]
        for arg in args:
            if type(arg) is bytes:
                data = arg
            elif type(arg) is str:
                data = arg.encode()
            else:  # numbers as redis-py writes them (and its errors for anything else)
                data = self.encoder.encode(arg)  # type: ignore[no-untyped-call]
            pieces += (b"$%d\r\n" % len(data), data, b"\r\n")
        return [b"".join(pieces)]


def _pack_linearly(client: aioredis.Redis) -> aioredis.Redis:
    pool = client.connection_pool
    base = pool.connection_class  # TCP, TLS or a unix socket, as the URL says
    pool.connection_class = type(f"Linear{base.__name__}", (LinearPacking, base), {})
    return client


class RedisCalls:
    def __init__(self, settings: RedisSettings, metrics: RelayMetrics) -> None:
        self._metrics = metrics
        common: dict[str, object] = {"socket_connect_timeout": 1.0, "health_check_interval": 10}
        self.redis = _pack_linearly(
            aioredis.from_url(
                settings.url, socket_timeout=2.0, retry=Retry(NoBackoff(), 1), **common
            )
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
