"""The command line's flags, shared by `up` and `serve`: their types, their groups and the TOML
file (`--config FILE`) that holds the same settings. Each flag's name is its setting's name
(node/config.py), so a flag, a TOML key and the code read the same word.
"""

from __future__ import annotations

import argparse
import ipaddress
import tomllib
from pathlib import Path

from extproc.access.quota import DEFAULT_MAX_SESSIONS_PER_IDENTITY
from extproc.detached.generations import DEFAULT_DETACH_GRACE_S, DEFAULT_MAX_REQUEST_BYTES
from extproc.errors import ConfigError
from extproc.node.config import DEFAULT_DRAIN_TIMEOUT_S
from extproc.ops.envoy_cors import parse_origin
from extproc.ops.envoy_security import (
    DEFAULT_JWT_MAX_LIFETIME_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_HEADERS_KB,
    DEFAULT_REQUEST_HEADERS_TIMEOUT_S,
)
from extproc.readers.registry import (
    DEFAULT_MAX_READERS_PER_IDENTITY,
    DEFAULT_MAX_READERS_PER_SESSION,
)
from extproc.session.framing import DEFAULT_MAX_FRAME_BYTES
from extproc.store import DEFAULT_LEASE_S
from extproc.store.memory import (
    DEFAULT_SESSION_MAX_BYTES,
    DEFAULT_SESSION_TTL_S,
    DEFAULT_STORE_MAX_BYTES,
)
from extproc.vocabulary import WritePath


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0..65535: {value}")
    return value


def ip_address(text: str) -> str:
    """An IP address literal: Envoy's listener addresses take no host names."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    return text


def positive(kind: type[int] | type[float]) -> argparse._ActionType:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    return parse


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def add_write_path_flag(parser: argparse.ArgumentParser, *, default: WritePath, what: str) -> None:
    """`--write-path`: `up` sets it on Envoy's generation route and on its nodes; `serve` uses
    it for generation POSTs whose route names no write path (e.g. under Envoy Gateway)."""
    parser.add_argument(
        "--write-path",
        type=WritePath,
        choices=list(WritePath),
        default=default,
        help=f"{what} (default {default})",
    )


def origin(text: str) -> str:
    try:
        return parse_origin(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cors_flag(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--cors-origin",
        type=origin,
        action="extend",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="let browser pages on this origin (e.g. https://app.example.com) stream, resume "
        "and read sessions; repeatable (TOML: a list). Default: no cross-origin grant",
    )


def add_store_flags(parser: argparse.ArgumentParser) -> None:
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
        type=positive(float),
        default=DEFAULT_LEASE_S,
        help="with Redis: seconds after which a silent node's open sessions end failed "
        f"(default {DEFAULT_LEASE_S:g})",
    )
    group.add_argument(
        "--store-max-bytes",
        type=positive(int),
        default=DEFAULT_STORE_MAX_BYTES,
        help="bytes kept for all sessions together (LRU beyond; default 256 MiB)",
    )
    group.add_argument(
        "--session-max-bytes",
        type=positive(int),
        default=DEFAULT_SESSION_MAX_BYTES,
        help="bytes kept for one session; beyond it the session fails (default 16 MiB)",
    )
    group.add_argument(
        "--session-ttl",
        type=positive(float),
        default=DEFAULT_SESSION_TTL_S,
        help="seconds a finished session stays resumable (default 900)",
    )
    group.add_argument(
        "--max-event-bytes",
        type=positive(int),
        default=DEFAULT_MAX_FRAME_BYTES,
        help="largest upstream event framed (default 1 MiB)",
    )


def add_relay_limit_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generations and readers")
    group.add_argument(
        "--detach-grace",
        type=non_negative,
        default=DEFAULT_DETACH_GRACE_S,
        help="seconds a generation outlives its last reader (default 30)",
    )
    group.add_argument(
        "--max-readers-per-session",
        type=positive(int),
        default=DEFAULT_MAX_READERS_PER_SESSION,
        help="readers on one session at once (default 1000)",
    )
    group.add_argument(
        "--max-request-bytes",
        type=positive(int),
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest generation request body (default 8 MiB)",
    )
    group.add_argument(
        "--max-sessions-per-identity",
        type=positive(int),
        default=DEFAULT_MAX_SESSIONS_PER_IDENTITY,
        help="open sessions one authenticated caller may have per relay node "
        f"(default {DEFAULT_MAX_SESSIONS_PER_IDENTITY})",
    )
    group.add_argument(
        "--max-readers-per-identity",
        type=positive(int),
        default=DEFAULT_MAX_READERS_PER_IDENTITY,
        help="readers one authenticated caller may attach per relay node "
        f"(default {DEFAULT_MAX_READERS_PER_IDENTITY})",
    )
    group.add_argument(
        "--drain-timeout",
        type=non_negative,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        metavar="SECONDS",
        help="on SIGTERM a relay node stops taking new work and lets running generations and "
        "readers go on this long; then they end cancelled "
        f"(default {DEFAULT_DRAIN_TIMEOUT_S:g})",
    )


def add_security_flags(parser: argparse.ArgumentParser) -> None:
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
        type=positive(int),
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
        type=positive(int),
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"downstream connections Envoy accepts at once (default {DEFAULT_MAX_CONNECTIONS})",
    )
    group.add_argument(
        "--max-request-headers-kb",
        type=positive(int),
        default=DEFAULT_MAX_REQUEST_HEADERS_KB,
        help=f"request headers larger than this get 431 "
        f"(default {DEFAULT_MAX_REQUEST_HEADERS_KB} KiB)",
    )
    group.add_argument(
        "--request-headers-timeout",
        type=positive(float),
        default=DEFAULT_REQUEST_HEADERS_TIMEOUT_S,
        help=f"seconds a client has to send its request headers "
        f"(default {DEFAULT_REQUEST_HEADERS_TIMEOUT_S:g})",
    )
    add_cors_flag(group)


CONFIG_COMMANDS = ("up", "serve")


def config_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`up`/`serve --config FILE`: the TOML file's settings become flags placed before the
    command line's own, so a flag given on the command line wins. Keys are the long flag names
    (`store = "redis://..."`, `max-readers-per-session = 50`, `demo = true`, `tls = [c, k]`)."""
    if argv[:1] not in ([c] for c in CONFIG_COMMANDS):
        return argv
    at = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), 0)
    if not at:
        return argv
    _, joined, value = argv[at].partition("=")  # `--config FILE` or `--config=FILE`
    if not joined:
        if at + 1 >= len(argv):
            parser.error("argument --config: expected a file")
        value = argv[at + 1]
    path = Path(value)
    try:
        settings = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: {exc}")
    known = _long_flags(parser, argv[0])
    rest = argv[1:at] + argv[at + (1 if joined else 2) :]
    given = _overridden(parser, argv[0], {a.partition("=")[0] for a in rest if a[:2] == "--"})
    flags: list[str] = []
    for key, value in settings.items():
        flag = f"--{key}"
        if flag not in known or key == "config":
            parser.error(f"--config {path}: unknown setting {key!r}")
        if flag in given:
            continue  # the command line wins, also for a flag that adds up (--cors-origin)
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
    return [argv[0], *flags, *rest]


def _command(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub: argparse.ArgumentParser = subparsers.choices[command]
    return sub


def _long_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    sub = _command(parser, command)
    return {s for action in sub._actions for s in action.option_strings if s.startswith("--")}


def _overridden(parser: argparse.ArgumentParser, command: str, given: set[str]) -> set[str]:
    """The flags the command line sets, with the others of an exclusive group one of them is
    in (`--demo` overrides the file's `upstream`)."""
    overridden = set(given)
    for group in _command(parser, command)._mutually_exclusive_groups:
        names = {s for action in group._group_actions for s in action.option_strings}
        if names & given:
            overridden |= names
    return overridden
