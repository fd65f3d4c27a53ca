"""The relay node process: the ext_proc gRPC server and the HTTP front on one event loop.

This is where the parts meet: the store, the session quota, the reader registry and the
detached generations are made here and handed to each other and to the fronts. Ports may be
0 (the OS picks); the bound ports are written to a ports file once the node is ready, so a
supervisor never races on a guessed port. With `--grpc-socket`/`--http-socket` both servers
also listen on Unix sockets (how `up` links Envoy to them).

Stopping: SIGTERM drains (health turns NOT_SERVING and /healthz 503 so Envoy sends new work
elsewhere; running generations, inline streams and readers go on for up to --drain-timeout),
then whatever still runs ends `cancelled` ("relay node stopping"). SIGINT, or a second
SIGTERM, skips what is left of the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
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
STOP_REASON = "relay node stopping"
# After the drain: how long cut streams get to write their end before the servers close.
SERVER_SHUTDOWN_S = 1.0
IDLE_POLL_S = 0.1  # how often a draining node looks whether its work is done
# The kernel caps a listen backlog at net.core.somaxconn (4096 on current kernels); aiohttp's
# 128 overflowed under a burst of readers (Envoy then answers 503 for the refused connects).
LISTEN_BACKLOG = 4096
# Above Envoy's largest request header limit (max_request_headers_kb ≤ 8192 KiB), so Envoy's
# limit is the one that applies and an oversized header value reaches the relay's typed errors
# instead of aiohttp's plain-text 400 (its default is 8190 bytes).
MAX_HEADER_FIELD_BYTES = 8192 * 1024 + 1024


@dataclass(frozen=True)
class RunningNode:
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    grpc_port: int
    http_port: int
    store: SessionStore
    generations: Generations
    readers: ReaderRegistry
    processor: service.ExternalProcessor
    health: health.aio.HealthServicer  # type: ignore[name-defined]
    draining: asyncio.Event  # set: /healthz answers 503
    background: tuple[asyncio.Task[None], ...]

    def busy(self) -> bool:
        """Work that a drain waits for: detached generations, ext_proc streams, readers."""
        return bool(self.generations.running or self.processor.streams or self.readers.attached)

    async def drain(self, limit_s: float, hurry: asyncio.Event) -> None:
        """Take no new work, and wait until the running work is done, `limit_s` passes or
        `hurry` is set, whichever comes first."""
        self.draining.set()
        await self.health.enter_graceful_shutdown()  # Envoy's checks see NOT_SERVING
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while self.busy() and not hurry.is_set() and (left := deadline - loop.time()) > 0:
            # Polled (a drain is rare and short); `hurry` cuts the wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), min(IDLE_POLL_S, left))

    async def stop(self, grace: float = SERVER_SHUTDOWN_S) -> None:
        """End what still runs `cancelled` (STOP_REASON), give its readers `grace` to write
        the end, close both servers and the store."""
        self.processor.stop_reason = STOP_REASON
        await self.generations.close(STOP_REASON)
        await self.grpc_server.stop(grace)  # inline streams left end with their stream
        await self.http_runner.cleanup()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.store.close()  # last: ended generations are copied to a shared store


def _health_gate(draining: asyncio.Event) -> Callable[..., Awaitable[web.StreamResponse]]:
    """/healthz fails while the node drains, so Envoy's HTTP checks agree with gRPC's."""

    @web.middleware
    async def gate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if draining.is_set() and request.path == "/healthz":
            return web.json_response({"status": "draining"}, status=503)
        return await handler(request)

    return gate


def _unlink_stale_socket(path: str) -> None:
    """A socket file left by a node that died (it cannot be bound over); nothing else."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


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
    background = (asyncio.create_task(readers.watch_shares(store.valid_shares)),)

    server = grpc.aio.server()
    processor = service.ExternalProcessor(
        store,
        quota,
        metrics,
        max_event_bytes=settings.max_event_bytes,
        write_path=settings.write_path,
    )
    service.add_to_server(processor, server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    grpc_relay.add_to_server(grpc_relay.RelayServicer(store, readers, metrics), server)
    reflection.enable_server_reflection(
        (grpc_relay.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    grpc_port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    if settings.grpc_socket:
        _unlink_stale_socket(settings.grpc_socket)
        server.add_insecure_port(f"unix:{settings.grpc_socket}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    draining = asyncio.Event()
    app = make_app(Node(store, readers, generations, quota, metrics))
    app.middlewares.append(_health_gate(draining))
    # handler_cancellation: a reader whose client went away stops counting at once, which
    # is what starts a detached generation's grace period.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=SERVER_SHUTDOWN_S,
        max_line_size=MAX_HEADER_FIELD_BYTES,
        max_field_size=MAX_HEADER_FIELD_BYTES,
    )
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.http_port, backlog=LISTEN_BACKLOG).start()
    http_port = runner.addresses[0][1]
    if settings.http_socket:
        _unlink_stale_socket(settings.http_socket)
        await web.UnixSite(runner, settings.http_socket, backlog=LISTEN_BACKLOG).start()
    return RunningNode(
        server,
        runner,
        grpc_port,
        http_port,
        store,
        generations,
        readers,
        processor,
        health_servicer,
        draining,
        background,
    )


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
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if sig is signal.SIGINT or stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    if not hurry.is_set() and node.busy():
        log.info(
            "relay node draining: running work may finish for up to %gs "
            "(SIGINT or another SIGTERM stops now)",
            settings.drain_timeout,
        )
        await node.drain(settings.drain_timeout, hurry)
    log.info("relay node stopping")
    await node.stop()
