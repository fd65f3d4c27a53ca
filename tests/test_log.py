"""Tests for extproc.session.log: dense seqs, first-cause-wins end state, and cursors that read
history then the live tail, stop at the end, and say out loud when the store dropped the log.

Tasks synchronise on events and on the log itself, never on sleeps; every wait has a deadline
so that a broken wake-up fails the test instead of hanging it."""

from __future__ import annotations

import asyncio

import pytest

from extproc.errors import SessionGone
from extproc.session.log import (
    EVENT_OVERHEAD_BYTES,
    LOG_OVERHEAD_BYTES,
    Cursor,
    EndState,
    SessionLog,
    WritePath,
)

DEADLINE_S = 5.0


def new_log() -> SessionLog:
    return SessionLog("s" * 22, content_type="text/event-stream", write_path=WritePath.INLINE)


def event(n: int) -> bytes:
    return f"data: {n}\n\n".encode()


async def read_all(cursor: Cursor) -> list[bytes]:
    return [raw async for batch in cursor.batches() for raw in batch]


async def next_batch(queue: asyncio.Queue[list[bytes] | None]) -> list[bytes] | None:
    async with asyncio.timeout(DEADLINE_S):
        return await queue.get()


async def pump(cursor: Cursor, queue: asyncio.Queue[list[bytes] | None]) -> None:
    """Forward every batch to `queue`, then None once the cursor stops."""
    async for batch in cursor.batches():
        await queue.put(batch)
    await queue.put(None)


def test_appends_get_dense_seqs_from_one() -> None:
    log = new_log()
    assert log.last_seq == 0
    assert [log.append(event(n)) for n in range(1, 6)] == [1, 2, 3, 4, 5]
    assert log.last_seq == 5
    assert log.events_after(0, 100) == [event(n) for n in range(1, 6)]
    assert log.events_after(2, 2) == [event(3), event(4)]
    assert log.events_after(5, 100) == []


def test_nbytes_counts_payload_and_bookkeeping() -> None:
    log = new_log()
    assert log.nbytes == LOG_OVERHEAD_BYTES
    log.append(b"x" * 100)
    log.append(b"")
    assert log.nbytes == LOG_OVERHEAD_BYTES + 100 + 2 * EVENT_OVERHEAD_BYTES


def test_first_end_cause_wins() -> None:
    log = new_log()
    log.end(EndState.OPEN, "not an end")
    assert log.state is EndState.OPEN
    assert log.ended_at is None
    log.end(EndState.CANCELLED, "client disconnected")
    ended_at = log.ended_at
    log.end(EndState.DONE)
    log.end(EndState.FAILED, "later failure")
    assert (log.state, log.reason, log.ended_at) == (
        EndState.CANCELLED,
        "client disconnected",
        ended_at,
    )
    assert ended_at is not None


def test_an_ended_log_refuses_appends() -> None:
    log = new_log()
    log.append(event(1))
    log.end(EndState.DONE)
    with pytest.raises(RuntimeError):
        log.append(event(2))
    assert log.last_seq == 1


async def test_cursor_reads_history_then_live_in_batches() -> None:
    log = new_log()
    for n in (1, 2, 3):
        log.append(event(n))
    queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
    reader = asyncio.create_task(pump(Cursor(log, 1), queue))

    assert await next_batch(queue) == [event(2), event(3)]  # history after seq 1
    log.append(event(4))
    assert await next_batch(queue) == [event(4)]
    log.append(event(5))  # two appends before the reader runs again: one batch
    log.append(event(6))
    assert await next_batch(queue) == [event(5), event(6)]
    log.end(EndState.DONE)
    assert await next_batch(queue) is None
    await reader


async def test_cursor_respects_batch_limit() -> None:
    log = new_log()
    for n in range(1, 8):
        log.append(event(n))
    log.end(EndState.DONE)
    cursor = Cursor(log, 0, batch_limit=3)
    batches = [batch async for batch in cursor.batches()]
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert cursor.seq == 7


async def test_cursor_on_an_ended_log_yields_the_rest_and_stops() -> None:
    log = new_log()
    for n in (1, 2, 3):
        log.append(event(n))
    log.end(EndState.FAILED, "upstream ended mid-event")
    async with asyncio.timeout(DEADLINE_S):
        assert await read_all(Cursor(log, 1)) == [event(2), event(3)]
        assert await read_all(Cursor(log, 3)) == []


async def test_waiting_cursor_stops_when_the_log_ends() -> None:
    log = new_log()
    queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
    reader = asyncio.create_task(pump(Cursor(log, 0), queue))
    log.append(event(1))
    assert await next_batch(queue) == [event(1)]  # the reader now waits on the open log
    log.end(EndState.CANCELLED, "client disconnected")
    assert await next_batch(queue) is None
    await reader


async def test_dropped_log_raises_session_gone_in_a_waiting_cursor() -> None:
    log = new_log()
    log.append(event(1))
    seen = asyncio.Event()

    async def read() -> None:
        async for _ in Cursor(log, 0).batches():
            seen.set()  # then it parks in wait_beyond before this task yields again

    reader = asyncio.create_task(read())
    async with asyncio.timeout(DEADLINE_S):
        await seen.wait()
        log.drop("evicted")
        with pytest.raises(SessionGone, match="evicted"):
            await reader
    with pytest.raises(SessionGone):  # a cursor opened later is refused as well
        await read_all(Cursor(log, 0))


@pytest.mark.timeout(10)  # the bug this guards against spun without ever yielding
async def test_waiting_for_the_end_of_a_dropped_log_raises_session_gone() -> None:
    """Callers wait for an end with `while log.state is OPEN: await log.wait_beyond(...)`. A log
    the store drops while open never ends: waiting on it must raise, not return at once (that
    loop then spun forever without yielding, so not even its own timeout could stop it)."""
    log = new_log()
    log.append(event(1))

    async def wait_for_the_end() -> None:
        while log.state is EndState.OPEN:
            await log.wait_beyond(log.last_seq)

    waiter = asyncio.create_task(wait_for_the_end())
    await asyncio.sleep(0)  # it parks in wait_beyond
    log.drop("evicted")
    async with asyncio.timeout(DEADLINE_S):
        with pytest.raises(SessionGone, match="evicted"):
            await waiter
        with pytest.raises(SessionGone, match="evicted"):  # and once dropped, at once
            await wait_for_the_end()


async def test_drop_frees_events() -> None:
    log = new_log()
    log.append(event(1))
    log.end(EndState.DONE)
    log.drop("expired")
    assert log.gone_reason == "expired"
    with pytest.raises(SessionGone, match="expired"):
        log.events_after(0, 10)


async def test_cancelled_waiter_does_not_break_other_waiters() -> None:
    log = new_log()
    log.append(event(1))
    queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue()
    doomed = asyncio.create_task(log.wait_beyond(1))  # runs first and parks on the log
    reader = asyncio.create_task(pump(Cursor(log, 0), queue))
    assert await next_batch(queue) == [event(1)]  # the reader parks right after this batch
    assert not doomed.done()
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    log.append(event(2))
    assert await next_batch(queue) == [event(2)]
    log.end(EndState.DONE)
    assert await next_batch(queue) is None
    await reader


async def test_many_cursors_at_different_speeds_see_identical_sequences() -> None:
    log = new_log()
    total = 300
    expected = [event(n) for n in range(1, total + 1)]
    slow_gate = asyncio.Event()

    async def reader(batch_limit: int, yields_per_batch: int) -> list[bytes]:
        got: list[bytes] = []
        async for batch in Cursor(log, 0, batch_limit=batch_limit).batches():
            got.extend(batch)
            for _ in range(yields_per_batch):  # a slower consumer: lets others run first
                await asyncio.sleep(0)
        return got

    async def gated_reader() -> list[bytes]:
        await slow_gate.wait()  # joins after most of the stream: history first, then live
        return await reader(5, 0)

    readers = [
        asyncio.create_task(reader(limit, yields))
        for limit, yields in [(1, 0), (1, 3), (7, 1), (256, 0), (256, 5)]
    ]
    late = asyncio.create_task(gated_reader())
    async with asyncio.timeout(DEADLINE_S):
        for n in range(total):
            log.append(expected[n])
            if n == 250:
                slow_gate.set()
            if n % 17 == 0:
                await asyncio.sleep(0)  # bursts of appends between reader turns
        log.end(EndState.DONE)
        results = await asyncio.gather(*readers, late)
    for got in results:
        assert got == expected


async def test_cursor_batches_are_capped_by_bytes_but_never_empty() -> None:
    log = SessionLog("s" * 22, content_type="text/event-stream", write_path=WritePath.INLINE)
    for _ in range(10):
        log.append(b"x" * 1000)
    log.append(b"y" * 5000)  # an event bigger than the cap still goes out whole
    log.end(EndState.DONE)
    sizes = [len(batch) async for batch in Cursor(log, 0, batch_bytes=2500).batches()]
    assert sizes == [3, 3, 3, 2]  # a batch ends with the event that reaches the cap
