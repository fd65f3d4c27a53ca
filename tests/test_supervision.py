"""`stream-relay up` as a user runs it, with its children killed under it: a SIGKILLed relay
node or Envoy is restarted and traffic flows again while `up` keeps running; a child that keeps
crashing ends `up` with a message naming it; stopping `up` drains and ends live sessions
`cancelled`; `up` leaves no work directory, secret or socket behind."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_e2e import ID_LINE, chat, events_of

CLI = [sys.executable, "-m", "extproc"]
START_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 30.0


class Up:
    """A running `stream-relay up`: its banner, and each line it prints after it."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [*CLI, "up", "--demo", "--port", "0", "--admin-port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.said: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.banner = self.expect("Ctrl-C stops everything", START_TIMEOUT_S)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def expect(self, text: str, timeout: float = EVENT_TIMEOUT_S) -> str:
        """Wait for a line containing `text`; everything said up to it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"up never said {text!r}; it said:\n{''.join(self.said)}"
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            assert line, f"up ended before saying {text!r}:\n{''.join(self.said)}"
            self.said.append(line)
            if text in line:
                return "".join(self.said)

    def url(self, name: str) -> str:
        found = re.search(rf"^\s+{name}\s+(\S+)", self.banner, re.M)
        assert found is not None, self.banner
        return found.group(1)

    def child_pid(self, role: str) -> int:
        """The pid of a running child of `up`: relay, envoy or upstream."""
        marker = {"relay": " serve ", "envoy": "/envoy -c ", "upstream": " demo-upstream "}[role]
        found = [pid for pid, cmdline in children_of(self.process.pid) if marker in cmdline]
        assert len(found) == 1, (role, children_of(self.process.pid))
        return found[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z":
            found.append((int(entry.name), f" {cmdline}"))
    return found


@pytest.fixture
def state_env(tmp_path: Path) -> dict[str, str]:
    """The environment for `up` and `status`, with a state directory of this test's own."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    return {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}


@pytest.fixture
def up_factory(state_env: dict[str, str]) -> Iterator[type[Up]]:
    started: list[Up] = []

    class Started(Up):
        def __init__(self, args: list[str]) -> None:
            super().__init__(args, state_env)
            started.append(self)

    yield Started  # type: ignore[misc]
    for up in started:
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGINT)
            try:
                up.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                up.process.kill()
                up.process.wait()


def tagged_stream(base_url: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/chat/completions", json=chat(prompt="alive?"), headers=headers, timeout=30
    )


def wait_tagged(base_url: str, deadline_s: float = 20.0) -> httpx.Response:
    """Streams until one is tagged again (while the relay is down they fail open, untagged)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            response = tagged_stream(base_url)
        except httpx.TransportError:
            response = None  # Envoy itself is coming back
        if response is not None and "x-relay-session" in response.headers:
            return response
        assert time.monotonic() < deadline, "responses were never tagged again"
        time.sleep(0.1)  # polling another process, bounded by the deadline


def status(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "status", "--interval", "0.2"], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_killed_relay_node_is_restarted_while_up_keeps_running(
    up_factory: type[Up], state_env: dict[str, str]
) -> None:
    up = up_factory([])
    base = up.url("base URL")
    first = tagged_stream(base)
    assert "x-relay-session" in first.headers
    old_metrics = up.url("relay metrics")
    assert status(state_env).stdout.splitlines()[0].split()[2] == old_metrics

    os.kill(up.child_pid("relay"), signal.SIGKILL)
    said = up.expect("relay is back")
    assert "relay killed by SIGKILL; restarting it in 0.25s" in said
    assert "fail open" in said
    again = wait_tagged(base)
    assert len(ID_LINE.findall(again.content)) == len(events_of(again.content))
    assert up.process.poll() is None

    # `status` without flags finds the restarted node (its metrics port is new).
    result = status(state_env)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert header.startswith("stream-relay status  http://127.0.0.1:")
    assert header.split()[2] != old_metrics
    assert up.stop() == 0


def test_a_killed_envoy_is_restarted_on_the_same_port(up_factory: type[Up]) -> None:
    up = up_factory([])
    base = up.url("base URL")
    assert "x-relay-session" in tagged_stream(base).headers
    os.kill(up.child_pid("envoy"), signal.SIGKILL)
    said = up.expect("envoy is back")
    assert "envoy killed by SIGKILL; restarting it" in said
    wait_tagged(base)
    assert up.process.poll() is None
    assert up.stop() == 0


def test_a_child_that_keeps_crashing_ends_up_with_a_clear_message(up_factory: type[Up]) -> None:
    up = up_factory([])
    relay = up.child_pid("relay")
    argv = (Path("/proc") / str(relay) / "cmdline").read_bytes().split(b"\0")
    socket_dir = Path(argv[argv.index(b"--grpc-socket") + 1].decode()).parent
    # From now on the relay node cannot start: where its sockets go is no directory.
    shutil.rmtree(socket_dir)
    socket_dir.write_text("")
    try:
        os.kill(relay, signal.SIGKILL)
        assert up.process.wait(timeout=60) == 1
        said = up.expect("stopped")
        assert (
            "stream-relay: relay keeps crashing: 5 exits within 60s, the last exited with "
            "status 1; stopping everything"
        ) in said
        assert children_of(up.process.pid) == []
    finally:
        socket_dir.unlink(missing_ok=True)


class Viewer(threading.Thread):
    """An SSE reader of a session through Envoy: every event until the stream ends."""

    def __init__(self, base_url: str, session: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{base_url}/relay/v1/sessions/{session}/events"
        self.events: list[bytes] = []
        self.attached = threading.Event()

    def run(self) -> None:
        body = b""
        with httpx.stream("GET", self.url, timeout=60) as response:
            self.attached.set()
            for chunk in response.iter_raw():
                body += chunk
        self.events = events_of(body)

    def end(self) -> dict[str, object]:
        self.join(timeout=EVENT_TIMEOUT_S)
        assert not self.is_alive(), "the viewer's stream never ended"
        assert self.events and b"event: relay.end" in self.events[-1], self.events[-2:]
        return dict(json.loads(self.events[-1].split(b"data: ", 1)[1]))


def start_generation(base_url: str, max_tokens: int, rate: int) -> str:
    """A streamed generation whose client leaves after the headers (on the detached path it
    runs on; an inline one runs while Envoy's connection to the LLM does)."""
    client = httpx.Client(timeout=30)
    response = client.send(
        client.build_request(
            "POST",
            f"{base_url}/v1/chat/completions",
            json=chat(max_tokens=max_tokens, prompt=f"drain {max_tokens}"),
            headers={"x-demo-rate": str(rate)},
        ),
        stream=True,
    )
    assert response.status_code == 200
    session = response.headers["x-relay-session"]

    def read_to_the_end() -> None:  # the inline write path needs its client
        try:
            with contextlib.suppress(httpx.HTTPError):
                for _ in response.iter_raw():
                    pass
        finally:
            client.close()

    threading.Thread(target=read_to_the_end, daemon=True).start()
    return session


@pytest.mark.parametrize("write_path", ["detached", "inline"])
def test_stopping_up_drains_then_ends_live_sessions_cancelled(
    up_factory: type[Up], write_path: str
) -> None:
    up = up_factory(["--write-path", write_path, "--drain-timeout", "3"])
    base = up.url("base URL")
    long, short = start_generation(base, 2000, 10), start_generation(base, 20, 20)
    viewers = [Viewer(base, session) for session in (long, short)]
    for viewer in viewers:
        viewer.start()
        assert viewer.attached.wait(EVENT_TIMEOUT_S)
    started = time.monotonic()
    up.process.send_signal(signal.SIGTERM)
    said = up.expect("stopped")
    assert up.process.wait(timeout=30) == 0
    assert "may finish for up to 3s" in said
    assert time.monotonic() - started < 3 + 10  # the drain, then a prompt stop
    # The short one finished within the drain; the long one was cut at its end.
    assert viewers[1].end()["state"] == "done"
    end = viewers[0].end()
    assert (end["state"], end["reason"]) == ("cancelled", "relay node stopping")


def test_up_leaves_no_work_directory_secret_or_socket_behind(
    up_factory: type[Up], state_env: dict[str, str], tmp_path: Path
) -> None:
    key = tmp_path / "llm.key"
    key.write_text("sk-test-0123456789\n")
    up = up_factory(["--upstream-key-file", str(key)])
    workdir = Path(up.url("logs"))
    argv = (Path("/proc") / str(up.child_pid("relay")) / "cmdline").read_bytes().split(b"\0")
    socket_dir = Path(argv[argv.index(b"--grpc-socket") + 1].decode()).parent
    state_dir = Path(state_env["XDG_RUNTIME_DIR"]) / "stream-relay"
    for secret in ("llm-credential", "envoy.yaml"):
        assert (workdir / secret).stat().st_mode & 0o077 == 0, secret  # the owner's only
    assert socket_dir.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in state_dir.iterdir()] == [f"up-{up.process.pid}.json"]
    assert "x-relay-session" in tagged_stream(up.url("base URL")).headers

    assert up.stop() == 0
    assert not workdir.exists()
    assert not socket_dir.exists()
    assert list(state_dir.iterdir()) == []


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_up_stopped_while_it_starts_leaves_nothing_behind(
    state_env: dict[str, str], tmp_path: Path, stop_signal: int
) -> None:
    """Ctrl-C or SIGTERM before the stack is up (a slow Envoy, a slow upstream) stops what
    started and removes the work and socket directories, as a stop once it is up does."""
    temp = tmp_path / "tmp"  # where `up` makes its directories (tempfile honours TMPDIR)
    temp.mkdir()
    process = subprocess.Popen(
        [*CLI, "up", "--demo", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**state_env, "TMPDIR": str(temp)},
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not list(temp.glob("stream-relay-*/demo-upstream.log")):  # its first child
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)  # polling another process, bounded by the deadline
        process.send_signal(stop_signal)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Ctrl-C stops everything" not in out, "the stack was up before the signal"
    assert process.returncode == 0, out
    assert "Traceback" not in out, out
    assert out.rstrip().endswith("stream-relay: stopped"), out
    assert list(temp.iterdir()) == []
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while pids_mentioning(str(temp)):  # every child ends with `up` (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, pids_mentioning(str(temp))
        time.sleep(0.05)  # polling other processes, bounded by the deadline


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_up_that_cannot_print_its_banner_leaves_nothing_behind(
    state_env: dict[str, str], tmp_path: Path
) -> None:
    """A stdout that fails (a full disk, a closed pipe) once the stack is up: `up` stops the
    stack and removes its directories instead of dying with them left in place."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*CLI, "up", "--demo", "--port", "0", "--admin-port", "0"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**state_env, "TMPDIR": str(temp)},
            timeout=120,
        )
    assert result.returncode != 0, result.stderr
    assert list(temp.iterdir()) == [], result.stderr
    state_dir = Path(state_env["XDG_RUNTIME_DIR"]) / "stream-relay"
    assert not state_dir.exists() or list(state_dir.iterdir()) == []
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while pids_mentioning(str(temp)):
        assert time.monotonic() < deadline, pids_mentioning(str(temp))
        time.sleep(0.05)  # polling other processes, bounded by the deadline
