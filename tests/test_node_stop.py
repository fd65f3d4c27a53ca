"""The relay node's own edges (layer 3, a real node on port 0, and through a real Envoy): a
draining node fails its health checks at once, waits for running work up to its drain
timeout and no longer, ends an inline stream it cuts `cancelled` ("relay node stopping"),
and answers an oversized Last-Event-ID with the typed JSON error, not aiohttp's plain text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_service import SSE_BODY, ExtProcStream, body, open_session, wait_for_end

from extproc.node.config import NodeSettings
from extproc.node.process import STOP_REASON, RunningNode, start_node
from extproc.ops.supervisor import Stack
from extproc.session.log import EndState

DEADLINE_S = 5.0
HUGE_ID = "A" * 59_000 + ":1"  # 59 KB: under Envoy's 60 KiB header limit, over aiohttp's 8 KiB


@pytest.fixture
async def node() -> AsyncIterator[RunningNode]:
    running = await start_node(NodeSettings())
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


async def health(node: RunningNode) -> tuple[int, int]:
    """(gRPC health status, /healthz HTTP status)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{node.http_port}/healthz") as response,
    ):
        return reply.status, response.status


async def test_a_draining_node_fails_its_checks_and_waits_for_its_streams(
    node: RunningNode,
) -> None:
    assert await health(node) == (health_pb2.HealthCheckResponse.SERVING, 200)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        stream = ExtProcStream(channel)
        log = await open_session(stream, node)
        await stream.exchange(body(SSE_BODY[:30]))
        hurry = asyncio.Event()
        started = time.monotonic()
        drain = asyncio.create_task(node.drain(30.0, hurry))
        async with asyncio.timeout(DEADLINE_S):
            while not node.draining.is_set():  # noqa: ASYNC110 - the task's first steps
                await asyncio.sleep(0)
        assert await health(node) == (health_pb2.HealthCheckResponse.NOT_SERVING, 503)
        await stream.exchange(body(SSE_BODY[30:40]))  # still served while it drains
        assert not drain.done()  # the inline stream is running work
        hurry.set()  # a second SIGTERM
        await asyncio.wait_for(drain, DEADLINE_S)
        assert time.monotonic() - started < DEADLINE_S
        assert log.state is EndState.OPEN
        await node.stop(grace=0.1)
        await wait_for_end(log)
    assert (log.state, log.reason) == (EndState.CANCELLED, STOP_REASON)


async def test_a_drain_ends_with_the_work_or_at_its_timeout(node: RunningNode) -> None:
    started = time.monotonic()
    await asyncio.wait_for(node.drain(30.0, asyncio.Event()), DEADLINE_S)  # nothing running
    assert time.monotonic() - started < 1.0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        stream = ExtProcStream(channel)
        await open_session(stream, node)
        started = time.monotonic()
        await asyncio.wait_for(node.drain(0.5, asyncio.Event()), DEADLINE_S)
        assert 0.5 <= time.monotonic() - started < DEADLINE_S  # waited, and no longer


async def test_an_oversized_last_event_id_gets_the_typed_error(node: RunningNode) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{node.http_port}/relay/v1/sessions/{'A' * 22}/events",
            headers={"Last-Event-ID": HUGE_ID},
        ) as response,
    ):
        assert response.status == 400
        assert response.content_type == "application/json"
        error = (await response.json())["error"]
    assert error["code"] == "malformed_event_id"
    assert HUGE_ID not in error["message"]  # the input is not echoed back whole


def test_an_oversized_last_event_id_through_envoy_gets_the_typed_error(
    detached_stack: Stack,
) -> None:
    response = httpx.get(
        f"{detached_stack.base_url}/relay/v1/sessions/{'A' * 22}/events",
        headers={"Last-Event-ID": HUGE_ID},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_event_id"
