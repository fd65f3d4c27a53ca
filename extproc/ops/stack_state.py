"""Where a running `stream-relay up` says what it serves, so `stream-relay status` finds it
without flags: one JSON file per `up` process in a per-user directory,
`$XDG_RUNTIME_DIR/stream-relay/` (else `~/.local/state/stream-relay/`), mode 0700.

`up` writes its file once ready, rewrites it when a restarted child changes a URL, and removes
it when it stops; a file whose process is gone (SIGKILL) is ignored and cleaned up by readers.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class StackState:
    pid: int
    base_url: str
    admin_url: str
    metrics_urls: tuple[str, ...]  # every relay node's /metrics, in start order


def state_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "stream-relay"
    return Path.home() / ".local" / "state" / "stream-relay"


def _path(pid: int) -> Path:
    return state_dir() / f"up-{pid}.json"


def publish(state: StackState) -> Path:
    """Write (atomically) or rewrite this process's state file."""
    directory = state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _path(state.pid)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)
    return path


def withdraw(pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(pid).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_stacks() -> list[StackState]:
    """The states of `up` processes still running, oldest pid first; stale files removed."""
    found = []
    for path in sorted(state_dir().glob("up-*.json")):
        try:
            raw = json.loads(path.read_text())
            state = StackState(
                pid=int(raw["pid"]),
                base_url=str(raw["base_url"]),
                admin_url=str(raw["admin_url"]),
                metrics_urls=tuple(str(u) for u in raw["metrics_urls"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(state.pid):
            found.append(state)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found
