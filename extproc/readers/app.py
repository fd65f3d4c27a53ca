"""The relay node's HTTP server: every HTTP front's routes, health and Prometheus metrics.

Envoy routes clients here (resumes, detached generations, reader endpoints); the paths under
/_relay/ are reached only through Envoy's re-routing. Operators scrape /metrics directly.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.demo.page import demo_file
from extproc.readers import api, original, sse, websocket
from extproc.readers.http import NODE, Node, no_server_of_our_own, node_of, relay_errors


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    registry = node_of(request).metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def make_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[relay_errors])
    app[NODE] = node
    app.on_response_prepare.append(no_server_of_our_own)
    app.router.add_get("/healthz", _health)
    app.router.add_get("/metrics", _metrics)
    # Envoy re-routes here with the original path appended (e.g. /_relay/resume/v1/chat/...).
    app.router.add_route("*", "/_relay/resume/{tail:.*}", original.resume)
    app.router.add_route("*", "/_relay/detach/{tail:.*}", original.detach)
    app.router.add_get("/relay/v1/sessions/{session}", api.session_info)
    app.router.add_delete("/relay/v1/sessions/{session}", api.cancel)
    app.router.add_get("/relay/v1/sessions/{session}/events", sse.events)
    app.router.add_get("/relay/v1/sessions/{session}/ws", websocket.websocket)
    app.router.add_post("/relay/v1/sessions/{session}/share", api.share)
    app.router.add_delete("/relay/v1/sessions/{session}/share/{token_id}", api.revoke_share)
    app.router.add_get("/relay/v1/demo/{name:[^/]*}", demo_file)
    return app
