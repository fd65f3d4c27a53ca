"""Copies this node's own sessions to Redis behind their first clients, and learns from the
replies whether each one is still this node's to write.

Appends mark a session dirty; a loop copies what accumulated in BATCH_WINDOW_S, every dirty
session in one script call per round (idempotent: a retried round, or a Redis that lost data,
is refilled from this node's memory). A new session and a recheck after a lease break go at
once, in a round of their own. A reply saying another node ended a session (this node was
fenced) goes to the store, which cuts the session's clients here. Bookkeeping stays bounded
through a Redis outage: a session dropped here (evicted, expired) before Redis heard of it is
forgotten, so only sessions still held here, or known to Redis, wait to be copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from extproc.errors import StoreUnavailable
from extproc.session.log import EndState, SessionLog
from extproc.store.memory import StoreLimits
from extproc.store.redis.client import RedisCalls
from extproc.store.redis.lease import Lease
from extproc.store.redis.schema import GONE_TTL_S, OPEN_TTL_S, RedisSettings
from extproc.store.redis.scripts import SYNC_ROUND
from extproc.vocabulary import StoreOp

log = logging.getLogger("stream_relay.store")

SYNC_MAX_EVENTS = 2048  # per session per round
SYNC_MAX_BYTES = 1024 * 1024
# Per round, all sessions together: Redis runs nothing else while a script runs, so one
# round stays a few milliseconds of its time; what does not fit goes in the next round.
ROUND_MAX_EVENTS = 8192
ROUND_MAX_BYTES = 4 * 1024 * 1024
# A round copies what accumulated for this long, so one call carries several events of each
# session and many sessions (see bench/RESULTS.md, "The cost of Redis per event"). Readers on
# other nodes lag the writer's own clients by about this much.
BATCH_WINDOW_S = 0.02
NO_LEASE_RETRY_S = 0.05  # a round refused for want of a lease waits for the renewal
CLOSE_FLUSH_S = 2.0  # at shutdown, how long we try to copy what is still pending


@dataclass(slots=True, eq=False)
class Copy:
    """One of this node's sessions on its way to Redis."""

    log: SessionLog
    stored: int = 0  # the last seq Redis holds, as far as this node knows
    sent: bool = False  # a round carrying it went out: Redis may know it (and fence it)
    confirmed: bool = False  # a round carrying it succeeded
    held_end: tuple[EndState, str] | None = None  # a `done` this node shows once Redis has it
    ttl_refreshed: float = 0.0
    check: bool = False  # Redis may have lost data (the lease broke): look closely next round
    request_key: str = ""  # the request key the last round carried to Redis

    def end(self) -> tuple[EndState, str]:
        log = self.log
        return self.held_end or (log.state, log.reason)


class Replicator:
    def __init__(
        self,
        calls: RedisCalls,
        settings: RedisSettings,
        limits: StoreLimits,
        node_id: str,
        lease: Lease,
    ) -> None:
        self._calls = calls
        self._lease = lease
        self._lease_key = settings.lease_key(node_id)
        self._script = calls.redis.register_script(SYNC_ROUND)
        self._head: list[bytes | int] = [
            settings.prefix.encode(),
            node_id.encode(),
            int((limits.session_ttl + GONE_TTL_S) * 1000),
            int(OPEN_TTL_S * 1000),
        ]
        self._ended_ttl = b"%d" % int(limits.session_ttl * 1000)
        self._open_ttl = b"%d" % int(OPEN_TTL_S * 1000)
        # Own sessions whose end Redis does not have yet.
        self._copies: dict[str, Copy] = {}
        self._dirty: dict[str, Copy] = {}
        self._recheck: set[str] = set()  # asked again after a lease break, not yet answered
        self._wake = asyncio.Event()
        self._one_round = asyncio.Lock()  # flush waits for a round the loop has in flight
        # Sessions that go at once, in a round of their own (a new session other nodes may
        # look up, a recheck), so the others keep their batch window.
        self._urgent: set[str] = set()
        self._at_once = False  # the last round did not take everything: no window before the next
        # Set by the store: a held `done` may be shown (Redis has it, or never knew the
        # session); another node ended a session; the lease is gone (renew now).
        self.release_end: Callable[[Copy], None] = lambda copy: None
        self.on_fenced: Callable[[Copy, str], None] = lambda copy, reason: None
        self.on_no_lease: Callable[[], None] = lambda: None

    @property
    def pending(self) -> int:
        """Own sessions not yet fully copied (the relay_replication_pending_sessions gauge)."""
        return len(self._copies)

    def holds_more_than_redis(self, session_id: str) -> bool:
        return session_id in self._copies

    def copy_of(self, session_id: str) -> Copy | None:
        return self._copies.get(session_id)

    def created(self, session: SessionLog) -> None:
        self._copies[session.session_id] = Copy(session, ttl_refreshed=time.monotonic())
        self.changed(session, urgent=True)  # readers elsewhere may ask for it at once

    def dirty(self, copy: Copy) -> None:
        """`changed` for a copy the caller already holds (the append path)."""
        self._dirty[copy.log.session_id] = copy
        self._wake.set()

    def changed(self, session: SessionLog, *, urgent: bool = False) -> None:
        copy = self._copies.get(session.session_id)
        if copy is not None:
            self._dirty[session.session_id] = copy
            if urgent:
                self._urgent.add(session.session_id)
            self._wake.set()

    def recheck(self) -> None:
        """This node's lease was broken: ask Redis about every session it may have fenced."""
        self._recheck = {sid for sid, copy in self._copies.items() if copy.sent}
        for session_id in self._recheck:
            copy = self._copies[session_id]
            copy.check = True
            self._dirty[session_id] = copy
        self._urgent |= self._recheck
        self._wake.set()
        self._answered(set())

    async def run(self, closing: asyncio.Event) -> None:
        while not closing.is_set():
            await self._wake.wait()
            if not self._urgent and not self._at_once:
                await asyncio.sleep(BATCH_WINDOW_S)  # gather what arrives meanwhile
            self._wake.clear()
            only = self._urgent if self._urgent and not self._at_once else None
            self._urgent, self._at_once = set(), False
            try:
                async with self._one_round:
                    copied = await self._round(only)
                if not copied:
                    self.on_no_lease()
                    await asyncio.sleep(NO_LEASE_RETRY_S)
            except StoreUnavailable:
                await asyncio.sleep(self._calls.backoff())
            except Exception:  # a bug must not stop replication: sessions here would be cut
                log.exception("replication round failed")
                await asyncio.sleep(self._calls.backoff())
            if self._dirty:
                self._wake.set()

    async def flush(self) -> None:
        """Copy what is still pending, after the round in flight (bounded wait): a clean stop
        loses nothing it can save."""
        with contextlib.suppress(TimeoutError, StoreUnavailable):
            async with asyncio.timeout(CLOSE_FLUSH_S):
                while True:
                    async with self._one_round:
                        if not self._dirty:
                            return
                        copied = await self._round()
                    if not copied:  # no lease: the heartbeat renews it
                        self.on_no_lease()
                        await asyncio.sleep(NO_LEASE_RETRY_S)

    async def _round(self, only: set[str] | None = None) -> bool:
        """One script call for every dirty session, or `only` these (up to the round's
        bounds); False if Redis refused it because this node's lease is gone."""
        if only is None:
            batch, self._dirty = self._dirty, {}
        else:
            batch = {sid: self._dirty.pop(sid) for sid in only if sid in self._dirty}
        try:
            return await self._copy_batch(batch)
        except BaseException:  # Redis down, a bug, or a stop mid-call: none of it is lost
            self._retry(batch.values())
            raise

    async def _copy_batch(self, batch: dict[str, Copy]) -> bool:
        args: list[bytes | str | int] = list(self._head)
        sent: list[tuple[Copy, int, EndState]] = []
        room_events, room_bytes = ROUND_MAX_EVENTS, ROUND_MAX_BYTES
        now = time.monotonic()
        forgotten = 0
        for session_id, copy in batch.items():
            if copy.log.gone_reason and not copy.sent and self._copies.get(session_id) is copy:
                # Dropped here (evicted, expired) before Redis ever knew it: nothing is left to
                # copy, so an outage does not keep bookkeeping for every session it saw.
                del self._copies[session_id]
                forgotten += 1
                continue
            if room_events <= 0 or room_bytes <= 0:
                self._dirty[session_id] = copy  # the next round, at once
                self._at_once = True
                continue
            if self._copies.get(session_id) is not copy:
                continue
            upto, state, size = self._plan(copy, args, now)
            room_events -= upto - copy.stored
            room_bytes -= size
            copy.sent = True
            sent.append((copy, upto, state))
        if forgotten:
            log.warning("%d sessions dropped here before they reached the shared store", forgotten)
        if not sent:
            return True
        with self._calls.call(StoreOp.SYNC):
            reply = await self._script(keys=[self._lease_key], args=args)
        if not reply[0]:
            self._retry(copy for copy, _, _ in sent)
            return False
        for (copy, upto, state), stored in zip(sent, reply[1:], strict=True):
            self._settle(copy, upto, state, stored)
        self._answered({copy.log.session_id for copy, _, _ in sent})
        return True

    def _retry(self, copies: Iterable[Copy]) -> None:
        for copy in copies:
            if self._copies.get(copy.log.session_id) is not copy:
                continue  # settled before the failure (its end is in Redis), or fenced
            # Never confirmed: taken as unknown to Redis (a reply lost after the script ran
            # is the one case this gets wrong; see the README's timing of the rule).
            copy.sent = copy.confirmed
            copy.request_key = ""  # it may not have arrived: sent again with the next round
            if not copy.sent and copy.held_end is not None:
                self.release_end(copy)  # no other node can contradict it: show it now
            self._dirty.setdefault(copy.log.session_id, copy)

    def _settle(self, copy: Copy, upto: int, state: EndState, stored: int | bytes) -> None:
        """What one session's reply means."""
        session_id = copy.log.session_id
        copy.confirmed = True
        if isinstance(stored, bytes):  # another node ended it: this node is fenced
            self._copies.pop(session_id, None)
            self.on_fenced(copy, stored.decode())
            return
        if state is not EndState.OPEN and stored >= upto:  # the end is in Redis
            self._copies.pop(session_id, None)
            if copy.held_end is not None:
                self.release_end(copy)
            return
        copy.stored = min(stored, upto)
        copy.check = False
        if copy.stored < copy.log.last_seq or copy.end()[0] is not EndState.OPEN:
            self._dirty[session_id] = copy  # more to copy, an end, or a gap to refill

    def _answered(self, session_ids: set[str]) -> None:
        if self._lease.rechecking:
            self._recheck -= session_ids
            self._recheck &= self._copies.keys()
            if not self._recheck:
                self._lease.rechecked()

    def _plan(
        self, copy: Copy, args: list[bytes | str | int], now: float
    ) -> tuple[int, EndState, int]:
        """Append one session's record to the round's arguments; returns (the last seq it
        carries, the state it records, its event bytes). Runs per session per round: kept lean."""
        session = copy.log
        stored = copy.stored
        if session.gone_reason:  # dropped here before Redis had all of it: lost, said so
            events: list[bytes] = []
            size = 0
            state = EndState.FAILED
            reason = f"{session.gone_reason} on its node before it reached the shared store"
        else:
            events = session.events_after(stored, SYNC_MAX_EVENTS)
            size = sum(map(len, events))
            if size > SYNC_MAX_BYTES:
                events, size = _first_bytes(events, SYNC_MAX_BYTES)
            state, reason = copy.held_end or (session.state, session.reason)
            if stored + len(events) < session.last_seq:
                state = EndState.OPEN  # the end goes with the last events
        if state is not EndState.OPEN:
            ttl = self._ended_ttl
        elif copy.confirmed and now - copy.ttl_refreshed > OPEN_TTL_S / 4:
            ttl = self._open_ttl
            copy.ttl_refreshed = now
        else:
            ttl = b"0"
        check = b"1" if copy.check else b"0"
        # The request key may become known after the first copy (a request body that ends
        # after the response began): it goes with the next round, for lookups elsewhere.
        with_meta = (
            stored == 0 or state is not EndState.OPEN or copy.request_key != session.request_key
        )
        args += (
            session.session_id,
            b"%d %d %s %s %s %d" % (stored + 1, len(events), _STATES[state], ttl, check, with_meta),
        )
        if with_meta:
            copy.request_key = session.request_key
            args += (
                session.content_type,
                session.write_path.value,
                session.owner,
                session.request_key,
            )
        if state is not EndState.OPEN:
            args.append(reason)
        args += events
        return stored + len(events), state, size


_STATES = {state: state.value.encode() for state in EndState}


def _first_bytes(events: list[bytes], limit: int) -> tuple[list[bytes], int]:
    """The leading events within `limit` bytes (at least one)."""
    size = 0
    for count, raw in enumerate(events):
        if count and size + len(raw) > limit:
            return events[:count], size
        size += len(raw)
    return events, size
