"""Copies this node's own sessions to Redis behind their first clients.

Appends mark a session dirty; a loop copies what accumulated in BATCH_WINDOW_S, one pipelined
script call per session per round (idempotent: a retried round, or a Redis that lost data, is
refilled from this node's memory). A new session goes in the next round at once, so readers
on other nodes know it as soon as its first client has its id.
"""

from __future__ import annotations

import asyncio
import contextlib

from extproc.errors import StoreUnavailable
from extproc.session.log import EndState, SessionLog
from extproc.store.memory import StoreLimits
from extproc.store.redis.client import RedisCalls
from extproc.store.redis.schema import GONE_TTL_S, OPEN_TTL_S, SYNC, Keys, RedisSettings
from extproc.vocabulary import StoreOp

SYNC_MAX_EVENTS = 2048  # per session per round: one round stays a bounded Redis call
SYNC_MAX_BYTES = 1024 * 1024
# A round copies what accumulated for this long, so one script call carries several events of
# a session (bench/redis_ab.py at 1k events/s, Redis cost per event in relay + redis-server
# CPU: one round per append ~290 us, a 5 ms window ~160 us, 25 ms ~73 us). Readers on other
# nodes lag by this much; a new session's first round goes at once, so they know it at once.
BATCH_WINDOW_S = 0.02
CLOSE_FLUSH_S = 2.0  # at shutdown, how long we try to copy what is still pending


class Replicator:
    def __init__(
        self, calls: RedisCalls, settings: RedisSettings, limits: StoreLimits, node_id: str
    ) -> None:
        self._calls = calls
        self._settings = settings
        self._limits = limits
        self._node_id = node_id
        self._script = calls.redis.register_script(SYNC)
        # Own sessions whose end Redis does not have yet -> the last seq stored there.
        self._flushed: dict[str, int] = {}
        self._dirty: dict[str, SessionLog] = {}
        self._wake = asyncio.Event()
        self._urgent = False  # a new session waits in the next round: skip the batch window

    @property
    def pending(self) -> int:
        """Own sessions not yet fully copied (the relay_replication_pending_sessions gauge)."""
        return len(self._flushed)

    def holds_more_than_redis(self, session_id: str) -> bool:
        return session_id in self._flushed

    def created(self, session: SessionLog) -> None:
        self._flushed[session.session_id] = 0
        self._urgent = True
        self.changed(session)

    def changed(self, session: SessionLog) -> None:
        if session.session_id in self._flushed:
            self._dirty[session.session_id] = session
            self._wake.set()

    async def run(self, closing: asyncio.Event) -> None:
        while not closing.is_set():
            await self._wake.wait()
            if not self._urgent:
                await asyncio.sleep(BATCH_WINDOW_S)  # gather what arrives meanwhile
            self._wake.clear()
            self._urgent = False
            try:
                await self._round()
            except StoreUnavailable:
                await asyncio.sleep(self._calls.backoff())
                self._wake.set()

    async def flush(self) -> None:
        """Copy what is still pending (bounded wait): a clean stop loses nothing it can save."""
        with contextlib.suppress(TimeoutError, StoreUnavailable):
            async with asyncio.timeout(CLOSE_FLUSH_S):
                while self._dirty:
                    await self._round()

    async def _round(self) -> None:
        batch, self._dirty = self._dirty, {}
        sent: list[tuple[SessionLog, int, EndState]] = []
        try:
            with self._calls.call(StoreOp.SYNC):
                async with self._calls.redis.pipeline(transaction=False) as pipe:
                    for session in batch.values():
                        plan = self._plan(session)
                        if plan is None:
                            continue
                        first, events, state, reason = plan
                        keys = Keys(self._settings.prefix, session.session_id)
                        await self._script(
                            keys=[keys.events, keys.meta, keys.gone],
                            args=[
                                first,
                                len(events),
                                *events,
                                state.value,
                                reason,
                                int(self._ttl_s(state) * 1000),
                                int((self._limits.session_ttl + GONE_TTL_S) * 1000),
                                session.content_type,
                                session.write_path.value,
                                self._node_id,
                                session.owner,
                                session.request_key,
                            ],
                            client=pipe,
                        )
                        sent.append((session, first + len(events) - 1, state))
                    results = await pipe.execute() if sent else []
        except StoreUnavailable:
            for session_id, session in batch.items():  # try these again next round
                self._dirty.setdefault(session_id, session)
            raise
        for (session, upto, state), stored in zip(sent, results, strict=True):
            session_id = session.session_id
            if stored == -1 or (state is not EndState.OPEN and stored >= upto):
                self._flushed.pop(session_id, None)  # all in Redis, or ended by another node
                continue
            self._flushed[session_id] = min(int(stored), upto)
            if stored < session.last_seq or session.state is not EndState.OPEN:
                self._dirty[session_id] = session  # more to copy (or a gap to fill)
                self._wake.set()

    def _plan(self, session: SessionLog) -> tuple[int, list[bytes], EndState, str] | None:
        """What to send for one session: (first seq, events, state to record, reason)."""
        done = self._flushed.get(session.session_id)
        if done is None:
            return None
        if session.gone_reason:  # dropped here before Redis had all of it: lost, said so
            reason = f"{session.gone_reason} on its node before it reached the shared store"
            return done + 1, [], EndState.FAILED, reason
        events: list[bytes] = []
        size = 0
        for raw in session.events_after(done, SYNC_MAX_EVENTS):
            if events and size + len(raw) > SYNC_MAX_BYTES:
                break
            events.append(raw)
            size += len(raw)
        complete = done + len(events) == session.last_seq
        if complete and session.state is not EndState.OPEN:
            return done + 1, events, session.state, session.reason
        return done + 1, events, EndState.OPEN, ""

    def _ttl_s(self, state: EndState) -> float:
        return OPEN_TTL_S if state is EndState.OPEN else self._limits.session_ttl
