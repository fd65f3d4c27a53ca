"""Memory bounded by the configured caps, tombstones included: the tombstone bound follows the
store's size, a churn of sessions far past the cap leaves the store's memory within it (in
process, measured with tracemalloc; and through a real Envoy and relay node, read from the
node's gauges), and an idle store lets go of expired sessions on its own."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import make_stack
from hypothesis import given, settings
from hypothesis import strategies as st
from test_e2e import chat
from test_observability import relay_value

from extproc.node.metrics import RelayMetrics
from extproc.ops.supervisor import Stack
from extproc.session.ids import new_session_id
from extproc.session.log import EndState, WritePath
from extproc.store import MemoryStore, StoreLimits
from extproc.store.memory import MAX_TOMBSTONES
from extproc.store.tombstones import BYTES_PER_TOMBSTONE as TOMBSTONE_BYTES
from extproc.store.tombstones import NOT_THE_OWNER, Tombstones
from extproc.vocabulary import DropReason

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("store_bytes", "tombstones"),
    [(MIB, 1598), (16 * MIB, 25_575), (256 * MIB, 65_536), (4096 * MIB, MAX_TOMBSTONES)],
)
def test_the_tombstone_bound_follows_the_store_size(store_bytes: int, tombstones: int) -> None:
    limits = StoreLimits(store_max_bytes=store_bytes)
    assert limits.tombstones == tombstones
    assert limits.tombstones * TOMBSTONE_BYTES <= store_bytes // 16
    assert StoreLimits(store_max_bytes=store_bytes, max_tombstones=3).tombstones == 3


def test_a_churn_far_past_the_cap_keeps_the_store_within_it() -> None:
    """Once the 1 MiB store is full, 5,000 more sessions of ~8 KiB (~40 MiB) leave what is
    allocated where it was: nothing of a dropped session outlives it (tombstones live in
    buffers allocated at start)."""
    metrics = RelayMetrics()
    limits = StoreLimits(store_max_bytes=MIB, session_ttl=3600)
    store = MemoryStore(limits, metrics=metrics)

    def churn(sessions: int) -> None:
        for i in range(sessions):
            log = store.create(content_type="text/event-stream", write_path=WritePath.DETACHED)
            store.append(log, [b"data: %d\n\n" % i + b"x" * 200] * 40)
            store.end(log, EndState.DONE)

    tracemalloc.start()
    try:
        churn(300)  # full: evicting from here on
        full = tracemalloc.get_traced_memory()[0]
        churn(5000)
        grown = tracemalloc.get_traced_memory()[0] - full
    finally:
        tracemalloc.stop()
    assert store.nbytes <= MIB
    assert store.tombstones == metrics.store_tombstones() == limits.tombstones
    assert grown <= 64 * 1024, grown


class DropSignal(RelayMetrics):
    """Metrics that also tell the test when the store let a session go."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = asyncio.Event()

    def store_dropped(self, reason: DropReason) -> None:
        super().store_dropped(reason)
        self.dropped.set()


async def test_an_idle_store_lets_expired_sessions_go_on_its_own() -> None:
    metrics = DropSignal()
    store = MemoryStore(StoreLimits(store_max_bytes=MIB, session_ttl=0.1), metrics=metrics)
    log = store.create(content_type="text/event-stream", write_path=WritePath.DETACHED)
    store.append(log, [b"data: x\n\n"])
    store.end(log, EndState.DONE)
    # No store call from here on: only the store's own timer can expire the session.
    await asyncio.wait_for(metrics.dropped.wait(), timeout=10)
    assert len(store) == 0 and store.nbytes == 0 and log.gone_reason == "expired"
    await store.close()


@pytest.fixture
def small_store_stack(tmp_path: Path) -> Iterator[Stack]:
    running = make_stack(tmp_path, relay_args=("--store-max-bytes", str(MIB)))
    yield running
    running.stop()


async def churn(stack: Stack, rounds: int, at_once: int) -> list[str]:
    """Sessions of ~45 KB each, `at_once` at a time; their ids, in order of their end."""
    payload = chat(max_tokens=200, prompt="churn")
    sessions: list[str] = []

    async def one(client: httpx.AsyncClient) -> None:
        response = await client.post(
            f"{stack.base_url}/v1/chat/completions", json=payload, headers={"x-demo-rate": "0"}
        )
        assert response.status_code == 200
        sessions.append(response.headers["x-relay-session"])

    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(rounds):
            await asyncio.gather(*(one(client) for _ in range(at_once)))
    return sessions


def test_a_session_churn_through_envoy_stays_within_the_caps(small_store_stack: Stack) -> None:
    """400 sessions of ~45 KB (~18 MB) through a relay node whose store holds 1 MiB."""
    stack = small_store_stack
    sessions = asyncio.run(churn(stack, rounds=50, at_once=8))
    assert relay_value(stack, "relay_store_bytes") <= MIB
    evicted = relay_value(stack, "relay_store_dropped_sessions_total", reason="evicted")
    assert evicted > 350
    assert relay_value(stack, "relay_store_tombstones") == evicted  # each one remembered
    latest = httpx.get(f"{stack.base_url}/relay/v1/sessions/{sessions[-1]}/events", timeout=30)
    assert latest.status_code == 200
    gone = httpx.get(f"{stack.base_url}/relay/v1/sessions/{sessions[0]}/events", timeout=30)
    assert gone.status_code == 410  # gone, and said so


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 8), drops=st.lists(st.integers(0, 30), max_size=80))
def test_tombstones_remember_exactly_the_last_ones(capacity: int, drops: list[int]) -> None:
    """Against a model: after any sequence of drops (ids may repeat), the last `capacity`
    drops are found with their reason and owner, and nothing older is."""
    ids = [new_session_id() for _ in range(31)]
    tombstones = Tombstones(capacity)
    model: list[tuple[str, DropReason, str]] = []
    for n in drops:
        reason = (DropReason.EVICTED, DropReason.EXPIRED)[n % 2]
        owner = "" if n % 3 == 0 else f"key:{n % 3}"
        tombstones.add(ids[n], reason, owner)
        model = [*model, (ids[n], reason, owner)][-capacity:]
    assert len(tombstones) == len(model)
    latest = {session: (reason, owner) for session, reason, owner in model}
    for session in ids:
        if session not in latest:
            assert tombstones.reason(session) is None
            continue
        reason, owner = latest[session]
        assert tombstones.reason(session) == reason.value
        assert tombstones.owner_seen_by(session, owner) == owner
        assert tombstones.owner_seen_by(session, "key:other") == (owner and NOT_THE_OWNER)
