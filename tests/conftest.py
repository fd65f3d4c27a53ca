"""Shared fixtures: real stacks (demo upstream, relay node, Envoy) on free loopback ports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from extproc.ops.envoy_security import EnvoySecurity
from extproc.ops.supervisor import Stack, StackOptions, start_stack

FIXTURES = Path(__file__).parent / "fixtures"
TEST_DEMO_RATE = 400.0  # events/s: fast enough for a quick suite, slow enough to be live


def make_stack(
    tmp_path: Path,
    *,
    write_path: str = "detached",
    relay_args: tuple[str, ...] = (),
    nodes: int = 1,
    upstream: str | None = None,
    security: EnvoySecurity | None = None,
    upstream_key_file: Path | None = None,
) -> Stack:
    options = StackOptions(
        port=0,
        admin_port=0,
        upstream=upstream,
        demo_rate=TEST_DEMO_RATE,
        write_path=write_path,
        relay_args=relay_args,
        nodes=nodes,
        security=security,
        upstream_key_file=upstream_key_file,
    )
    return start_stack(options, workdir=tmp_path)


@pytest.fixture(scope="session", params=["detached", "inline", "redis-2-nodes"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack per write path, shared by the tests that do not break it: what holds for
    clients holds on both paths, and on two nodes sharing sessions through Redis (Envoy
    balances, so a resume or a reader often lands on the node that did not write)."""
    workdir = tmp_path_factory.mktemp(f"stack-{request.param}")
    if request.param == "redis-2-nodes":
        redis: RedisServer = request.getfixturevalue("shared_redis")
        running = make_stack(workdir, relay_args=("--store", redis.url), nodes=2)
    else:
        running = make_stack(workdir, write_path=request.param)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def detached_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = make_stack(tmp_path_factory.mktemp("detached"), relay_args=("--detach-grace", "0.5"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def hosted_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tests/hosted_upstream.py: a hosted LLM API's wire behaviour (headers, fixtures, errors)."""
    ports_file = tmp_path_factory.mktemp("hosted") / "ports.json"
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "hosted_upstream.py"), "--ports-file",
         str(ports_file)],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ports_file.is_file():  # polling a child process, bounded by the deadline
            assert server.poll() is None and time.monotonic() < deadline, "hosted upstream"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{json.loads(ports_file.read_text())['http_port']}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session", params=["detached", "inline"])
def hosted_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, hosted_upstream: str
) -> Iterator[Stack]:
    """A stack per write path in front of the hosted-API double."""
    workdir = tmp_path_factory.mktemp(f"hosted-{request.param}")
    running = make_stack(workdir, write_path=request.param, upstream=hosted_upstream)
    yield running
    running.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack for one test that kills or reconfigures parts of it."""
    running = make_stack(tmp_path)
    yield running
    running.stop()


def npm_ci_unless_installed(
    npm: str, project: Path, package: str, version: str, *, timeout_s: float
) -> None:
    """`npm ci` in `project` unless node_modules already holds `package` at `version`."""
    installed = project / "node_modules" / package / "package.json"
    if installed.is_file() and json.loads(installed.read_text())["version"] == version:
        return
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"


def run_browser_driver(argv: list[str], *, timeout_s: float) -> str:
    """Run a Node driver that starts Chromium, in its own process group so that a timeout
    kills Node and its Chromium together; its stdout, once it exited 0."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=timeout_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, f"driver failed:\n{out}\n{err}"
    return out


async def run_to_end(*argv: str, kill_after_s: float) -> tuple[int, bytes, bytes]:
    """Run a child process to its end; kill it if it is still running after `kill_after_s`."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(kill_after_s):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out, err


def get_json(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.load(response))


def envoy_stats(stack: Stack) -> dict[str, int]:
    """Envoy's counters and gauges by name."""
    stats = get_json(f"{stack.admin_url}/stats?format=json")["stats"]
    assert isinstance(stats, list)
    return {s["name"]: int(s["value"]) for s in stats if "value" in s}


def upstream_stats(stack: Stack) -> dict[str, int]:
    return {k: int(v) for k, v in get_json(f"{stack.upstream_url}/demo/stats").items()}  # type: ignore[call-overload]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, persisting to its tmp dir (restarts keep data)."""
    server = RedisServer(tmp_path / "redis", persist=True)
    server.workdir.mkdir()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session-scoped stacks that run on the Redis store."""
    server = RedisServer(tmp_path_factory.mktemp("shared-redis"))
    server.start()
    yield server
    server.kill()
