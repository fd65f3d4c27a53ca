"""What the nodes sharing a Redis tell each other: that they are alive (a lease renewed every
lease/3), how many readers each session has on them (at every beat and at once on a change),
and which generations should stop (a pub/sub channel, so a DELETE reaches the writing node).
A beat also notices a Redis that came back empty (the epoch key) for lookups to say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import cast

from extproc.errors import StoreUnavailable
from extproc.store.redis.client import RedisCalls
from extproc.store.redis.lease import Lease
from extproc.store.redis.schema import Keys, RedisSettings, now_ms
from extproc.vocabulary import StoreOp

log = logging.getLogger("stream_relay.store")

POLL_S = 1.0  # the cancel listener's longest wait, so it notices a close
# After Redis starts empty, a writer copies its live sessions back at its next beat (lease/3),
# or later if its connection is in back-off (at most 2 s): until then an unknown id is 503.
RECOVERY_SLACK_S = 2.5


class Presence:
    def __init__(
        self,
        calls: RedisCalls,
        settings: RedisSettings,
        node_id: str,
        lease: Lease,
        closing: asyncio.Event,
    ) -> None:
        self._calls = calls
        self._settings = settings
        self._node_id = node_id
        self._lease = lease
        self._closing = closing
        self._beat_now = asyncio.Event()
        self._announced: set[str] = set()
        self._first_epoch: bytes | None = None  # the epoch key's value at this node's first beat
        self._recovery_ms = int((settings.node_lease / 3 + RECOVERY_SLACK_S) * 1000)
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

    async def heartbeat(
        self, reader_counts: Callable[[], dict[str, int]], on_break: Callable[[], None]
    ) -> None:
        """Renew this node's lease and announce how many readers each session has here,
        every lease/3, whenever a count changes, and at once when a round found the lease
        gone. `on_break` runs when the lease key had vanished (see lease.py)."""
        while not self._closing.is_set():
            try:
                sent_at, continuous = await self.beat(reader_counts())
                if self._lease.renewed(sent_at, continuous=continuous):
                    on_break()
            except StoreUnavailable:
                pass
            except Exception:  # a bug must not stop the beat: this node's sessions would fail
                log.exception("lease renewal failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.node_lease / 3):
                    await self._beat_now.wait()
            self._beat_now.clear()

    async def beat(self, counts: dict[str, int]) -> tuple[float, bool]:
        """One renewal: (when it was sent, whether the lease key was still there)."""
        lease_ms = int(self._settings.node_lease * 1000)
        with self._calls.call(StoreOp.HEARTBEAT):
            sent_at = time.monotonic()
            async with self._calls.redis.pipeline(transaction=False) as pipe:
                pipe.set(self.lease_key, self._node_id, px=lease_ms, get=True)
                pipe.set(self._settings.epoch_key, now_ms(), nx=True)  # Redis came back empty
                pipe.get(self._settings.epoch_key)
                value = f" {now_ms() + lease_ms}"
                for session_id, count in counts.items():
                    readers = Keys(self._settings.prefix, session_id).readers
                    pipe.hset(readers, self._node_id, f"{count}{value}")
                    pipe.pexpire(readers, 2 * lease_ms)
                for session_id in self._announced - counts.keys():  # their last reader left
                    pipe.hdel(Keys(self._settings.prefix, session_id).readers, self._node_id)
                replies = await pipe.execute()
        self._announced = set(counts)
        if self._first_epoch is None:
            self._first_epoch = replies[2]
        return sent_at, replies[0] is not None

    def beat_now(self) -> None:
        """Renew the lease at once (a round found it gone)."""
        self._beat_now.set()

    async def recovering(self) -> bool:
        """Whether Redis started empty, after this node first saw it, so recently that writers
        may not have copied their live sessions back yet (each does at its next beat)."""
        with self._calls.call(StoreOp.LOOKUP):
            epoch = await self._calls.redis.get(self._settings.epoch_key)
        if epoch is None:
            return self._first_epoch is not None  # emptied, and no node has beaten since
        return epoch != self._first_epoch and now_ms() - int(epoch) < self._recovery_ms

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
                                # Anyone with Redis may publish here: junk is no session id.
                                on_cancel(bytes(message["data"]).decode("utf-8", "replace"))
            except StoreUnavailable:
                await asyncio.sleep(self._calls.backoff())
            except Exception:  # a bug must not stop the listener: cancels would stop arriving
                log.exception("cancel listener failed")
                await asyncio.sleep(self._calls.backoff())

    async def leave(self) -> None:
        """A clean stop: drop the lease, so no one waits it out."""
        with contextlib.suppress(StoreUnavailable), self._calls.call(StoreOp.HEARTBEAT):
            await self._calls.redis.delete(self.lease_key)
