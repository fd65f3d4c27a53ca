"""The demo page at /relay/v1/demo/: static files from `static/`, and the JS client as
client.js (straight from a checkout's clients/js; a wheel force-includes a copy)."""

from __future__ import annotations

import mimetypes
import re
from importlib.resources import files
from pathlib import Path

from aiohttp import web

_STATIC = files("extproc.demo") / "static"
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_JS_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "js" / "src" / "index.js"


async def demo_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"] or "index.html"
    if _FILE_NAME.fullmatch(name) is None:
        raise web.HTTPNotFound()
    path = Path(str(_STATIC / name))
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
