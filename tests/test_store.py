"""Tests for extproc.store.memory: LRU eviction by bytes, TTL after the end (with a fake clock),
tombstones that turn lost history into 410 rather than 404, the per-session byte limit, limit
validation, and byte accounting that always matches the logs actually kept."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import ConfigError, SessionGone, SessionNotFound
from extproc.node.metrics import RelayMetrics
from extproc.session.ids import new_session_id
from extproc.session.log import (
    EVENT_OVERHEAD_BYTES,
    LOG_OVERHEAD_BYTES,
    Cursor,
    EndState,
    SessionLog,
    WritePath,
)
from extproc.store import MemoryStore, StoreLimits

MIB = 1024 * 1024
TTL_S = 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def small_store(
    clock: FakeClock | None = None, *, metrics: RelayMetrics | None = None, **limits: float
) -> MemoryStore:
    values: dict[str, float] = {
        "store_max_bytes": MIB,
        "session_max_bytes": MIB,
        "session_ttl": TTL_S,
    }
    values.update(limits)
    return MemoryStore(
        StoreLimits(**values),  # type: ignore[arg-type]
        metrics=metrics or RelayMetrics(),
        clock=clock or FakeClock(),
    )


def drops(metrics: RelayMetrics, reason: str) -> float:
    """Sessions the store let go for `reason`, as its metric says."""
    value = metrics.registry.get_sample_value(
        "relay_store_dropped_sessions_total", {"reason": reason}
    )
    assert value is not None
    return value


def new_session(store: MemoryStore, payload: int = 0) -> SessionLog:
    log = store.create(content_type="text/event-stream", write_path=WritePath.INLINE)
    if payload:
        assert store.append(log, [b"x" * payload])
    return log


def kept_bytes(logs: list[SessionLog]) -> int:
    return sum(log.nbytes for log in logs if not log.gone_reason)


def test_create_then_get_returns_the_same_log() -> None:
    store = small_store()
    log = new_session(store)
    assert store.get(log.session_id) is log
    assert log.state is EndState.OPEN
    assert len(store) == 1


def test_unknown_session_is_not_found() -> None:
    store = small_store()
    new_session(store)
    with pytest.raises(SessionNotFound) as info:
        store.get(new_session_id())
    assert info.value.http_status == 404


def test_lru_evicts_least_recently_used_first_and_reads_refresh() -> None:
    metrics = RelayMetrics()
    store = small_store(metrics=metrics)
    a, b, c = (new_session(store, 300_000) for _ in range(3))
    store.get(a.session_id)  # a read: now b is the least recently used
    d = new_session(store, 300_000)  # does not fit next to a, b and c
    assert drops(metrics, "evicted") == 1
    assert b.gone_reason == "evicted"
    with pytest.raises(SessionGone) as info:
        store.get(b.session_id)
    assert info.value.http_status == 410
    for log in (a, c, d):
        assert store.get(log.session_id) is log
        assert not log.gone_reason
    assert store.nbytes == kept_bytes([a, b, c, d]) <= MIB


def test_appends_count_as_use() -> None:
    store = small_store()
    a, b = new_session(store, 300_000), new_session(store, 300_000)
    assert store.append(a, [b"x" * 10])  # a is now more recent than b
    new_session(store, 450_000)
    assert (a.gone_reason, b.gone_reason) == ("", "evicted")


def test_growing_session_evicts_others_not_itself() -> None:
    store = small_store()
    writer = new_session(store, 600_000)
    reader = new_session(store, 300_000)
    store.get(reader.session_id)  # read after the writer's last append
    assert store.append(writer, [b"y" * 200_000])  # must make room: the reader's log goes
    assert writer.gone_reason == ""
    assert reader.gone_reason == "evicted"
    assert store.get(writer.session_id) is writer
    assert writer.last_seq == 2
    assert store.nbytes == writer.nbytes


async def test_eviction_tells_a_reading_cursor() -> None:
    store = small_store()
    victim = new_session(store, 300_000)
    cursor = Cursor(store.get(victim.session_id), 0)
    for _ in range(3):
        new_session(store, 300_000)
    with pytest.raises(SessionGone, match="evicted"):
        async for _ in cursor.batches():
            pass


def test_without_tombstones_a_dropped_session_is_not_found() -> None:
    store = small_store(max_tombstones=0)
    victim = new_session(store, 300_000)
    for _ in range(3):
        new_session(store, 300_000)
    assert victim.gone_reason == "evicted"
    with pytest.raises(SessionNotFound):
        store.get(victim.session_id)


def test_tombstones_are_bounded() -> None:
    clock = FakeClock()
    store = small_store(clock, max_tombstones=2)
    logs = [new_session(store) for _ in range(3)]
    for log in logs:
        store.end(log, EndState.DONE)
    clock.now += TTL_S
    with pytest.raises(SessionGone):
        store.get(logs[2].session_id)
    with pytest.raises(SessionGone):
        store.get(logs[1].session_id)
    with pytest.raises(SessionNotFound):  # the oldest tombstone made room for newer ones
        store.get(logs[0].session_id)


def test_ended_session_expires_after_ttl() -> None:
    clock = FakeClock()
    metrics = RelayMetrics()
    store = small_store(clock, metrics=metrics)
    done = new_session(store, 1000)
    still_open = new_session(store, 1000)
    store.end(done, EndState.DONE)

    clock.now += TTL_S - 0.001
    assert store.get(done.session_id) is done
    clock.now += 0.001
    with pytest.raises(SessionGone, match="expired"):
        store.get(done.session_id)
    assert done.gone_reason == "expired"
    assert drops(metrics, "expired") == 1

    clock.now += 100 * TTL_S  # an open session never expires, however old
    assert store.get(still_open.session_id) is still_open
    assert store.nbytes == still_open.nbytes


def test_ttl_counts_from_the_end_not_the_creation() -> None:
    clock = FakeClock()
    store = small_store(clock)
    log = new_session(store)
    clock.now += 10 * TTL_S
    store.end(log, EndState.CANCELLED, "client disconnected")
    clock.now += TTL_S / 2
    assert store.get(log.session_id) is log
    store.end(log, EndState.DONE)  # a second end neither changes the state nor the deadline
    clock.now += TTL_S / 2
    with pytest.raises(SessionGone):
        store.get(log.session_id)
    assert log.state is EndState.CANCELLED


def test_per_session_limit_fails_the_session() -> None:
    store = small_store(session_max_bytes=4096)
    log = new_session(store)
    other = new_session(store)
    room = 4
    event = b"e" * ((4096 - LOG_OVERHEAD_BYTES) // room - EVENT_OVERHEAD_BYTES)  # fills exactly
    for _ in range(room):
        assert store.append(log, [event])
    assert log.nbytes == 4096 and log.state is EndState.OPEN  # exactly at the limit is allowed
    assert not store.append(log, [event])
    assert (log.state, log.reason) == (EndState.FAILED, "log_limit_exceeded")
    assert log.last_seq == room  # what was kept stays readable: nothing silently trimmed
    assert store.get(log.session_id) is log
    assert not store.append(log, [b"tiny"])
    assert log.last_seq == room
    assert store.append(other, [event])  # other sessions are not affected
    assert store.nbytes == log.nbytes + other.nbytes


def test_limit_is_checked_per_batch_before_appending() -> None:
    store = small_store(session_max_bytes=2048)
    log = new_session(store)
    assert not store.append(log, [b"a" * 700, b"b" * 700, b"c" * 700])
    assert log.last_seq == 0
    assert log.state is EndState.FAILED


def test_append_after_end_or_drop_returns_false() -> None:
    clock = FakeClock()
    store = small_store(clock)
    ended = new_session(store)
    store.end(ended, EndState.DONE)
    assert not store.append(ended, [b"late"])
    clock.now += TTL_S
    new_session(store)  # any store call expires what is due
    assert ended.gone_reason == "expired"
    assert not store.append(ended, [b"later"])
    assert ended.last_seq == 0


@pytest.mark.parametrize(
    "limits",
    [
        {
            "store_max_bytes": MIB - 1,
            "session_max_bytes": 1024,
        },  # each case breaks exactly one rule
        {"store_max_bytes": 0, "session_max_bytes": 0},
        {"store_max_bytes": MIB, "session_max_bytes": MIB + 1},
        {"session_max_bytes": 1023},
        {"session_max_bytes": -1},
        {"session_ttl": 0.0},
        {"session_ttl": -1.0},
        {"session_ttl": math.nan},
        {"session_ttl": math.inf},
        {"max_tombstones": -1},
    ],
)
def test_store_limits_validation(limits: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        StoreLimits(**limits)  # type: ignore[arg-type]


def test_store_limits_accepts_the_boundaries() -> None:
    StoreLimits()
    StoreLimits(store_max_bytes=MIB, session_max_bytes=MIB, session_ttl=0.001, max_tombstones=0)
    StoreLimits(store_max_bytes=MIB, session_max_bytes=1024)


def test_nbytes_returns_to_zero_after_everything_expires() -> None:
    clock = FakeClock()
    metrics = RelayMetrics()
    store = small_store(clock, metrics=metrics)
    logs = [new_session(store, 50_000 * (n % 4)) for n in range(40)]  # some get evicted
    assert drops(metrics, "evicted") > 0
    assert store.nbytes == kept_bytes(logs) <= MIB
    for n, log in enumerate(logs):
        store.end(log, [EndState.DONE, EndState.CANCELLED, EndState.FAILED][n % 3])
    clock.now += TTL_S
    with pytest.raises(SessionGone):
        store.get(logs[-1].session_id)
    assert store.nbytes == 0
    assert len(store) == 0
    assert drops(metrics, "expired") + drops(metrics, "evicted") == len(logs)


ops = st.lists(
    st.tuples(
        st.sampled_from(["create", "append", "read", "end", "tick"]),
        st.integers(min_value=0, max_value=50),
        st.integers(min_value=0, max_value=200_000),
    ),
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_accounting_matches_the_kept_logs(steps: list[tuple[str, int, int]]) -> None:
    clock = FakeClock()
    store = small_store(clock, session_max_bytes=300_000)
    logs: list[SessionLog] = []
    for op, pick, size in steps:
        log = logs[pick % len(logs)] if logs else None
        if op == "create" or log is None:
            logs.append(new_session(store))
        elif op == "append":
            kept = store.append(log, [b"z" * size])
            assert kept == (log.state is EndState.OPEN and not log.gone_reason)
        elif op == "read":
            try:
                assert store.get(log.session_id) is log
            except SessionGone:
                assert log.gone_reason
        elif op == "end":
            store.end(log, EndState.DONE)
        elif op == "tick":
            clock.now += size / 10_000
        assert store.nbytes == kept_bytes(logs) <= MIB
        assert len(store) == sum(1 for log in logs if not log.gone_reason)
