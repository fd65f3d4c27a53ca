"""The relay node process: the ext_proc gRPC server and the HTTP front on one event loop.

This is where the parts meet: the store, the session quota, the reader registry and the
detached generations are made here and handed to each other and to the fronts. Ports may be
0 (the OS picks); the bound ports are written to a ports file once the node is ready, so a
supervisor never races on a guessed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvloop
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from extproc.access.quota import SessionQuota
from extproc.detached.generations import Generations
from extproc.inline import service
from extproc.node.config import NodeSettings
from extproc.node.metrics import RelayMetrics
from extproc.readers import grpc_relay
from extproc.readers.app import make_app
from extproc.readers.http import Node
from extproc.readers.registry import ReaderRegistry
from extproc.store import SessionStore, open_store

log = logging.getLogger("stream_relay.node")
GRACE_S = 5.0


@dataclass(frozen=True)
class RunningNode:
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    grpc_port: int
    http_port: int
    store: SessionStore
    generations: Generations
    background: asyncio.Task[None]

    async def stop(self, grace: float = GRACE_S) -> None:
        await self.grpc_server.stop(grace)
        await self.generations.close()
        await self.http_runner.cleanup()
        self.background.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.background
        await self.store.close()  # last: ended generations are copied to a shared store


async def start_node(settings: NodeSettings) -> RunningNode:
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)  # process CPU, memory, fds, GC: next to the relay's own
    metrics = RelayMetrics(registry)
    store = open_store(
        settings.store, settings.limits, metrics=metrics, node_lease=settings.node_lease
    )
    quota = SessionQuota(settings.max_sessions_per_identity)
    generations = Generations(
        store, settings.detach, metrics, max_event_bytes=settings.max_event_bytes
    )

    def readers_changed(session_id: str, readers: int) -> None:
        store.readers_changed(session_id)  # a shared store tells the other nodes
        generations.readers_changed(session_id, readers)  # the detached grace period

    readers = ReaderRegistry(settings.readers, metrics, on_change=readers_changed)
    await store.start(on_cancel=generations.cancel, reader_counts=readers.counts)
    background = asyncio.create_task(readers.watch_shares(store.valid_shares))

    server = grpc.aio.server()
    service.add_to_server(
        service.ExternalProcessor(store, quota, metrics, max_event_bytes=settings.max_event_bytes),
        server,
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_relay.add_to_server(grpc_relay.RelayServicer(store, readers, metrics), server)
    reflection.enable_server_reflection(
        (grpc_relay.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    grpc_port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    # handler_cancellation: a reader whose client went away stops counting at once, which
    # is what starts a detached generation's grace period.
    runner = web.AppRunner(
        make_app(Node(store, readers, generations, quota, metrics)),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.http_port)
    await site.start()
    http_port = runner.addresses[0][1]
    return RunningNode(server, runner, grpc_port, http_port, store, generations, background)


def write_ports_file(path: Path, ports: dict[str, int]) -> None:
    """Atomically publish the bound ports (readers never see a partial file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ports))
    os.replace(tmp, path)


def run(settings: NodeSettings, ports_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM, on uvloop's event loop: grpc.aio's per-message work runs
    in the loop's callbacks, and uvloop's cost ~20 % fewer instructions per ext_proc message
    than asyncio's own loop (bench/RESULTS.md)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(settings, ports_file))


async def serve(settings: NodeSettings, ports_file: Path | None = None) -> None:
    node = await start_node(settings)
    # Everything made so far (modules, servers, config) lives as long as the process: out of
    # the collector's sight, so a full collection no longer walks ~60,000 start-up objects
    # (15-35 ms of CPU each on the bench machine, with every ext_proc stream waiting).
    gc.collect()
    gc.freeze()
    log.info(
        "relay node ready: ext_proc grpc %s:%d, http %s:%d",
        settings.host,
        node.grpc_port,
        settings.host,
        node.http_port,
    )
    if ports_file is not None:
        write_ports_file(ports_file, {"grpc_port": node.grpc_port, "http_port": node.http_port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("relay node stopping")
    await node.stop()
