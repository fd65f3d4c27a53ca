"""Open generations per identity, on this relay node: one check-and-reserve, so concurrent
requests of one caller cannot all pass the check before any of them is counted.

A generation's slot is reserved before the upstream is called (inline: at the request headers;
detached: before the relay's own upstream request), so a refused generation never reaches the
upstream; a stream on any other route takes its slot when its response headers arrive. A slot
is given back when that exchange ends, whether or not it became a session.
"""

from __future__ import annotations

from extproc.errors import ConfigError, LimitExceeded

DEFAULT_MAX_SESSIONS_PER_IDENTITY = 64  # generations open at once per identity, per node


class Slot:
    """One reserved generation; release() is idempotent."""

    __slots__ = ("_owner", "_quota")

    def __init__(self, quota: SessionQuota | None, owner: str) -> None:
        self._quota = quota
        self._owner = owner

    def release(self) -> None:
        quota, self._quota = self._quota, None
        if quota is not None:
            quota._give_back(self._owner)


UNCOUNTED = Slot(None, "")  # authentication off: no identity to count


class SessionQuota:
    def __init__(self, max_sessions_per_identity: int = DEFAULT_MAX_SESSIONS_PER_IDENTITY) -> None:
        if max_sessions_per_identity < 1:
            raise ConfigError(
                f"max sessions per identity must be >= 1, got {max_sessions_per_identity}"
            )
        self.limit = max_sessions_per_identity
        self._open: dict[str, int] = {}

    def reserve(self, owner: str) -> Slot:
        """Take a slot for `owner` now, or raise LimitExceeded; "" (no auth) is not counted."""
        if not owner:
            return UNCOUNTED
        count = self._open.get(owner, 0)
        if count >= self.limit:
            raise LimitExceeded(f"{self.limit} open sessions for this identity (limit)")
        self._open[owner] = count + 1
        return Slot(self, owner)

    def open(self, owner: str) -> int:
        return self._open.get(owner, 0)

    def _give_back(self, owner: str) -> None:
        left = self._open[owner] - 1
        if left:
            self._open[owner] = left
        else:
            del self._open[owner]
