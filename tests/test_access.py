"""Access controls without Envoy: the per-identity session quota (one check-and-reserve), share
tokens that give their slot back when they expire and stop admitting when revoked, on the
memory store and on a real Redis read by another node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis_server import RedisServer

from extproc.access.grants import MAX_SHARES_PER_SESSION, Access, mint_share
from extproc.access.quota import UNCOUNTED, SessionQuota
from extproc.errors import ConfigError, LimitExceeded, SessionNotFound
from extproc.node.metrics import RelayMetrics
from extproc.session.log import WritePath
from extproc.store import MemoryStore, RedisSettings, RedisStore, SessionStore

SSE = "text/event-stream"


def test_the_quota_reserves_with_the_check_and_gives_back_once() -> None:
    quota = SessionQuota(2)
    slots = [quota.reserve("alice"), quota.reserve("alice")]
    with pytest.raises(LimitExceeded) as refused:
        quota.reserve("alice")
    assert refused.value.http_status == 429
    assert quota.reserve("bob") is not UNCOUNTED  # a quota per identity
    slots[0].release()
    slots[0].release()  # idempotent: a slot is given back once
    assert quota.open("alice") == 1
    quota.reserve("alice")
    assert quota.open("alice") == 2
    assert quota.reserve("") is UNCOUNTED and quota.open("") == 0  # no auth: nothing counted
    with pytest.raises(ConfigError):
        SessionQuota(0)


@pytest.fixture(params=["memory", "redis-other-node"])
async def stores(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[tuple[SessionStore, SessionStore]]:
    """(the writing node's store, the store a reader asks)."""
    if request.param == "memory":
        store = MemoryStore(metrics=RelayMetrics())
        yield store, store
        return
    settings = RedisSettings(url=redis_server.url)
    writer = RedisStore(settings, metrics=RelayMetrics())
    reader = RedisStore(settings, metrics=RelayMetrics())
    for store in (writer, reader):
        await store.start()
    yield writer, reader
    for store in (writer, reader):
        await store.close()


async def _shared_session(writer: SessionStore, reader: SessionStore) -> str:
    session = writer.create(content_type=SSE, write_path=WritePath.INLINE, owner="alice")
    async with asyncio.timeout(10):
        while True:  # the reader's node sees it once it is copied (at once on memory)
            try:
                await reader.lookup(session.session_id)
                return session.session_id
            except SessionNotFound:
                continue


async def test_expired_share_tokens_give_their_slot_back(
    stores: tuple[SessionStore, SessionStore],
) -> None:
    writer, reader = stores
    session_id = await _shared_session(writer, reader)
    short = [mint_share(0.2) for _ in range(MAX_SHARES_PER_SESSION)]
    for share in short:
        await reader.add_share(session_id, share.token_id, share.record)
    with pytest.raises(LimitExceeded):  # full while they live
        extra = mint_share(60)
        await reader.add_share(session_id, extra.token_id, extra.record)
    await asyncio.sleep(0.25)  # let the tokens' own lifetime pass: what is under test
    fresh = mint_share(60)
    await reader.add_share(session_id, fresh.token_id, fresh.record)  # a slot came back
    log = await reader.lookup(session_id, access=Access.of("bob", fresh.token))
    assert log.session_id == session_id


async def test_valid_shares_drop_revoked_and_expired_tokens(
    stores: tuple[SessionStore, SessionStore],
) -> None:
    writer, reader = stores
    session_id = await _shared_session(writer, reader)
    kept, revoked, expiring = mint_share(60), mint_share(60), mint_share(0.2)
    for share in (kept, revoked, expiring):
        await writer.add_share(session_id, share.token_id, share.record)
    pairs = {(session_id, s.token_id) for s in (kept, revoked, expiring)}
    assert await reader.valid_shares(pairs) == pairs
    assert await writer.revoke_share(session_id, revoked.token_id)
    await asyncio.sleep(0.25)  # the expiring token's lifetime
    assert await reader.valid_shares(pairs) == {(session_id, kept.token_id)}
    with pytest.raises(SessionNotFound):  # and neither admits anyone any more
        await reader.lookup(session_id, access=Access.of("bob", revoked.token))
