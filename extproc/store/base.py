"""What every session store offers: the writer side (synchronous, never waits on a network)
and the reader side (asynchronous: a shared store may have to ask another machine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from extproc.access.grants import OPEN, Access, ShareRecord
from extproc.session.log import EndState, SessionLog, WritePath


class SessionStore(Protocol):
    def create(
        self, *, content_type: str, write_path: WritePath, owner: str = ""
    ) -> SessionLog: ...

    def append(self, log: SessionLog, events: list[bytes]) -> bool: ...

    def end(self, log: SessionLog, state: EndState, reason: str = "") -> None: ...

    def fenced(self, log: SessionLog) -> bool:
        """Whether this node must stop writing `log` and cut its writer's client (a shared
        store: another node may have taken the session over; it has then ended `failed`)."""
        ...

    async def lookup(
        self, session_id: str, *, at_least: int = 0, access: Access = OPEN
    ) -> SessionLog:
        """The log of a session, wherever it was written; raises SessionNotFound (also when
        `access` may not read it), SessionGone or StoreUnavailable. `at_least`: a seq the
        caller saw, worth a short wait for a copy that lags its writer."""
        ...

    async def add_share(self, session_id: str, token_id: str, record: ShareRecord) -> None:
        """Keep a share token's record; expired ones give their slot back first."""
        ...

    async def revoke_share(self, session_id: str, token_id: str) -> bool: ...

    async def valid_shares(self, shares: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of these (session id, token id) pairs, those neither revoked nor expired."""
        ...

    def readers_changed(self, session_id: str) -> None:
        """A reader started or stopped on this node (shared stores announce it)."""
        ...

    async def request_cancel(self, session_id: str) -> bool:
        """Ask whichever node runs this session's generation to cancel it."""
        ...

    async def remote_readers(self, session_id: str) -> int:
        """Readers of this session on other nodes (as they last announced)."""
        ...

    async def start(
        self,
        *,
        on_cancel: Callable[[str], bool] = lambda session_id: False,
        reader_counts: Callable[[], dict[str, int]] = dict,
    ) -> None:
        """Start background work. The node passes how to stop a generation this node runs (a
        cancel sent through another node) and this node's readers per session (which a
        shared store tells the other nodes)."""
        ...

    async def close(self) -> None: ...
