"""What every session store offers: the writer side (synchronous, never waits on a network)
and the reader side (asynchronous: a shared store may have to ask another machine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from extproc.access.grants import OPEN, Access, ShareRecord
from extproc.node.metrics import RelayMetrics
from extproc.session.log import EndState, SessionLog, WritePath


class SessionStore(Protocol):
    metrics: RelayMetrics
    # Set by the node: stop a generation this node runs (a cancel sent through another node),
    # and how many readers each session has on this node (a shared store tells the others).
    on_cancel: Callable[[str], bool]
    reader_counts: Callable[[], dict[str, int]]

    def create(
        self, *, content_type: str, write_path: WritePath, owner: str = ""
    ) -> SessionLog: ...

    def append(self, log: SessionLog, events: list[bytes]) -> bool: ...

    def end(self, log: SessionLog, state: EndState, reason: str = "") -> None: ...

    async def lookup(
        self, session_id: str, *, at_least: int = 0, access: Access = OPEN
    ) -> SessionLog:
        """The log of a session, wherever it was written; raises SessionNotFound (also when
        `access` may not read it), SessionGone or StoreUnavailable. `at_least`: a seq the
        caller saw, worth a short wait for a copy that lags its writer."""
        ...

    def open_sessions(self, owner: str) -> int:
        """Open sessions this node writes for `owner` (the per-identity limit)."""
        ...

    async def add_share(self, session_id: str, token_id: str, record: ShareRecord) -> None: ...

    async def revoke_share(self, session_id: str, token_id: str) -> bool: ...

    def readers_changed(self, session_id: str) -> None:
        """A reader started or stopped on this node (shared stores announce it)."""
        ...

    async def request_cancel(self, session_id: str) -> bool:
        """Ask whichever node runs this session's generation to cancel it."""
        ...

    async def remote_readers(self, session_id: str) -> int:
        """Readers of this session on other nodes (as they last announced)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
