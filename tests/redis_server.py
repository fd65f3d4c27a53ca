"""A real redis-server for tests: its own process on a free loopback port, stopped, restarted
(with or without its data) and killed on demand. No fakes: the store's behaviour tests run
against the same server users deploy."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from stream_relay_bench.peers import redis_answers_ping

from extproc.ops.supervisor import free_port

START_TIMEOUT_S = 10.0


class RedisServer:
    """`persist=True` keeps an append-only file, so a restart finds the data again."""

    def __init__(self, workdir: Path, *, persist: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH: scripts/test installs Debian's redis-server")
        self.binary = binary
        self.workdir = workdir
        self.persist = persist
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, empty: bool = False) -> None:
        if empty:
            for path in self.workdir.glob("appendonly*"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        argv = [
            self.binary,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "yes" if self.persist else "no"),
            *("--appendfsync", "always", "--dir", str(self.workdir)),
            *("--protected-mode", "no", "--daemonize", "no"),
        ]
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not redis_answers_ping(self.port):
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited: {(self.workdir / 'redis.log').read_text()}")
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)  # polling a child process's readiness, bounded by the deadline

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits; clients see refused calls."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
