"""The `stream-relay` command: `up` (the whole stack), `serve` (relay node only),
`demo-upstream`, `envoy-config` (print the rendered Envoy config), `status` (a summary of a
running relay node, from its metrics) and `bench` (the benchmark harness, a package of its own
under bench/).

Invalid flags or configuration print one line naming the problem and exit with status 2;
`main(argv)` returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from extproc.demo import upstream as demo_upstream
from extproc.errors import ConfigError
from extproc.node.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_NODE_WRITE_PATH,
    RELAY_FLAGS,
    NodeSettings,
)
from extproc.ops import flags, stack_state
from extproc.ops.envoy_render import EnvoyPorts, Upstream, render, snippet
from extproc.ops.envoy_security import (
    EnvoySecurity,
    JwtSettings,
    TlsFiles,
    parse_api_keys,
    read_upstream_key,
)
from extproc.ops.ports import WantedPort, busy_port_in_log, refuse_busy
from extproc.ops.stack_state import StackState
from extproc.ops.status import DEFAULT_INTERVAL_S, DEFAULT_METRICS_URL
from extproc.store import MEMORY, RedisSettings
from extproc.vocabulary import WritePath

if TYPE_CHECKING:
    from extproc.ops.supervisor import StackOptions

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the problem: no usage dump for a typo in one flag.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _relay_argv(args: argparse.Namespace) -> list[str]:
    """The `up` flags that configure the relay node, passed on to its `serve` processes."""
    values = vars(args)
    return [part for name in RELAY_FLAGS for part in (_flag(name), str(values[name]))]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _security(args: argparse.Namespace) -> EnvoySecurity:
    """The `up` flags for Envoy's side of security, with every file read and checked now."""
    if (args.jwt_issuer or args.jwt_audience) and args.jwks is None:
        raise ConfigError("--jwt-issuer and --jwt-audience need --jwks")
    if args.upstream_key_file is not None:
        read_upstream_key(args.upstream_key_file)  # the supervisor reads it again; fail fast
    return EnvoySecurity(
        api_keys=parse_api_keys(args.api_keys) if args.api_keys is not None else (),
        jwt=(
            JwtSettings.load(args.jwks, args.jwt_issuer, args.jwt_audience, args.jwt_max_lifetime)
            if args.jwks is not None
            else None
        ),
        tls=TlsFiles.load(*args.tls) if args.tls is not None else None,
        max_connections=args.max_connections,
        max_request_headers_kb=args.max_request_headers_kb,
        request_headers_timeout_s=args.request_headers_timeout,
        max_request_bytes=args.max_request_bytes,
        cors_origins=tuple(dict.fromkeys(args.cors_origin)),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stream-relay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = commands.add_parser("up", help="run Envoy, the relay node and an upstream")
    source = up.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="run the built-in demo LLM upstream")
    source.add_argument(
        "--upstream", metavar="URL", help="an OpenAI-compatible server, e.g. http://127.0.0.1:11434"
    )
    up.add_argument("--port", type=flags.port, default=8080, help="public listener (default 8080)")
    up.add_argument(
        "--admin-port",
        type=flags.port,
        default=9901,
        help="Envoy admin on 127.0.0.1 (default 9901)",
    )
    up.add_argument(
        "--listen-address",
        type=flags.ip_address,
        default="127.0.0.1",
        help="IP address of the public listener (default 127.0.0.1; 0.0.0.0: all IPv4, "
        ":: all IPv6)",
    )
    up.add_argument(
        "--demo-rate",
        type=flags.positive(float),
        default=50.0,
        help="demo upstream events per second per stream (default 50)",
    )
    flags.add_write_path_flag(
        up,
        default=WritePath.DETACHED,
        what="generation calls: detached (survive disconnects) or inline",
    )
    up.add_argument(
        "--nodes",
        type=flags.positive(int),
        default=1,
        help="relay node processes behind Envoy (more than 1 needs --store redis://...)",
    )
    up.add_argument("--config", metavar="FILE", help="TOML file of these flags (flags win)")
    flags.add_store_flags(up)
    flags.add_relay_limit_flags(up)
    flags.add_security_flags(up)

    serve = commands.add_parser("serve", help="run only the relay node (bring your own Envoy)")
    serve.add_argument(
        "--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})"
    )
    serve.add_argument(
        "--grpc-port",
        type=flags.port,
        default=DEFAULT_GRPC_PORT,
        help="ext_proc gRPC port (default 50051; 0 = any free port)",
    )
    serve.add_argument(
        "--http-port",
        type=flags.port,
        default=DEFAULT_HTTP_PORT,
        help="HTTP front: resumes, /metrics, /healthz (default 8081)",
    )
    serve.add_argument("--ports-file", type=Path, help="write the bound ports here as JSON")
    serve.add_argument(
        "--grpc-socket",
        default="",
        metavar="PATH",
        help="also serve ext_proc and relay.v1 gRPC on this Unix socket",
    )
    serve.add_argument(
        "--http-socket", default="", metavar="PATH", help="also serve HTTP on this Unix socket"
    )
    serve.add_argument("--config", metavar="FILE", help="TOML file of these flags (flags win)")
    serve.add_argument(
        "--egress-url",
        default="",
        metavar="URL",
        help="Envoy's egress listener for detached generations, "
        "e.g. http://127.0.0.1:10001 (default: detached path off)",
    )
    flags.add_write_path_flag(
        serve,
        default=DEFAULT_NODE_WRITE_PATH,
        what="for POSTs to generation paths whose Envoy route sends no x-relay-write-path "
        "(Envoy Gateway cannot): inline, or detached (needs --egress-url and the re-route routes)",
    )
    flags.add_store_flags(serve)
    flags.add_relay_limit_flags(serve)

    commands.add_parser("demo-upstream", help="run only the demo LLM upstream", add_help=False)

    config = commands.add_parser("envoy-config", help="print the Envoy config for your ports")
    config.add_argument(
        "--port", type=flags.port, default=8080, help="public listener (default 8080)"
    )
    config.add_argument(
        "--admin-port",
        type=flags.port,
        default=9901,
        help="Envoy admin on 127.0.0.1 (default 9901)",
    )
    config.add_argument(
        "--relay-grpc-port",
        type=flags.port,
        default=DEFAULT_GRPC_PORT,
        help=f"the relay nodes' ext_proc gRPC port on 127.0.0.1 (default {DEFAULT_GRPC_PORT})",
    )
    config.add_argument(
        "--relay-http-port",
        type=flags.port,
        default=DEFAULT_HTTP_PORT,
        help=f"the relay nodes' HTTP port on 127.0.0.1 (default {DEFAULT_HTTP_PORT})",
    )
    config.add_argument(
        "--egress-port",
        type=flags.port,
        default=10001,
        help="the loopback listener the relay's --egress-url names (default 10001)",
    )
    flags.add_write_path_flag(
        config, default=WritePath.DETACHED, what="the generations route's write path"
    )
    config.add_argument("--upstream", metavar="URL", help="the LLM (required without --snippet)")
    config.add_argument(
        "--snippet",
        action="store_true",
        help="print only what to merge into an Envoy you already run, commented field by field",
    )
    flags.add_cors_flag(config)

    status = commands.add_parser("status", help="summarize a running relay node from its metrics")
    status.add_argument(
        "--metrics-url",
        metavar="URL",
        help="a relay node's /metrics (default: that of the stack `stream-relay up` runs "
        f"for this user, else {DEFAULT_METRICS_URL})",
    )
    status.add_argument(
        "--interval",
        type=flags.positive(float),
        default=DEFAULT_INTERVAL_S,
        help=f"seconds between the two scrapes that give rates (default {DEFAULT_INTERVAL_S:g})",
    )
    _add_bench_parser(commands)
    return parser


BENCH_MISSING = (
    "stream-relay bench needs the benchmark harness, a package of its own: "
    "pip install ./bench (from a checkout of stream-relay)"
)


def _add_bench_parser(commands: argparse._SubParsersAction[_Parser]) -> None:
    """`bench` comes from the stream_relay_bench package when it is installed; otherwise the
    command exists and says how to get it."""
    try:
        from stream_relay_bench.command import add_parser
    except ImportError:
        bench = commands.add_parser("bench", help="benchmarks (pip install ./bench)")
        bench.add_argument("rest", nargs=argparse.REMAINDER)
        return
    add_parser(commands)


def _store_label(url: str) -> str:
    if url == MEMORY:
        return "memory (this node only)"
    return f"{RedisSettings(url=url).display_url} (shared)"


def _up(args: argparse.Namespace) -> int:
    from extproc.ops.supervision import stop_signals_held
    from extproc.ops.supervisor import StackOptions

    if args.upstream is not None:
        problem = Upstream.from_url(args.upstream).unreachable()  # fail fast, warn early
        if problem is not None:
            print(f"stream-relay: WARNING: {problem}", file=sys.stderr, flush=True)
    if args.store != MEMORY:
        RedisSettings(url=args.store, node_lease=args.node_lease)
    elif args.nodes > 1:
        raise ConfigError("--nodes above 1 needs a shared store: --store redis://host:port/db")
    security = _security(args)
    wanted = [
        WantedPort("--port", args.listen_address, args.port),
        WantedPort("--admin-port", "127.0.0.1", args.admin_port),
    ]
    refuse_busy(wanted)
    options = StackOptions(
        port=args.port,
        admin_port=args.admin_port,
        listen_address=args.listen_address,
        upstream=args.upstream,
        demo_rate=args.demo_rate,
        write_path=args.write_path,
        relay_args=_relay_argv(args),
        nodes=args.nodes,
        security=security,
        upstream_key_file=args.upstream_key_file,
    )
    with stop_signals_held():  # from here on a stop signal stops what started, at any point
        return _run_stack(args, options, security, wanted)


def _run_stack(
    args: argparse.Namespace,
    options: StackOptions,
    security: EnvoySecurity,
    wanted: list[WantedPort],
) -> int:
    """Start the stack and supervise it until it stops; the exit status of `up`."""
    from extproc.ops.supervision import Supervisor
    from extproc.ops.supervisor import StartupError, StopRequested, start_stack

    try:
        stack = start_stack(options)
    except StopRequested:  # what started is stopped and its directories removed
        print("stream-relay: stopped", flush=True)
        return 0
    except StartupError as exc:
        busy = busy_port_in_log(str(exc), wanted)  # taken between the check and Envoy's bind
        if busy is not None:
            raise busy from None
        print(f"stream-relay: {exc}", file=sys.stderr)
        return 1

    def publish() -> None:
        stack_state.publish(
            StackState(
                pid=os.getpid(),
                base_url=stack.base_url,
                admin_url=stack.admin_url,
                metrics_urls=tuple(f"{url}/metrics" for url in stack.relay_http_urls),
            )
        )

    try:  # until the supervisor runs (it stops the stack as it ends), stop it here
        print(
            f"stream-relay is up\n"
            f"  base URL       {stack.base_url}        (OpenAI-compatible: {stack.base_url}/v1)\n"
            f"  Envoy admin    {stack.admin_url}\n"
            + "".join(f"  relay metrics  {url}/metrics\n" for url in stack.relay_http_urls)
            + f"  session store  {_store_label(args.store)}\n"
            f"  demo page      {stack.base_url}/relay/v1/demo/\n"
            f"  upstream       {stack.upstream_url}{'  (demo)' if args.demo else ''}\n"
            f"  logs           {stack.workdir}  (removed when the stack stops)\n"
            f"{auth_line(security)}\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )
        publish()
    except BaseException:  # e.g. a stdout that cannot be written: leave nothing behind
        stack.stop()
        stack_state.withdraw(os.getpid())
        raise
    supervisor = Supervisor(
        stack,
        drain_timeout=args.drain_timeout,
        print_fn=lambda line: print(line, flush=True),
        on_change=publish,
    )
    try:
        return supervisor.run()
    finally:
        stack_state.withdraw(os.getpid())


def auth_line(security: EnvoySecurity) -> str:
    if not security.authenticated:
        return (
            "  authentication OFF: anyone who can reach the port can read any session "
            "(see --api-keys, --jwks)"
        )
    kinds = [k for k, on in (("API keys", security.api_keys), ("JWT", security.jwt)) if on]
    line = f"  authentication {' or '.join(kinds)}; sessions belong to who created them"
    if security.jwt is not None and security.jwt.unscoped:
        line += (
            "\n  WARNING: JWTs are accepted from ANY issuer for ANY audience that the JWKS "
            "signs: set --jwt-issuer and --jwt-audience"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo-upstream"]:
        return demo_upstream.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(flags.config_argv(parser, argv))
        if getattr(args, "config", None) is not None:  # an abbreviation: the file is unread
            parser.error("--config: spell the flag out (--config FILE)")
    except SystemExit as exit:  # argparse's way out: a usage error (2), or --help (0)
        return exit.code if isinstance(exit.code, int) else USAGE_ERROR
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.command == "up":
            return _up(args)
        if args.command == "serve":
            from extproc.node.process import run as run_node

            settings = NodeSettings.from_flags(vars(args))
            if settings.write_path is WritePath.DETACHED and not settings.detach.egress_url:
                # `up` always gives its nodes one; a node started by hand must name it.
                raise ConfigError("--write-path detached needs --egress-url (Envoy's egress)")
            run_node(settings, args.ports_file)
            return 0
        if args.command == "bench":
            try:
                from stream_relay_bench.command import main as bench
            except ImportError:
                print(f"stream-relay: error: {BENCH_MISSING}", file=sys.stderr)
                return USAGE_ERROR
            return bench(args)
        if args.command == "status":
            from extproc.ops.status import run

            return run(
                args.metrics_url,
                args.interval,
                err=lambda line: print(line, file=sys.stderr),
            )
        ports = EnvoyPorts(
            listen_port=args.port,
            admin_port=args.admin_port,
            relay_grpc_port=args.relay_grpc_port,
            relay_http_port=args.relay_http_port,
            egress_port=args.egress_port,
        )
        upstream = Upstream.from_url(args.upstream) if args.upstream else None
        # Envoy's limits and identity-header stripping at their defaults; no authentication.
        security = EnvoySecurity(cors_origins=tuple(dict.fromkeys(args.cors_origin)))
        if args.snippet:
            if args.cors_origin:  # the snippet has no CORS piece: it would be ignored
                raise ConfigError(
                    "--cors-origin is not part of --snippet: give your own Envoy its CORS "
                    "policy (README: Browsers on other origins)"
                )
            sys.stdout.write(
                snippet(ports, upstream, write_path=args.write_path, security=security)
            )
            return 0
        if upstream is None:
            raise ConfigError("envoy-config needs --upstream URL (or --snippet)")
        sys.stdout.write(render(ports, upstream, write_path=args.write_path, security=security))
        return 0
    except ConfigError as exc:
        print(f"stream-relay: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
