"""The `stream-relay` command as a user runs it: errors, `up --demo`, clean shutdown."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc.node.config import RELAY_FLAGS, NodeSettings
from extproc.ops.cli import _relay_argv, build_parser, main
from extproc.ops.envoy_render import EnvoyPorts, Upstream, render
from extproc.ops.envoy_security import EnvoySecurity
from extproc.ops.flags import config_argv
from extproc.ops.ports import WantedPort, busy_port_in_log, in_use
from extproc.ops.supervisor import Stack, StartupError, envoy_binary, start_envoy

CLI = [sys.executable, "-m", "extproc"]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`stream-relay ARGS` in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def read_banner(process: subprocess.Popen[str]) -> str:
    """What `up` prints until it is ready (its last line says how to stop it)."""
    assert process.stdout is not None
    banner = []
    for line in process.stdout:
        banner.append(line)
        if "Ctrl-C stops everything" in line:
            break
    return "".join(banner)


def banner_url(banner: str, name: str) -> str:
    found = re.search(rf"^\s+{name}\s+(\S+)", banner, re.M)
    assert found is not None, banner
    return found.group(1)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["up"], "--demo"),
        (["up", "--demo", "--upstream", "http://x"], "--upstream"),
        (["up", "--demo", "--port", "70000"], "--port"),
        (["up", "--demo", "--port", "eighty"], "--port"),
        (["up", "--demo", "--listen-address", "localhost"], "--listen-address"),
        (["up", "--demo", "--listen-address", "10.0.0.300"], "--listen-address"),
        (["up", "--demo", "--demo-rate", "-1"], "--demo-rate"),
        (["up", "--upstream", "ftp://example.org"], "--upstream"),
        (["up", "--upstream", "http://example.org/v1"], "--upstream"),
        (["serve", "--store-max-bytes", "10"], "--store-max-bytes"),
        (["serve", "--session-max-bytes", "999999999999"], "--session-max-bytes"),
        (["serve", "--max-event-bytes", "100"], "--max-event-bytes"),
        (["serve", "--detach-grace", "-1"], "--detach-grace"),
        (["up", "--demo", "--bogus"], "--bogus"),
        (["up", "--demo", "--nodes", "3"], "--store redis://"),
        (["up", "--demo", "--nodes", "0"], "--nodes"),
        (["up", "--demo", "--store", "mysql://db"], "--store"),
        (["serve", "--store", "http://127.0.0.1:6379"], "--store"),
        (["serve", "--store", "redis://127.0.0.1:6379", "--node-lease", "0.1"], "--node-lease"),
        (["frobnicate"], "frobnicate"),
        (["envoy-config", "--snippet", "--cors-origin", "https://a.example"], "--cors-origin"),
    ],
)
def test_bad_flags_print_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], names: str
) -> None:
    status, out, err = run_main(capsys, *args)
    assert status == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert names in lines[0]
    assert out == ""


def test_the_module_entry_point_reports_bad_flags_the_same_way() -> None:
    """`python -m extproc`, how `up` starts its children, exits as `main` returns."""
    result = subprocess.run(
        [*CLI, "up", "--demo", "--port", "eighty"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--port" in result.stderr


def test_up_hands_every_relay_setting_to_its_nodes_under_the_same_name() -> None:
    """`up`'s flags for the relay become `serve` flags that build the same settings."""
    parser = build_parser()
    up = parser.parse_args(
        [
            "up",
            "--demo",
            "--session-ttl",
            "12",
            "--max-readers-per-identity",
            "7",
            "--detach-grace",
            "0.5",
            "--store-max-bytes",
            str(2 << 20),
        ]
    )
    handed = _relay_argv(up)
    assert [part for part in handed if part.startswith("--")] == [
        "--" + name.replace("_", "-") for name in RELAY_FLAGS
    ]
    serve = parser.parse_args(["serve", *handed])
    settings = NodeSettings.from_flags(vars(serve))
    assert settings.limits.session_ttl == 12
    assert settings.readers.max_readers_per_identity == 7
    assert settings.detach.detach_grace == 0.5
    assert settings.limits.store_max_bytes == 2 << 20
    ports = {"grpc_port": settings.grpc_port, "http_port": settings.http_port}  # set by up
    assert settings == dataclasses.replace(NodeSettings.from_flags(vars(up)), **ports)


def _live_pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_up_demo_serves_tagged_streams_and_stops_every_child(stop_signal: int) -> None:
    process = subprocess.Popen(
        [*CLI, "up", "--demo", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        text = read_banner(process)
        urls = dict(
            re.findall(r"^\s+(base URL|Envoy admin|relay metrics|logs)\s+(\S+)", text, re.M)
        )
        assert set(urls) == {"base URL", "Envoy admin", "relay metrics", "logs"}, text
        assert "authentication OFF: anyone who can reach the port can read any session" in text
        response = httpx.post(
            f"{urls['base URL']}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
            timeout=30,
        )
        assert "x-relay-session" in response.headers
        assert response.content.startswith(b"id: ")
        assert httpx.get(urls["relay metrics"], timeout=5).status_code == 200
        assert _live_pids_mentioning(urls["logs"])  # the children are really running

        process.send_signal(stop_signal)
        assert process.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while _live_pids_mentioning(urls["logs"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _live_pids_mentioning(urls["logs"]) == []
        for url in (urls["base URL"], urls["Envoy admin"], urls["relay metrics"]):
            assert _refused(url), url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_up_with_an_upstream_that_is_not_there_warns_and_still_starts() -> None:
    # The stack itself is healthy; `up` says at once that the upstream refuses connections,
    # and requests get the README's JSON error (Envoy's local reply mapping), not plain text.
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        port = refusing.getsockname()[1]
        ports = ["--port", "0", "--admin-port", "0"]
        process = subprocess.Popen(
            [*CLI, "up", "--upstream", f"http://127.0.0.1:{port}", *ports],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            banner = read_banner(process)
            warning = f"WARNING: the upstream 127.0.0.1:{port} does not accept connections"
            assert warning in banner.splitlines()[0], banner
            base = banner_url(banner, "base URL")
            chat = {"model": "m", "messages": [], "stream": True}
            for response in (
                httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=30),  # detached
                httpx.get(f"{base}/v1/models", timeout=30),  # Envoy's own call
            ):
                assert response.status_code == 502, response.text
                assert response.headers["content-type"] == "application/json"
                error = response.json()["error"]
                assert error["code"] == "upstream_unreachable", error
                assert error["message"].startswith("the LLM upstream is unreachable: upstream")
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0


def test_up_on_the_ipv6_wildcard_prints_a_base_url_that_answers() -> None:
    """`--listen-address ::` renders (a bare `::` was no YAML) and its base URL is [::1]:
    Envoy's `::` listener is IPv6 only, so the 127.0.0.1 it printed refused connections."""
    process = subprocess.Popen(
        [*CLI, "up", "--demo", "--listen-address", "::", "--port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = read_banner(process)
        base = banner_url(banner, "base URL")
        assert base.startswith("http://[::1]:"), banner
        assert httpx.get(f"{base}/relay/v1/demo/", timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize(
    "upstream", ["http://127.0.0.1:8000", "https://api.openai.com", "http://ollama.internal:11434"]
)
def test_rendered_envoy_config_validates(tmp_path: Path, upstream: str) -> None:
    ports = EnvoyPorts(
        listen_port=8080, admin_port=9901, relay_grpc_port=50051, relay_http_port=8081
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(render(ports, Upstream.from_url(upstream)))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize(("listen", "upstream"), [("::", "http://[::1]:8000"), ("::1", None)])
def test_rendered_envoy_config_takes_ipv6_addresses(
    tmp_path: Path, listen: str, upstream: str | None
) -> None:
    """`up --listen-address ::` and an IPv6 upstream render YAML Envoy accepts (a bare `::` in
    a flow mapping is no YAML: Envoy refused to start)."""
    ports = EnvoyPorts(
        listen_address=listen,
        listen_port=8080,
        admin_port=9901,
        relay_grpc_port=50051,
        relay_http_port=8081,
    )
    config = tmp_path / "envoy.yaml"
    config.write_text(render(ports, Upstream.from_url(upstream or "http://127.0.0.1:8000")))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_config_command_prints_the_same_config(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_main(capsys, "envoy-config", "--upstream", "http://127.0.0.1:8000")
    assert status == 0
    ports = EnvoyPorts(
        listen_port=8080, admin_port=9901, relay_grpc_port=50051, relay_http_port=8081
    )
    upstream = Upstream.from_url("http://127.0.0.1:8000")
    assert out == render(ports, upstream, security=EnvoySecurity())
    assert os.linesep in out


@pytest.mark.parametrize(
    ("config", "args", "names"),
    [
        ("bogus = 1\n", [], "unknown setting 'bogus'"),
        ("store = [\n", [], "--config"),  # not TOML
        ("nodes = 2\n", [], "--store redis://"),  # the file's setting is applied
        ('nodes = 3\nstore = "redis://127.0.0.1:1/0"\n', ["--store", "memory"], "--store redis"),
        ('node-lease = 0.1\nstore = "redis://127.0.0.1:1/0"\n', [], "--node-lease"),
    ],
)
def test_config_files_hold_the_same_settings_as_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config: str, args: list[str], names: str
) -> None:
    """`--config FILE` (TOML, keys are the long flag names): bad files fail like bad flags,
    and a flag on the command line wins over the file."""
    path = tmp_path / "relay.toml"
    path.write_text(config)
    status, _, err = run_main(capsys, "up", "--demo", "--config", str(path), *args)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], err


def test_a_list_flag_on_the_command_line_wins_over_the_config_file(tmp_path: Path) -> None:
    """`--cors-origin` extends: without care the file's origins and the command line's were
    both granted, though the command line wins for every other flag."""
    path = tmp_path / "relay.toml"
    path.write_text('cors-origin = ["https://file.example"]\nport = 1234\n')
    parser = build_parser()
    argv = ["up", "--demo", "--config", str(path), "--cors-origin", "https://flag.example"]
    args = parser.parse_args(config_argv(parser, argv))
    assert args.cors_origin == ["https://flag.example"]
    assert args.port == 1234
    args = parser.parse_args(config_argv(parser, ["up", "--demo", "--config", str(path)]))
    assert args.cors_origin == ["https://file.example"]


def test_the_command_line_wins_over_the_file_across_exclusive_flags(tmp_path: Path) -> None:
    """`upstream = ...` in the file and `--demo` on the command line: the command line's
    choice, not "argument --demo: not allowed with argument --upstream"."""
    path = tmp_path / "relay.toml"
    path.write_text('upstream = "http://127.0.0.1:9000"\n')
    parser = build_parser()
    args = parser.parse_args(config_argv(parser, ["up", "--config", str(path), "--demo"]))
    assert (args.demo, args.upstream) == (True, None)


@pytest.mark.parametrize("command", ["up", "serve"])
def test_a_config_file_is_never_silently_left_unread(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    """`--config=FILE` is `--config FILE`; an abbreviation argparse would accept (`--conf`) is
    refused. Both were accepted and the file never read."""
    path = tmp_path / "relay.toml"
    path.write_text("bogus = 1\n")
    status, _, err = run_main(capsys, command, f"--config={path}")
    assert status == 2, err
    assert "unknown setting 'bogus'" in err
    demo = ["--demo"] if command == "up" else []
    status, _, err = run_main(capsys, command, *demo, "--conf", str(path))
    assert status == 2, err
    assert err.count("\n") == 1 and "--config" in err


@contextlib.contextmanager
def held_port(*, reuse_port: bool = False) -> Iterator[int]:
    """A loopback port with a listener on it (with SO_REUSEPORT, as another Envoy holds it)."""
    with socket.socket() as holder:
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("reuse_port", [False, True])
@pytest.mark.parametrize("flag", ["--port", "--admin-port"])
def test_up_refuses_a_busy_port_naming_it_and_its_flag(
    capsys: pytest.CaptureFixture[str], flag: str, reuse_port: bool
) -> None:
    with held_port(reuse_port=reuse_port) as busy:
        ports = {"--port": "0", "--admin-port": "0", flag: str(busy)}
        status, out, err = run_main(capsys, "up", "--demo", *(x for p in ports.items() for x in p))
    assert status == 2, (out, err)
    assert out == ""
    assert err == f"stream-relay: error: port {busy} ({flag}) is in use on 127.0.0.1\n"


def test_envoy_never_shares_a_port_and_its_bind_error_names_the_flag(tmp_path: Path) -> None:
    """A port taken between up's check and Envoy's bind: Envoy (enable_reuse_port: false)
    fails instead of taking a share of the connections, and up reads its error back."""
    stack = Stack(tmp_path)
    try:
        with held_port(reuse_port=True) as busy:
            config = tmp_path / "envoy.yaml"
            config.write_text(
                render(
                    EnvoyPorts(
                        listen_port=busy, admin_port=0, relay_grpc_port=1, relay_http_port=2
                    ),
                    Upstream.from_url("http://127.0.0.1:9"),
                )
            )
            with pytest.raises(StartupError) as failed:
                start_envoy(stack, config)
        wanted = [WantedPort("--port", "127.0.0.1", busy), WantedPort("--admin-port", "x", 0)]
        busy_error = busy_port_in_log(str(failed.value), wanted)
        assert busy_error is not None, failed.value
        assert str(busy_error) == f"port {busy} (--port) is in use on 127.0.0.1"
    finally:
        stack.stop()


def test_a_port_in_time_wait_only_is_free() -> None:
    """A port whose last listener (an Envoy: SO_REUSEADDR) is gone, with a connection of it
    still in TIME_WAIT: Envoy binds it again, so the check lets it through."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    assert not in_use("127.0.0.1", port)
    with held_port() as busy:
        assert in_use("127.0.0.1", busy)
        assert in_use("0.0.0.0", busy)
