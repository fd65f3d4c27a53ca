"""What the nodes sharing a Redis tell each other: that they are alive (a lease renewed every
lease/3), how many readers each session has on them (at every beat and at once on a change),
and which generations should stop (a pub/sub channel, so a DELETE reaches the writing node).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

from extproc.errors import StoreUnavailable
from extproc.store.redis.client import RedisCalls
from extproc.store.redis.schema import Keys, RedisSettings, now_ms
from extproc.vocabulary import StoreOp

POLL_S = 1.0  # the cancel listener's longest wait, so it notices a close


class Presence:
    def __init__(
        self, calls: RedisCalls, settings: RedisSettings, node_id: str, closing: asyncio.Event
    ) -> None:
        self._calls = calls
        self._settings = settings
        self._node_id = node_id
        self._closing = closing
        self._beat_now = asyncio.Event()
        self.lease_key = settings.lease_key(node_id)

    def readers_changed(self) -> None:
        self._beat_now.set()  # tell the other nodes at once, not at the next beat

    async def remote_readers(self, session_id: str) -> int:
        keys = Keys(self._settings.prefix, session_id)
        with self._calls.call(StoreOp.HEARTBEAT):
            announced = cast(dict[bytes, bytes], await self._calls.redis.hgetall(keys.readers))
        now = now_ms()
        total = 0
        for node, value in announced.items():
            count, _, expiry = value.partition(b" ")
            if node != self._node_id.encode() and int(expiry) > now:
                total += int(count)
        return total

    async def request_cancel(self, session_id: str) -> bool:
        with self._calls.call(StoreOp.CANCEL):
            receivers = await self._calls.redis.publish(self._settings.cancel_channel, session_id)
        return bool(receivers)

    async def heartbeat(self, reader_counts: Callable[[], dict[str, int]]) -> None:
        """Renew this node's lease and announce how many readers each session has here,
        every lease/3 and whenever a count changes."""
        lease_ms = int(self._settings.node_lease * 1000)
        announced: set[str] = set()
        while not self._closing.is_set():
            with contextlib.suppress(StoreUnavailable), self._calls.call(StoreOp.HEARTBEAT):
                counts = reader_counts()
                async with self._calls.redis.pipeline(transaction=False) as pipe:
                    pipe.set(self.lease_key, b"1", px=lease_ms)
                    value = f" {now_ms() + lease_ms}"
                    for session_id, count in counts.items():
                        readers = Keys(self._settings.prefix, session_id).readers
                        pipe.hset(readers, self._node_id, f"{count}{value}")
                        pipe.pexpire(readers, 2 * lease_ms)
                    for session_id in announced - counts.keys():  # their last reader left
                        pipe.hdel(Keys(self._settings.prefix, session_id).readers, self._node_id)
                    await pipe.execute()
                announced = set(counts)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.node_lease / 3):
                    await self._beat_now.wait()
            self._beat_now.clear()

    async def listen_for_cancels(self, on_cancel: Callable[[str], bool]) -> None:
        while not self._closing.is_set():
            try:
                with self._calls.call(StoreOp.CANCEL):
                    async with self._calls.blocking.pubsub() as pubsub:
                        await pubsub.subscribe(self._settings.cancel_channel)
                        # Short waits, not listen(): redis-py can swallow a cancel mid-reconnect,
                        # so the loop also ends on the closing flag.
                        while not self._closing.is_set():
                            message = await pubsub.get_message(
                                ignore_subscribe_messages=True, timeout=POLL_S
                            )
                            if message is not None and message.get("type") == "message":
                                on_cancel(bytes(message["data"]).decode())
            except StoreUnavailable:
                await asyncio.sleep(self._calls.backoff())

    async def leave(self) -> None:
        """A clean stop: drop the lease, so no one waits it out."""
        with contextlib.suppress(StoreUnavailable), self._calls.call(StoreOp.HEARTBEAT):
            await self._calls.redis.delete(self.lease_key)
