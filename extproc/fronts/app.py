"""The relay node's HTTP server: the SSE front, health and Prometheus metrics.

Only Envoy routes here (resumes, reader endpoints); operators scrape /metrics directly.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.fronts import sse
from extproc.store import MemoryStore


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(store: MemoryStore) -> web.Application:
    app = web.Application()
    app[sse.STORE_KEY] = store
    app.router.add_get("/healthz", _health)
    app.router.add_get("/metrics", _metrics)
    # Envoy re-routes resumes here, original path appended (e.g. /_relay/resume/v1/chat/...).
    app.router.add_route("*", "/_relay/resume/{tail:.*}", sse.resume)
    return app
