"""The session store contract, on every store: memory, Redis read by the writing node, and
Redis read by another node (a second RedisStore on the same real redis-server). Then what only
a shared store has: expiry in Redis, lost data said out loud, Redis down and back, Redis
restarted empty, cancels and readers announced across nodes, and fencing (a writer whose
session another node ended, or whose lease broke, stops and serves Redis's version; `done` is
shown only once Redis holds it). A node that dies or is paused (its lease lapses) is tested
with real SIGKILL and SIGSTOP in tests/test_multinode.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from redis import asyncio as aioredis
from redis_server import RedisServer

from extproc.access.grants import Access, mint_share
from extproc.errors import SessionGone, SessionNotFound, StoreUnavailable
from extproc.node.metrics import RelayMetrics
from extproc.session.log import Cursor, EndState, SessionLog, WritePath
from extproc.store import MemoryStore, RedisSettings, RedisStore, SessionStore, StoreLimits
from extproc.store.redis.schema import Keys
from extproc.store.redis.scripts import FAIL_IF_ORPHANED, SYNC_ROUND

MIB = 1024 * 1024
SSE = "text/event-stream"
LIMITS = StoreLimits(store_max_bytes=64 * MIB, session_max_bytes=MIB, session_ttl=60)


@dataclass
class Pair:
    writer: SessionStore
    reader: SessionStore  # the same store, or another node's


def redis_store(
    server: RedisServer,
    limits: StoreLimits = LIMITS,
    node_lease: float = 5.0,
    metrics: RelayMetrics | None = None,
) -> RedisStore:
    settings = RedisSettings(url=server.url, node_lease=node_lease)
    return RedisStore(settings, limits, metrics=metrics or RelayMetrics())


@pytest.fixture(params=["memory", "redis-same-node", "redis-other-node"])
async def pair(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Pair]:
    if request.param == "memory":
        store = MemoryStore(LIMITS, metrics=RelayMetrics())
        yield Pair(store, store)
        return
    writer = redis_store(redis_server)
    reader = writer if request.param == "redis-same-node" else redis_store(redis_server)
    for store in {id(writer): writer, id(reader): reader}.values():
        await store.start()
    yield Pair(writer, reader)
    for store in {id(writer): writer, id(reader): reader}.values():
        await store.close()


async def eventually(what: str, check: Callable[[], object], within: float = 10.0) -> None:
    """Wait for a condition another task or process brings about, bounded by a deadline."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        except (SessionNotFound, SessionGone, StoreUnavailable):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)  # polling another process's state, bounded by the deadline


async def read_all(log: SessionLog, after: int = 0) -> list[bytes]:
    out: list[bytes] = []
    async with asyncio.timeout(10):
        async for batch in Cursor(log, after).batches():
            out.extend(batch)
    return out


def events(n: int, start: int = 1) -> list[bytes]:
    return [b"data: event %d\n\n" % i for i in range(start, start + n)]


async def until_copied(pair: Pair, session: SessionLog) -> SessionLog:
    """The reader's view once it has every event the writer has (immediate on one node)."""

    async def caught_up() -> bool:
        log = await pair.reader.lookup(session.session_id)
        return log.last_seq == session.last_seq and log.state is session.state

    await eventually("the reader's copy to catch up", caught_up)
    return await pair.reader.lookup(session.session_id)


# The contract: every store.


async def test_history_then_live_then_the_end(pair: Pair) -> None:
    session = pair.writer.create(content_type=SSE, write_path=WritePath.DETACHED)
    assert pair.writer.append(session, events(3))
    log = await until_copied(pair, session)
    assert log.content_type == SSE and log.write_path is WritePath.DETACHED
    reading = asyncio.create_task(read_all(log))
    assert pair.writer.append(session, events(2, start=4))
    pair.writer.end(session, EndState.DONE)
    assert await reading == events(5)
    assert log.state is EndState.DONE


async def test_resume_after_an_id_and_wait_for_an_id_the_writer_sent(pair: Pair) -> None:
    session = pair.writer.create(content_type=SSE, write_path=WritePath.INLINE)
    assert pair.writer.append(session, events(10))
    # The writer's client saw event 10; a reader elsewhere may lag: the lookup waits for it.
    log = await pair.reader.lookup(session.session_id, at_least=10)
    assert log.last_seq >= 10
    pair.writer.end(session, EndState.DONE)
    assert await read_all(log, after=7) == events(3, start=8)


async def test_unknown_sessions_are_not_found(pair: Pair) -> None:
    with pytest.raises(SessionNotFound):
        await pair.reader.lookup("A" * 22)


async def test_many_readers_see_identical_sequences(pair: Pair) -> None:
    session = pair.writer.create(content_type=SSE, write_path=WritePath.DETACHED)
    log = await until_copied(pair, session)
    readers = [asyncio.create_task(read_all(log)) for _ in range(20)]
    for i in range(1, 101):
        assert pair.writer.append(session, events(1, start=i))
        if i % 10 == 0:
            await asyncio.sleep(0)  # let readers interleave with the writer
    pair.writer.end(session, EndState.DONE)
    results = await asyncio.gather(*readers)
    assert all(result == events(100) for result in results)


async def test_the_session_byte_limit_fails_the_session_for_every_reader(pair: Pair) -> None:
    session = pair.writer.create(content_type=SSE, write_path=WritePath.INLINE)
    assert pair.writer.append(session, events(2))
    assert not pair.writer.append(session, [b"data: " + b"x" * MIB + b"\n\n"])
    log = await until_copied(pair, session)
    assert log.state is EndState.FAILED and log.reason == "log_limit_exceeded"
    assert await read_all(log) == events(2)


async def test_ndjson_sessions_keep_their_content_type(pair: Pair) -> None:
    session = pair.writer.create(content_type="application/x-ndjson", write_path=WritePath.INLINE)
    assert pair.writer.append(session, [b'{"a":1}\n', b'{"b":2}\n'])
    pair.writer.end(session, EndState.CANCELLED, "client left")
    log = await until_copied(pair, session)
    assert log.content_type == "application/x-ndjson"
    assert (log.state, log.reason) == (EndState.CANCELLED, "client left")
    assert await read_all(log) == [b'{"a":1}\n', b'{"b":2}\n']


async def test_only_the_owner_or_a_share_token_reads_and_strangers_see_404(pair: Pair) -> None:
    session = pair.writer.create(content_type=SSE, write_path=WritePath.DETACHED, owner="alice")
    pair.writer.append(session, events(2))
    await until_copied(pair, session)
    sid = session.session_id
    with pytest.raises(SessionNotFound) as unknown:
        await pair.reader.lookup("B" * 22, access=Access.of("bob"))
    for stranger in (Access.of("bob"), Access.of(None), Access.of("alice2")):
        with pytest.raises(SessionNotFound) as refused:
            await pair.reader.lookup(sid, access=stranger)
        # The same answer as for an id that does not exist (only the id differs).
        assert refused.value.json_body() == unknown.value.json_body().replace(
            b"B" * 22, sid.encode()
        )
    assert (await pair.reader.lookup(sid, access=Access.of("alice"))).last_seq == 2

    share = mint_share(60)
    await pair.writer.add_share(sid, share.token_id, share.record)
    assert (await pair.reader.lookup(sid, access=Access.of("bob", share.token))).last_seq == 2
    forged = share.token[:-4] + ("AAAA" if not share.token.endswith("AAAA") else "BBBB")
    for bad in (forged, share.token_id, "nope.nope", ""):
        with pytest.raises(SessionNotFound):
            await pair.reader.lookup(sid, access=Access.of("bob", bad))
    with pytest.raises(SessionNotFound):  # read-only: never the owner's rights
        await pair.reader.lookup(sid, access=Access.of("bob", share.token).for_owner())
    other = pair.writer.create(content_type=SSE, write_path=WritePath.DETACHED, owner="alice")
    await until_copied(pair, other)
    with pytest.raises(SessionNotFound):  # a token opens its one session only
        await pair.reader.lookup(other.session_id, access=Access.of("bob", share.token))

    assert await pair.writer.revoke_share(sid, share.token_id)
    assert not await pair.writer.revoke_share(sid, share.token_id)
    with pytest.raises(SessionNotFound):
        await pair.reader.lookup(sid, access=Access.of("bob", share.token))
    expired = mint_share(0.05)
    await pair.writer.add_share(sid, expired.token_id, expired.record)
    await eventually("the token to expire", lambda: expired.record.expires_at < time.time())
    with pytest.raises(SessionNotFound):
        await pair.reader.lookup(sid, access=Access.of("bob", expired.token))


async def test_sessions_without_an_owner_are_open_to_every_caller(pair: Pair) -> None:
    session = pair.writer.create(content_type=SSE, write_path=WritePath.INLINE)
    await until_copied(pair, session)
    log = await pair.reader.lookup(session.session_id, access=Access.of("anyone"))
    assert log.owner == ""


# What only a shared store has.


def fenced(metrics: RelayMetrics) -> dict[str, float | None]:
    return {
        reason: metrics.registry.get_sample_value("relay_writer_fenced_total", {"reason": reason})
        for reason in ("ended_elsewhere", "lease_lapsed")
    }


def store_up(metrics: RelayMetrics) -> float | None:
    return metrics.registry.get_sample_value("relay_store_up")


async def two_nodes(
    server: RedisServer,
    *,
    a_metrics: RelayMetrics | None = None,
    a_cancels: Callable[[str], bool] = lambda session_id: False,
    b_readers: Callable[[], dict[str, int]] = dict,
    **kwargs: object,
) -> tuple[RedisStore, RedisStore]:
    """Two nodes on one Redis; `a` hears cancels with `a_cancels`, `b` counts its readers
    with `b_readers` (what the node would wire in)."""
    a = redis_store(server, metrics=a_metrics, **kwargs)  # type: ignore[arg-type]
    b = redis_store(server, **kwargs)  # type: ignore[arg-type]
    await a.start(on_cancel=a_cancels)
    await b.start(reader_counts=b_readers)
    return a, b


async def test_ended_sessions_expire_from_redis_as_gone(redis_server: RedisServer) -> None:
    limits = StoreLimits(store_max_bytes=64 * MIB, session_max_bytes=MIB, session_ttl=0.3)
    a, b = await two_nodes(redis_server, limits=limits)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(3))
        a.end(session, EndState.DONE)
        await until_copied(Pair(a, b), session)

        async def gone() -> bool:
            try:
                await b.lookup(session.session_id)
            except SessionGone:
                return True
            return False

        await eventually("the session to expire in Redis", gone)
    finally:
        await a.close()
        await b.close()


async def test_events_lost_from_redis_are_gone_never_skipped(redis_server: RedisServer) -> None:
    """Redis under memory pressure may evict a session's stream but keep its metadata: a
    reader gets 410, never a log with a hole in it."""
    a, b = await two_nodes(redis_server)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(5))
        a.end(session, EndState.DONE)
        await until_copied(Pair(a, b), session)
        c = redis_store(redis_server)  # a third node, no copy cached yet
        await c.start()
        try:
            raw = aioredis.from_url(redis_server.url)
            await raw.delete(f"stream-relay:{{{session.session_id}}}:events")
            await raw.aclose()
            with pytest.raises(SessionGone):
                await c.lookup(session.session_id)
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


async def test_a_hole_found_while_following_is_gone_for_every_later_lookup(
    redis_server: RedisServer,
) -> None:
    """The follower of an open session finds a hole in its stream: the mirror is dropped, and
    lookups on that node answer 410 from then on, as on a node that never mirrored it (not
    the dropped copy, an open session with no events)."""
    a, b = await two_nodes(redis_server)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(3))
        mirror = await until_copied(Pair(a, b), session)
        raw = aioredis.from_url(redis_server.url)
        await raw.xadd(Keys("stream-relay", session.session_id).events, {"d": b"x"}, id="0-10")
        await raw.aclose()
        await eventually("the follower to find the hole", lambda: mirror.gone_reason)
        with pytest.raises(SessionGone):
            await b.lookup(session.session_id)
    finally:
        await a.close()
        await b.close()


@pytest.mark.timeout(20)  # the bug this guards against spun without ever yielding
async def test_a_mirror_evicted_while_a_resume_waits_for_its_id_is_gone(
    redis_server: RedisServer,
) -> None:
    """A resume with an id the mirror has not caught up to waits for it; if the mirror is
    evicted meanwhile (it stays open, empty) the resume gets 410 and the node goes on."""
    a, b = await two_nodes(redis_server)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(3))
        mirror = await until_copied(Pair(a, b), session)
        waiting = asyncio.create_task(b.lookup(session.session_id, at_least=10))
        await asyncio.sleep(0.1)  # it waits for event 10
        assert not waiting.done()
        mirror.drop("evicted")
        async with asyncio.timeout(5):
            with pytest.raises(SessionGone):
                await waiting
    finally:
        await a.close()
        await b.close()


async def test_redis_down_writes_go_on_reads_get_503_then_all_recovers(
    redis_server: RedisServer,
) -> None:
    metrics = RelayMetrics()
    a, b = await two_nodes(redis_server, a_metrics=metrics)
    try:
        before = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(before, events(4))
        a.end(before, EndState.DONE)
        await until_copied(Pair(a, b), before)

        redis_server.stop()
        during = a.create(content_type=SSE, write_path=WritePath.INLINE)
        assert a.append(during, events(6))  # the writer never waits on Redis
        with pytest.raises(StoreUnavailable) as error:
            await b.lookup(before.session_id)
        assert error.value.http_status == 503
        own = await a.lookup(during.session_id)  # not yet copied: the writing node answers
        assert own is during
        a.end(during, EndState.DONE)
        await eventually("the writer to notice Redis is down", lambda: store_up(metrics) == 0)

        redis_server.start()  # same port, same append-only file
        copied = await until_copied(Pair(a, b), during)
        assert await read_all(copied) == events(6)
        kept = await b.lookup(before.session_id)
        assert await read_all(kept) == events(4)  # nothing already in Redis was lost
        await eventually("the writer to see Redis again", lambda: store_up(metrics) == 1)
    finally:
        await a.close()
        await b.close()


async def test_redis_restarted_empty_old_sessions_unknown_open_ones_copied_again(
    redis_server: RedisServer,
) -> None:
    a, b = await two_nodes(redis_server)
    try:
        finished = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(finished, events(3))
        a.end(finished, EndState.DONE)
        live = a.create(content_type=SSE, write_path=WritePath.DETACHED)
        a.append(live, events(5))
        await until_copied(Pair(a, b), finished)
        await until_copied(Pair(a, b), live)

        redis_server.stop()
        redis_server.start(empty=True)
        # A node that knew Redis before says 503 (retry) while writers copy live sessions back.
        with pytest.raises(StoreUnavailable):
            await b.lookup(finished.session_id)
        c = redis_store(redis_server)  # a node that never saw either session
        await c.start()
        try:
            with pytest.raises(SessionNotFound):
                await c.lookup(finished.session_id)
            a.append(live, events(2, start=6))  # the writer notices the hole and refills it
            a.end(live, EndState.DONE)
            copied = await until_copied(Pair(a, c), live)
            assert await read_all(copied) == events(7)
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


async def test_a_cancel_reaches_the_node_that_runs_the_generation(
    redis_server: RedisServer,
) -> None:
    cancelled = asyncio.Event()
    seen: list[str] = []

    def on_cancel(session_id: str) -> bool:
        seen.append(session_id)
        cancelled.set()
        return True

    a, b = await two_nodes(redis_server, a_cancels=on_cancel)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.DETACHED)
        await until_copied(Pair(a, b), session)

        async def published() -> bool:
            return await b.request_cancel(session.session_id)

        await eventually("node a to listen for cancels", published)
        async with asyncio.timeout(10):
            await cancelled.wait()
        assert session.session_id in seen
    finally:
        await a.close()
        await b.close()


async def test_a_malformed_cancel_message_does_not_stop_the_listener(
    redis_server: RedisServer,
) -> None:
    """Anything published on the cancel channel (it is Redis's, not only the relay's) is at
    worst no cancel: the listener goes on, and the next real cancel still arrives."""
    seen: list[str] = []
    a, b = await two_nodes(redis_server, a_cancels=lambda session_id: bool(seen.append(session_id)))
    try:
        session = a.create(content_type=SSE, write_path=WritePath.DETACHED)
        raw = aioredis.from_url(redis_server.url)
        try:
            await eventually(
                "node a to listen for cancels",
                lambda: raw.publish("stream-relay:cancel", b"\xff\xfe not utf-8"),
            )
        finally:
            await raw.aclose()

        async def cancelled() -> bool:
            await b.request_cancel(session.session_id)
            return session.session_id in seen

        await eventually("the real cancel to arrive", cancelled)
    finally:
        await a.close()
        await b.close()


async def test_readers_on_another_node_are_announced_to_the_writer(
    redis_server: RedisServer,
) -> None:
    counts: dict[str, int] = {}
    a, b = await two_nodes(redis_server, b_readers=counts.copy, node_lease=0.6)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.DETACHED)
        a.append(session, events(1))
        await until_copied(Pair(a, b), session)
        assert await a.remote_readers(session.session_id) == 0
        counts[session.session_id] = 3
        b.readers_changed(session.session_id)

        async def announced() -> bool:
            return await a.remote_readers(session.session_id) == 3

        await eventually("b's readers to be announced", announced)
        assert await b.remote_readers(session.session_id) == 0  # a node does not count itself
        counts.clear()
        b.readers_changed(session.session_id)
        await eventually("b's readers to leave", lambda: _no_readers(a, session))
    finally:
        await a.close()
        await b.close()


async def _no_readers(store: RedisStore, session: SessionLog) -> bool:
    return await store.remote_readers(session.session_id) == 0


# Fencing: one truth per session.


async def fail_behind_writers_back(server: RedisServer, writer: RedisStore, session_id: str) -> str:
    """What another node does when a writer's lease lapsed (the writer paused): its lease key
    goes and the session is ended `failed`, atomically, while the writer does not know yet."""
    keys = Keys(writer.settings.prefix, session_id)
    lease = writer.settings.lease_key(writer.node_id)
    reason = "relay node stopped (test)"
    raw = aioredis.from_url(server.url)
    try:
        async with raw.pipeline(transaction=True) as pipe:
            pipe.delete(lease)
            pipe.eval(
                FAIL_IF_ORPHANED,
                4,
                keys.events,
                keys.meta,
                keys.gone,
                lease,
                reason,
                60_000,
                60_000,
            )
            assert (await pipe.execute())[1] == 1
    finally:
        await raw.aclose()
    return reason


async def test_a_writer_fenced_in_redis_cuts_its_session_and_serves_redis_version(
    redis_server: RedisServer,
) -> None:
    cancelled: list[str] = []
    metrics = RelayMetrics()
    a, b = await two_nodes(
        redis_server, a_cancels=lambda sid: bool(cancelled.append(sid)), a_metrics=metrics
    )
    try:
        session = a.create(content_type=SSE, write_path=WritePath.DETACHED)
        a.append(session, events(4))
        await until_copied(Pair(a, b), session)
        reading = asyncio.create_task(read_all(session))  # a reader on the writing node
        reason = await fail_behind_writers_back(redis_server, a, session.session_id)

        a.append(session, events(1, start=5))  # a does not know yet: its next round tells it
        await eventually("the writer to learn it was fenced", lambda: a.fenced(session))
        assert (session.state, session.reason) == (EndState.FAILED, reason)
        assert not a.append(session, events(1, start=6))
        assert cancelled == [session.session_id]  # a generation running here stops
        assert fenced(metrics) == {"ended_elsewhere": 1, "lease_lapsed": 0}
        assert await reading == events(5)  # cut after what it had: never `done`
        for node in (a, b):  # every node serves Redis's version, the writer included
            log = await node.lookup(session.session_id)
            assert (log.state, log.reason) == (EndState.FAILED, reason)
            assert await read_all(log) == events(4)
    finally:
        await a.close()
        await b.close()


async def test_a_writer_stalled_past_its_lease_shows_nothing_more(
    redis_server: RedisServer,
) -> None:
    lease = 0.5
    metrics = RelayMetrics()
    a, b = await two_nodes(redis_server, node_lease=lease, a_metrics=metrics)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(3))
        await until_copied(Pair(a, b), session)
        time.sleep(2 * lease)  # noqa: ASYNC251 - the fault: this process stalls past a's lease
        assert a.fenced(session)  # checked before the next event is shown: it is not
        assert not a.append(session, events(1, start=4))
        assert session.state is EndState.FAILED and "lost its lease" in session.reason
        assert fenced(metrics) == {"ended_elsewhere": 0, "lease_lapsed": 1}

        async def agreed() -> bool:
            views = [await node.lookup(session.session_id) for node in (a, b)]
            return all(v.state is EndState.FAILED for v in views)

        await eventually("every node to see the session failed", agreed)
        for node in (a, b):
            assert await read_all(await node.lookup(session.session_id)) == events(3)
    finally:
        await a.close()
        await b.close()


async def test_a_lease_lost_in_redis_alone_is_renewed_and_writing_goes_on(
    redis_server: RedisServer,
) -> None:
    """Redis dropped the lease key (evicted, say) while the writer was fine: its next round is
    refused, it renews at once, and since no node ended the session it goes on."""
    a, b = await two_nodes(redis_server)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(2))
        await until_copied(Pair(a, b), session)
        raw = aioredis.from_url(redis_server.url)
        await raw.delete(a.settings.lease_key(a.node_id))
        await raw.aclose()
        assert a.append(session, events(2, start=3))
        a.end(session, EndState.DONE)
        copied = await until_copied(Pair(a, b), session)
        assert copied.state is EndState.DONE and await read_all(copied) == events(4)
        assert not a.fenced(session)
    finally:
        await a.close()
        await b.close()


async def test_done_is_shown_only_once_redis_holds_it(redis_server: RedisServer) -> None:
    metrics = RelayMetrics()
    a, b = await two_nodes(redis_server, a_metrics=metrics)
    try:
        known = a.create(content_type=SSE, write_path=WritePath.DETACHED)
        a.append(known, events(3))
        await until_copied(Pair(a, b), known)
        reading = asyncio.create_task(read_all(known))

        redis_server.stop()
        a.end(known, EndState.DONE)  # Redis has the session: another node could fail it
        unknown = a.create(content_type=SSE, write_path=WritePath.DETACHED)
        a.append(unknown, events(2))
        a.end(unknown, EndState.DONE)  # Redis never heard of it: nobody can contradict it
        assert unknown.state is EndState.DONE
        await eventually("a round to fail", lambda: store_up(metrics) == 0)
        assert known.state is EndState.OPEN and not reading.done()  # a client here: no end yet

        redis_server.start()  # same data
        assert await reading == events(3)
        assert known.state is EndState.DONE
        assert (await until_copied(Pair(a, b), known)).state is EndState.DONE
    finally:
        await a.close()
        await b.close()


async def test_a_round_retried_after_a_lost_reply_changes_nothing(
    redis_server: RedisServer,
) -> None:
    """The replication script run twice with the same records (the writer never saw the first
    reply): the same answers, no event twice, and its own end is not taken for a fence."""
    raw = aioredis.from_url(redis_server.url)
    try:
        await raw.set("lease", "a")
        head = ["p", "a", 60_000, 60_000]
        meta = [SSE, "inline", "", ""]  # content type, write path, owner, request key
        first = [*head, "S1", "1 2 open 0 0 1", *meta, *events(2)]
        later = [*head, "S1", "3 2 done 60000 0 1", *meta, "", *events(2, start=3)]
        no_lease = await raw.eval(SYNC_ROUND, 1, "nobody", *first)
        assert no_lease == [0]  # a writer without its lease writes nothing
        for _ in range(2):
            assert await raw.eval(SYNC_ROUND, 1, "lease", *first) == [1, 2]
        for _ in range(2):
            assert await raw.eval(SYNC_ROUND, 1, "lease", *later) == [1, 4]
        assert await raw.xlen("p:{S1}:events") == 5  # four events and the end marker
        assert await raw.hget("p:{S1}:meta", "state") == b"done"
    finally:
        await raw.aclose()


# Replication that fails for a reason nobody planned for, or is stopped mid-call.


def script_failing_once(store: RedisStore, error: Exception) -> None:
    """The writer's next replication call raises `error` (a bug, an unexpected reply)."""
    real = store._replicator._script
    failed: list[Exception] = []

    async def script(**kwargs: object) -> object:
        if not failed:
            failed.append(error)
            raise error
        return await real(**kwargs)  # type: ignore[arg-type]

    store._replicator._script = script  # type: ignore[assignment]


async def test_a_round_that_fails_unexpectedly_is_retried(redis_server: RedisServer) -> None:
    a, b = await two_nodes(redis_server)
    try:
        script_failing_once(a, RuntimeError("unexpected"))
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(3))  # nothing more is written: the failed round must come back
        assert (await until_copied(Pair(a, b), session)).last_seq == 3
    finally:
        await a.close()
        await b.close()


async def test_a_clean_stop_waits_for_the_round_in_flight(redis_server: RedisServer) -> None:
    """close() while the loop's round is still in Redis (slow): the stop waits for it instead
    of cancelling it, so the session's last events and its end are in Redis."""
    a, b = await two_nodes(redis_server)
    in_flight = asyncio.Event()
    real = a._replicator._script

    async def slow_script(**kwargs: object) -> object:
        in_flight.set()
        await asyncio.sleep(0.2)  # the fault: a slow Redis, not a synchronisation
        return await real(**kwargs)  # type: ignore[arg-type]

    a._replicator._script = slow_script  # type: ignore[assignment]
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(3))
        a.end(session, EndState.DONE)
        async with asyncio.timeout(5):
            await in_flight.wait()
        await a.close()
        copied = await b.lookup(session.session_id)
        assert copied.state is EndState.DONE and await read_all(copied) == events(3)
    finally:
        await b.close()


async def test_a_newer_follower_of_a_session_stays_known_after_the_older_one_ends(
    redis_server: RedisServer,
) -> None:
    """A mirror evicted and looked up again has two followers for a moment; the older one
    ending must not forget the newer, which close() waits for."""
    a, b = await two_nodes(redis_server)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(1))
        await until_copied(Pair(a, b), session)
        [older] = b._mirrors.followers
        b._mirrors._logs.popitem()  # b's cache evicts the mirror (as when full)
        newer_mirror = await b.lookup(session.session_id)
        assert not newer_mirror.gone_reason
        a.append(session, events(1, start=2))  # wakes both followers' reads
        await eventually("the older follower to end", older.done)
        assert len(b._mirrors.followers) == 1 and not b._mirrors.followers[0].done()
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "entry", [{"end": "bogus", "reason": "x"}, {"end": "done"}, {"nothing": "x"}]
)
async def test_a_stream_entry_the_follower_cannot_read_drops_the_mirror(
    redis_server: RedisServer, entry: dict[str, str]
) -> None:
    """An entry no relay writes (a bad end state, a missing field) ends the follower: the
    mirror is dropped (410 for its readers and for later lookups), never left open unfollowed."""
    a, b = await two_nodes(redis_server)
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(3))
        mirror = await until_copied(Pair(a, b), session)
        raw = aioredis.from_url(redis_server.url)
        await raw.xadd(Keys("stream-relay", session.session_id).events, entry, id="0-4")
        await raw.aclose()
        await eventually("the follower to drop the mirror", lambda: mirror.gone_reason)
        with pytest.raises(SessionGone):
            await b.lookup(session.session_id)
        assert not b._mirrors.followers
    finally:
        await a.close()
        await b.close()


def pending(metrics: RelayMetrics) -> float | None:
    return metrics.registry.get_sample_value("relay_replication_pending_sessions")


async def test_sessions_dropped_during_an_outage_are_not_kept_pending(
    redis_server: RedisServer,
) -> None:
    """While Redis is down, sessions this node evicts before Redis ever heard of them leave the
    replication's bookkeeping (it would grow with every session of the outage); the ones still
    held here are all copied once Redis is back."""
    limits = StoreLimits(store_max_bytes=MIB, session_max_bytes=MIB // 4, session_ttl=60)
    metrics = RelayMetrics()
    a, b = await two_nodes(redis_server, a_metrics=metrics, limits=limits)
    try:
        redis_server.stop()
        big = b"data: " + b"x" * (MIB // 5) + b"\n\n"
        sessions = []
        for _ in range(20):
            session = a.create(content_type=SSE, write_path=WritePath.INLINE)
            a.append(session, [big])
            a.end(session, EndState.DONE)
            sessions.append(session)
        held = [s for s in sessions if not s.gone_reason]
        assert 0 < len(held) < 10  # the store evicted the others
        await eventually("a round to fail", lambda: store_up(metrics) == 0)
        await eventually("dropped sessions to leave", lambda: pending(metrics) == len(held))

        redis_server.start()
        for session in held:
            assert await read_all(await until_copied(Pair(a, b), session)) == [big]
        await eventually("nothing left to copy", lambda: pending(metrics) == 0)
    finally:
        await a.close()
        await b.close()


async def test_a_request_key_known_after_the_first_copy_reaches_redis_while_open(
    redis_server: RedisServer,
) -> None:
    """A request body may end after the response began: its key, set on the session after its
    first copy, goes with the next round, so a node that mirrors the open session later checks
    a resume against it (it reached Redis only with the end)."""
    a, b = await two_nodes(redis_server)
    c = redis_store(redis_server)
    await c.start()
    try:
        session = a.create(content_type=SSE, write_path=WritePath.INLINE)
        a.append(session, events(1))
        assert (await until_copied(Pair(a, b), session)).request_key == ""
        session.request_key = "the creating request"
        a.append(session, events(1, start=2))
        await until_copied(Pair(a, b), session)  # the round that carries event 2 went out
        mirror = await c.lookup(session.session_id)  # c mirrors it now
        assert mirror.state is EndState.OPEN and mirror.request_key == "the creating request"
    finally:
        for node in (a, b, c):
            await node.close()
