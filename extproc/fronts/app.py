"""The relay node's HTTP server: the SSE front, health and Prometheus metrics.

Envoy routes clients here (resumes, detached generations, reader endpoints); the paths under
/_relay/ are reached only through Envoy's re-routing. Operators scrape /metrics directly.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.detached import Generations
from extproc.fronts import sse, ws
from extproc.store import MemoryStore


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[sse.STORE_KEY].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def make_app(store: MemoryStore, generations: Generations) -> web.Application:
    app = web.Application()
    app[sse.STORE_KEY] = store
    app[sse.GENERATIONS_KEY] = generations
    app.router.add_get("/healthz", _health)
    app.router.add_get("/metrics", _metrics)
    # Envoy re-routes here with the original path appended (e.g. /_relay/resume/v1/chat/...).
    app.router.add_route("*", "/_relay/resume/{tail:.*}", sse.resume)
    app.router.add_route("*", "/_relay/detach/{tail:.*}", sse.detach)
    app.router.add_get("/relay/v1/sessions/{session}", sse.session_info)
    app.router.add_delete("/relay/v1/sessions/{session}", sse.cancel)
    app.router.add_get("/relay/v1/sessions/{session}/events", sse.events)
    app.router.add_get("/relay/v1/sessions/{session}/ws", ws.websocket)
    return app
