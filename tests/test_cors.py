"""Browsers on other origins (`--cors-origin`), with Envoy's own CORS filter and policy: a
granted origin streams, drops, resumes (the preflight allows Last-Event-ID), reads every
response header and uses EventSource and WebSocket on sessions, in real headless Chromium from
a page on another loopback origin; any other origin gets no grant (the upstream's own `*` is
dropped) and its WebSocket upgrades are refused."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from conftest import make_stack, run_browser_driver
from test_demo_page import JS_DIR, playwright_node  # noqa: F401 (a fixture: npm ci once)

from extproc.ops.cli import build_parser
from extproc.ops.envoy_cors import parse_origin
from extproc.ops.envoy_security import EnvoySecurity
from extproc.ops.flags import config_argv
from extproc.ops.supervisor import Stack

DRIVER = Path(__file__).parent / "js" / "cors_page.mjs"
PLAYWRIGHT = JS_DIR / "node_modules" / "playwright-core" / "index.mjs"
DRIVER_TIMEOUT_S = 90
SLOW_EVENTS = 41  # tests/hosted_upstream.py: 40 chunks and [DONE]
CHAT = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("http://a.example:80", "http://a.example"),
        ("https://[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_an_origin_is_written_as_browsers_send_it(given: str, origin: str) -> None:
    assert parse_origin(given) == origin


@pytest.mark.parametrize(
    "bad", ["*", "null", "app.example.com", "http://a.example/app", "ftp://a", "http://a:99999"]
)
def test_anything_but_an_origin_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    from extproc.ops.cli import main

    assert main(["envoy-config", "--upstream", "http://127.0.0.1:1", "--cors-origin", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cors-origin" in err[0]


def test_origins_come_from_the_toml_file_unless_flags_name_them(tmp_path: Path) -> None:
    """As every setting: the command line wins over the file (a list is replaced, not merged,
    so a flag can narrow what the file grants)."""
    path = tmp_path / "relay.toml"
    path.write_text('cors-origin = ["https://a.example", "https://b.example"]\n')
    parser = build_parser()
    from_file = parser.parse_args(config_argv(parser, ["up", "--demo", "--config", str(path)]))
    assert from_file.cors_origin == ["https://a.example", "https://b.example"]
    argv = ["up", "--demo", "--config", str(path), "--cors-origin", "https://c.example"]
    args = parser.parse_args(config_argv(parser, argv))
    assert args.cors_origin == ["https://c.example"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Pages:
    """Two blank pages on loopback origins of their own: one granted, one not."""

    def __init__(self, directory: Path) -> None:
        (directory / "index.html").write_text(
            '<!doctype html><link rel="icon" href="data:,"><title>another origin</title>'
        )
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.servers = [
            http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)
        ]
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.granted, self.other = (
            f"http://127.0.0.1:{server.server_address[1]}" for server in self.servers
        )

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Pages]:
    served = _Pages(tmp_path_factory.mktemp("pages"))
    yield served
    served.close()


@pytest.fixture(scope="module", params=["detached", "inline"])
def cors_stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pages: _Pages,
    hosted_upstream: str,
) -> Iterator[Stack]:
    security = EnvoySecurity(max_request_bytes=1 << 20, cors_origins=(pages.granted,))
    running = make_stack(
        tmp_path_factory.mktemp(f"cors-{request.param}"),
        write_path=request.param,
        upstream=hosted_upstream,
        security=security,
    )
    yield running
    running.stop()


def preflight(stack: Stack, origin: str) -> httpx.Response:
    return httpx.options(
        f"{stack.base_url}/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, last-event-id, x-stainless-os",
        },
        timeout=30,
    )


def test_only_granted_origins_get_a_grant(cors_stack: Stack, pages: _Pages) -> None:
    allowed = preflight(cors_stack, pages.granted)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == pages.granted
    assert "last-event-id" in allowed.headers["access-control-allow-headers"]
    refused = preflight(cors_stack, pages.other)
    assert "access-control-allow-origin" not in refused.headers
    for origin, grant in ((pages.granted, pages.granted), (pages.other, None)):
        response = httpx.post(
            f"{cors_stack.base_url}/v1/chat/completions",
            json=CHAT,
            headers={"Origin": origin},
            timeout=30,
        )
        assert response.status_code == 200 and response.headers["x-relay-session"]
        # The upstream says `access-control-allow-origin: *`: only the policy grants here.
        assert response.headers.get("access-control-allow-origin") == grant
        if grant is not None:
            assert "x-relay-session" in response.headers["access-control-expose-headers"]
        assert "origin" in response.headers["vary"].lower()
    too_large = httpx.post(
        f"{cors_stack.base_url}/v1/chat/completions",
        content=b"x" * ((1 << 20) + 1),
        headers={"Origin": pages.granted, "content-type": "application/json"},
        timeout=30,
    )
    assert too_large.status_code == 413  # Envoy's direct answer, readable by the page
    assert too_large.headers["access-control-allow-origin"] == pages.granted


async def test_websockets_from_other_origins_are_refused(cors_stack: Stack, pages: _Pages) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        started = await client.post(f"{cors_stack.base_url}/v1/chat/completions", json=CHAT)
    url = f"{cors_stack.base_url.replace('http', 'ws', 1)}/relay/v1/sessions/"
    url += f"{started.headers['x-relay-session']}/ws"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, origin=websockets.Origin(pages.other)):
            pass
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"]["code"] == "origin_not_allowed"
    for origin in (websockets.Origin(pages.granted), None):  # granted, or not a browser
        async with websockets.connect(url, origin=origin) as socket:
            messages = [json.loads(m) async for m in socket]
        assert messages[-1]["type"] == "end" and len(messages) == SLOW_EVENTS + 1


def run_driver(node: str, stack: Stack, pages: _Pages) -> dict[str, Any]:
    argv = [node, str(DRIVER), str(PLAYWRIGHT), stack.base_url, pages.granted, pages.other]
    out = run_browser_driver(argv, timeout_s=DRIVER_TIMEOUT_S)
    return dict(json.loads(out.splitlines()[-1]))


@pytest.mark.usefixtures("playwright_node")  # node, Chromium and playwright-core, or skip
@pytest.mark.parametrize("cors_stack", ["detached"], indirect=True)
async def test_a_page_on_a_granted_origin_streams_drops_resumes_and_watches(
    cors_stack: Stack, pages: _Pages
) -> None:
    node = shutil.which("node")
    assert node is not None
    result = await asyncio.to_thread(run_driver, node, cors_stack, pages)
    granted, other = result["granted"], result["other"]
    session = granted["session"]
    assert granted["status"] == 200 and isinstance(session, str) and len(session) == 22
    assert granted["requestId"].startswith("req_")  # upstream headers are readable
    assert granted["rateLimit"] == "500"
    every = [f"{session}:{n}" for n in range(1, SLOW_EVENTS + 1)]
    assert granted["before"] + granted["after"] == every  # dropped after 3, resumed, dense
    assert granted["resumeStatus"] == 200 and granted["resumeEndsDone"] is True
    viewer = granted["eventSource"]
    assert viewer["ids"] == every and viewer["end"]["state"] == "done"
    assert granted["webSocket"]["types"][-1] == "end" and granted["webSocket"]["code"] == 1000
    assert granted["stateStatus"] == 200
    assert result["consoleErrors"]["granted"] == []

    # Another origin: the browser refuses every answer (and Envoy the WebSocket).
    assert "Failed to fetch" in other["fetchError"]
    assert other["eventSource"]["ids"] == [] and "end" not in other["eventSource"]
    assert other["webSocket"]["types"] == [] and other["webSocket"]["code"] != 1000
    assert "Failed to fetch" in other["stateError"]
    assert any("CORS policy" in line for line in result["consoleErrors"]["other"])
