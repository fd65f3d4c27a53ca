"""The demo page (/relay/v1/demo/) in a real browser: headless Chromium driven by Playwright.

`clients/js/e2e/demo_page.mjs` opens the page, starts a slow stream, clicks "Drop connection"
twice mid-stream and waits for both panels (the resumable POST stream and the viewer that
joined the session) to finish; it prints the page's state, which must be the whole session,
dense ids, identical text in both panels, equal to what the relay logged.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import npm_ci_unless_installed, run_browser_driver
from test_chaos import reference_events

from extproc.ops.supervisor import Stack

JS_DIR = Path(__file__).parent.parent / "clients" / "js"
DRIVER = JS_DIR / "e2e" / "demo_page.mjs"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_COPY = Path("/tmp/demo-page.png")
NPM_CI_TIMEOUT_S = 300
DRIVER_TIMEOUT_S = 90
MAX_TOKENS = 40
EVENTS = MAX_TOKENS + 3  # role + tokens + finish + [DONE]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def playwright_node() -> Iterator[str]:
    """Node with clients/js installed (`npm ci` once, if playwright-core is missing or stale)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH (scripts/test installs them)")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/test does)")
    pinned = json.loads((JS_DIR / "package.json").read_text())["devDependencies"]
    npm_ci_unless_installed(
        npm, JS_DIR, "playwright-core", pinned["playwright-core"], timeout_s=NPM_CI_TIMEOUT_S
    )
    yield node


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_demo_page_and_client_are_served(detached_stack: Stack) -> None:
    base = f"{detached_stack.base_url}/relay/v1/demo/"
    status, content_type, body = fetch(base)
    assert status == 200 and content_type.startswith("text/html")
    assert b'id="drop"' in body and b'src="demo.js"' in body
    status, content_type, body = fetch(base + "demo.js")
    assert status == 200 and content_type.startswith("text/javascript")
    assert b'from "./client.js"' in body
    status, content_type, body = fetch(base + "client.js")
    assert status == 200 and content_type.startswith("text/javascript")
    assert body == (JS_DIR / "src" / "index.js").read_bytes()
    for missing in ("nope.js", "..%2f__init__.py", ".hidden", "%2e%2e"):
        assert fetch(base + missing)[0] == 404, missing


def run_driver(node: str, base_url: str, screenshot: Path) -> dict[str, object]:
    args = ["--screenshot", str(screenshot), "--rate", "25", "--max-tokens", str(MAX_TOKENS)]
    argv = [node, str(DRIVER), base_url, *args, "--timeout-ms", "40000"]
    out = run_browser_driver(argv, timeout_s=DRIVER_TIMEOUT_S)
    lines = out.splitlines()
    assert len(lines) == 1, out
    return dict(json.loads(lines[0]))


async def test_demo_page_resumes_through_two_drops(
    detached_stack: Stack, playwright_node: str, tmp_path: Path
) -> None:
    screenshot = tmp_path / "demo-page.png"
    page = await asyncio.to_thread(run_driver, playwright_node, detached_stack.base_url, screenshot)
    session = page["session"]
    writer, viewer = page["writer"], page["viewer"]
    assert isinstance(session, str) and isinstance(writer, dict) and isinstance(viewer, dict)
    assert (writer["state"], writer["error"]) == ("done", None)
    assert (viewer["state"], viewer["error"]) == ("done", None)
    dense = [f"{session}:{n}" for n in range(1, EVENTS + 1)]
    assert writer["ids"] == dense  # no event twice, none skipped, across both drops
    assert viewer["ids"] == dense
    assert page["drops"] == 2 and writer["reconnects"] == 2
    assert viewer["end"] == {"state": "done", "reason": "", "last_seq": EVENTS}

    logged = await reference_events(detached_stack, session)
    text = "".join(
        json.loads(e.data)["choices"][0]["delta"].get("content") or ""
        for e in logged
        if e.event == "message" and e.data != "[DONE]"
    )
    assert writer["text"] == viewer["text"] == text != ""
    assert page["consoleErrors"] == []

    data = screenshot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
