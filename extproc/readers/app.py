"""The relay node's HTTP server: the SSE front, health and Prometheus metrics.

Envoy routes clients here (resumes, detached generations, reader endpoints); the paths under
/_relay/ are reached only through Envoy's re-routing. Operators scrape /metrics directly.
"""

from __future__ import annotations

import mimetypes
import re
from importlib.resources import files
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.detached.generations import Generations
from extproc.readers import original as sse
from extproc.readers import websocket as ws
from extproc.store import SessionStore


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _metrics(request: web.Request) -> web.Response:
    registry = request.app[sse.STORE_KEY].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


_DEMO_DIR = files("extproc.demo") / "static"
_DEMO_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
# The JS client, straight from a checkout; a wheel may force-include it as demo_page/client.js.
_JS_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "js" / "src" / "index.js"


async def _demo(request: web.Request) -> web.StreamResponse:
    """The demo page (extproc/demo_page/) at /relay/v1/demo/, and the JS client as client.js."""
    name = request.match_info["name"] or "index.html"
    if _DEMO_FILE.fullmatch(name) is None:
        raise web.HTTPNotFound()
    path = Path(str(_DEMO_DIR / name))
    if name == "client.js" and _JS_CLIENT.is_file():
        path = _JS_CLIENT
    if not path.is_file():
        raise web.HTTPNotFound()
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if name.endswith(".js"):
        content_type = "text/javascript"
    return web.Response(
        body=path.read_bytes(),
        content_type=content_type,
        charset="utf-8" if content_type.startswith("text/") else None,
        headers={"Cache-Control": "no-cache"},
    )


def make_app(store: SessionStore, generations: Generations) -> web.Application:
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
    app.router.add_post("/relay/v1/sessions/{session}/share", sse.share)
    app.router.add_delete("/relay/v1/sessions/{session}/share/{token_id}", sse.revoke_share)
    app.router.add_get("/relay/v1/demo/{name:[^/]*}", _demo)
    return app
