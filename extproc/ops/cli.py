"""The `stream-relay` command: `up` (the whole stack), `serve` (relay node only),
`demo-upstream`, `envoy-config` (print the rendered Envoy config), `status` (a summary of a
running relay node, from its metrics) and `bench` (extproc/bench/).

Invalid flags or configuration print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

from extproc.access.grants import (
    DEFAULT_MAX_READERS_PER_IDENTITY,
    DEFAULT_MAX_SESSIONS_PER_IDENTITY,
    AccessLimits,
)
from extproc.demo import upstream as demo_upstream
from extproc.detached.generations import (
    DEFAULT_GRACE_S,
    DEFAULT_MAX_READERS_PER_SESSION,
    DEFAULT_MAX_REQUEST_BYTES,
    DetachSettings,
)
from extproc.errors import ConfigError
from extproc.node.config import NodeSettings
from extproc.ops.envoy_render import WRITE_PATHS, EnvoyPorts, Upstream, render
from extproc.ops.envoy_security import (
    DEFAULT_JWT_MAX_LIFETIME_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_HEADERS_KB,
    DEFAULT_REQUEST_HEADERS_TIMEOUT_S,
    EnvoySecurity,
    JwtSettings,
    TlsFiles,
    parse_api_keys,
    read_upstream_key,
)
from extproc.ops.status import DEFAULT_INTERVAL_S, DEFAULT_METRICS_URL
from extproc.session.framing import DEFAULT_MAX_FRAME_BYTES
from extproc.store import DEFAULT_LEASE_S, RedisSettings, StoreLimits
from extproc.store.memory import DEFAULT_ENDED_TTL_S, DEFAULT_MAX_BYTES, DEFAULT_MAX_LOG_BYTES

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the problem: no usage dump for a typo in one flag.
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0..65535: {value}")
    return value


def _positive(kind: type[int] | type[float]) -> argparse._ActionType:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    return parse


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("session log")
    group.add_argument(
        "--store",
        default="memory",
        metavar="URL",
        help="where session logs live: memory (this node only; default) or "
        "redis://host:port/db (Redis or Valkey Streams, shared by every node using it)",
    )
    group.add_argument(
        "--node-lease",
        type=_positive(float),
        default=DEFAULT_LEASE_S,
        help="with Redis: seconds after which a silent node's open sessions end failed "
        f"(default {DEFAULT_LEASE_S:g})",
    )
    group.add_argument(
        "--store-max-bytes",
        type=_positive(int),
        default=DEFAULT_MAX_BYTES,
        help="bytes kept for all sessions together (LRU beyond; default 256 MiB)",
    )
    group.add_argument(
        "--session-max-bytes",
        type=_positive(int),
        default=DEFAULT_MAX_LOG_BYTES,
        help="bytes kept for one session; beyond it the session fails (default 16 MiB)",
    )
    group.add_argument(
        "--session-ttl",
        type=_positive(float),
        default=DEFAULT_ENDED_TTL_S,
        help="seconds a finished session stays resumable (default 900)",
    )
    group.add_argument(
        "--max-event-bytes",
        type=_positive(int),
        default=DEFAULT_MAX_FRAME_BYTES,
        help="largest upstream event framed (default 1 MiB)",
    )


def _add_detach_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detached generations")
    group.add_argument(
        "--detach-grace",
        type=_non_negative,
        default=DEFAULT_GRACE_S,
        help="seconds a generation outlives its last reader (default 30)",
    )
    group.add_argument(
        "--max-readers-per-session",
        type=_positive(int),
        default=DEFAULT_MAX_READERS_PER_SESSION,
        help="readers on one session at once (default 1000)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=_positive(int),
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest generation request body (default 8 MiB)",
    )
    group.add_argument(
        "--max-sessions-per-identity",
        type=_positive(int),
        default=DEFAULT_MAX_SESSIONS_PER_IDENTITY,
        help="open sessions one authenticated caller may have per relay node "
        f"(default {DEFAULT_MAX_SESSIONS_PER_IDENTITY})",
    )
    group.add_argument(
        "--max-readers-per-identity",
        type=_positive(int),
        default=DEFAULT_MAX_READERS_PER_IDENTITY,
        help="readers one authenticated caller may attach per relay node "
        f"(default {DEFAULT_MAX_READERS_PER_IDENTITY})",
    )


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _relay_argv(args: argparse.Namespace) -> list[str]:
    """The `up` flags that configure the relay node, passed on to its `serve` process."""
    flags = {
        "--store": args.store,
        "--node-lease": args.node_lease,
        "--store-max-bytes": args.store_max_bytes,
        "--session-max-bytes": args.session_max_bytes,
        "--session-ttl": args.session_ttl,
        "--max-event-bytes": args.max_event_bytes,
        "--detach-grace": args.detach_grace,
        "--max-readers-per-session": args.max_readers_per_session,
        "--max-request-bytes": args.max_request_bytes,
        "--max-sessions-per-identity": args.max_sessions_per_identity,
        "--max-readers-per-identity": args.max_readers_per_identity,
    }
    return [part for flag, value in flags.items() for part in (flag, str(value))]


def _node_settings(args: argparse.Namespace) -> NodeSettings:
    limits = StoreLimits(
        max_bytes=args.store_max_bytes,
        max_log_bytes=args.session_max_bytes,
        ended_ttl_s=args.session_ttl,
    )
    return NodeSettings(
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        max_frame_bytes=args.max_event_bytes,
        store=limits,
        store_url=args.store,
        lease_s=args.node_lease,
        detach=DetachSettings(
            egress_url=args.egress_url,
            grace_s=args.detach_grace,
            max_request_bytes=args.max_request_bytes,
            max_readers_per_session=args.max_readers_per_session,
        ),
        access=AccessLimits(
            max_sessions_per_identity=args.max_sessions_per_identity,
            max_readers_per_identity=args.max_readers_per_identity,
        ),
    )


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("authentication, TLS and Envoy limits (SECURITY.md)")
    group.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="require an API key: one 'client-name key' per line "
        "(Authorization: Bearer <key> or x-api-key)",
    )
    group.add_argument(
        "--jwks", type=Path, metavar="FILE", help="accept JWTs signed by a key in this JWKS file"
    )
    group.add_argument("--jwt-issuer", default="", help="required JWT iss (with --jwks)")
    group.add_argument("--jwt-audience", default="", help="required JWT aud (with --jwks)")
    group.add_argument(
        "--jwt-max-lifetime",
        type=_positive(int),
        default=DEFAULT_JWT_MAX_LIFETIME_S,
        metavar="SECONDS",
        help="refuse JWTs valid for longer than this from now; `exp` is always required "
        f"(default {DEFAULT_JWT_MAX_LIFETIME_S})",
    )
    group.add_argument(
        "--upstream-key-file",
        type=Path,
        metavar="FILE",
        help="the LLM API key; Envoy sends it upstream as Authorization: Bearer <key>",
    )
    group.add_argument(
        "--tls",
        nargs=2,
        type=Path,
        metavar=("CERT", "KEY"),
        help="serve the public listener over TLS (PEM files; ALPN h2, http/1.1)",
    )
    group.add_argument(
        "--max-connections",
        type=_positive(int),
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"downstream connections Envoy accepts at once (default {DEFAULT_MAX_CONNECTIONS})",
    )
    group.add_argument(
        "--max-request-headers-kb",
        type=_positive(int),
        default=DEFAULT_MAX_REQUEST_HEADERS_KB,
        help=f"request headers larger than this get 431 "
        f"(default {DEFAULT_MAX_REQUEST_HEADERS_KB} KiB)",
    )
    group.add_argument(
        "--request-headers-timeout",
        type=_positive(float),
        default=DEFAULT_REQUEST_HEADERS_TIMEOUT_S,
        help=f"seconds a client has to send its request headers "
        f"(default {DEFAULT_REQUEST_HEADERS_TIMEOUT_S:g})",
    )


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
    up.add_argument("--port", type=_port, default=8080, help="public listener (default 8080)")
    up.add_argument(
        "--admin-port", type=_port, default=9901, help="Envoy admin on 127.0.0.1 (default 9901)"
    )
    up.add_argument(
        "--listen-address",
        default="127.0.0.1",
        help="address of the public listener (default 127.0.0.1)",
    )
    up.add_argument(
        "--demo-rate",
        type=_positive(float),
        default=50.0,
        help="demo upstream events per second per stream (default 50)",
    )
    up.add_argument(
        "--write-path",
        choices=WRITE_PATHS,
        default="detached",
        help="generation calls: detached (survive disconnects; default) or inline",
    )
    up.add_argument(
        "--nodes",
        type=_positive(int),
        default=1,
        help="relay node processes behind Envoy (more than 1 needs --store redis://...)",
    )
    up.add_argument("--config", metavar="FILE", help="TOML file of these flags (flags win)")
    _add_store_flags(up)
    _add_detach_flags(up)
    _add_security_flags(up)

    serve = commands.add_parser("serve", help="run only the relay node (bring your own Envoy)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument(
        "--grpc-port",
        type=_port,
        default=50051,
        help="ext_proc gRPC port (default 50051; 0 = any free port)",
    )
    serve.add_argument(
        "--http-port",
        type=_port,
        default=8081,
        help="HTTP front: resumes, /metrics, /healthz (default 8081)",
    )
    serve.add_argument("--ports-file", type=Path, help="write the bound ports here as JSON")
    serve.add_argument("--config", metavar="FILE", help="TOML file of these flags (flags win)")
    serve.add_argument(
        "--egress-url",
        default="",
        metavar="URL",
        help="Envoy's egress listener for detached generations, "
        "e.g. http://127.0.0.1:10001 (default: detached path off)",
    )
    _add_store_flags(serve)
    _add_detach_flags(serve)

    commands.add_parser("demo-upstream", help="run only the demo LLM upstream", add_help=False)

    config = commands.add_parser("envoy-config", help="print the Envoy config for your ports")
    config.add_argument("--port", type=_port, default=8080)
    config.add_argument("--admin-port", type=_port, default=9901)
    config.add_argument("--relay-grpc-port", type=_port, default=50051)
    config.add_argument("--relay-http-port", type=_port, default=8081)
    config.add_argument("--egress-port", type=_port, default=10001)
    config.add_argument("--write-path", choices=WRITE_PATHS, default="detached")
    config.add_argument("--upstream", metavar="URL", required=True)

    status = commands.add_parser("status", help="summarize a running relay node from its metrics")
    status.add_argument(
        "--metrics-url",
        default=DEFAULT_METRICS_URL,
        metavar="URL",
        help=f"the relay node's /metrics (default {DEFAULT_METRICS_URL})",
    )
    status.add_argument(
        "--interval",
        type=_positive(float),
        default=DEFAULT_INTERVAL_S,
        help=f"seconds between the two scrapes that give rates (default {DEFAULT_INTERVAL_S:g})",
    )
    from stream_relay_bench.command import add_parser as add_bench_parser

    add_bench_parser(commands)
    return parser


def _store_label(url: str) -> str:
    if url == "memory":
        return "memory (this node only)"
    return f"{RedisSettings(url=url).display_url} (shared)"


def _up(args: argparse.Namespace) -> int:
    from extproc.ops.supervisor import StackOptions, StartupError, run_until_signalled, start_stack

    if args.upstream is not None:
        Upstream.from_url(args.upstream)  # fail fast, before starting anything
    if args.store != "memory":
        RedisSettings(url=args.store, lease_s=args.node_lease)
    elif args.nodes > 1:
        raise ConfigError("--nodes above 1 needs a shared store: --store redis://host:port/db")
    security = _security(args)
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
    try:
        stack = start_stack(options)
    except StartupError as exc:
        print(f"stream-relay: {exc}", file=sys.stderr)
        return 1
    print(
        f"stream-relay is up\n"
        f"  base URL       {stack.base_url}        (OpenAI-compatible: {stack.base_url}/v1)\n"
        f"  Envoy admin    {stack.admin_url}\n"
        + "".join(f"  relay metrics  {url}/metrics\n" for url in stack.relay_http_urls)
        + f"  session store  {_store_label(args.store)}\n"
        f"  demo page      {stack.base_url}/relay/v1/demo/\n"
        f"  upstream       {stack.upstream_url}{'  (demo)' if args.demo else ''}\n"
        f"  logs           {stack.workdir}\n"
        f"{auth_line(security)}\n"
        f"Ctrl-C stops everything.",
        flush=True,
    )
    return run_until_signalled(stack, print_fn=lambda line: print(line, flush=True))


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


CONFIG_COMMANDS = ("up", "serve")


def _config_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`up`/`serve --config FILE`: the TOML file's settings become flags placed before the
    command line's own, so a flag given on the command line wins. Keys are the long flag names
    (`store = "redis://..."`, `max-readers-per-session = 50`, `demo = true`, `tls = [c, k]`)."""
    if argv[:1] not in ([c] for c in CONFIG_COMMANDS) or "--config" not in argv:
        return argv
    at = argv.index("--config")
    if at + 1 >= len(argv):
        parser.error("argument --config: expected a file")
    path = Path(argv[at + 1])
    try:
        settings = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    known = _long_flags(parser, argv[0])
    flags: list[str] = []
    for key, value in settings.items():
        flag = f"--{key}"
        if flag not in known or key == "config":
            parser.error(f"--config {path}: unknown setting {key!r}")
        if value is True:
            flags.append(flag)
        elif value is False:
            continue
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif isinstance(value, str | int | float):
            flags += [flag, str(value)]
        else:
            parser.error(f"--config {path}: {key} must be a string, number, boolean or list")
    rest = argv[1:at] + argv[at + 2 :]
    return [argv[0], *flags, *rest]


def _long_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    return {s for action in sub._actions for s in action.option_strings if s.startswith("--")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo-upstream"]:
        return demo_upstream.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(_config_argv(parser, argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.command == "up":
            return _up(args)
        if args.command == "serve":
            from extproc.node.process import serve

            asyncio.run(serve(_node_settings(args), args.ports_file))
            return 0
        if args.command == "bench":
            from stream_relay_bench.command import main as bench

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
        upstream = Upstream.from_url(args.upstream)
        # Envoy's limits and identity-header stripping at their defaults; no authentication.
        security = EnvoySecurity()
        sys.stdout.write(render(ports, upstream, write_path=args.write_path, security=security))
        return 0
    except ConfigError as exc:
        print(f"stream-relay: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
