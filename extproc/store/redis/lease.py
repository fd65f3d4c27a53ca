"""This node's lease as the node itself can know it, without asking Redis.

A renewal sent at monotonic time `t` makes Redis keep the lease key until at least `t + lease`
(Redis starts the TTL when the command arrives, after `t`); until then no other node can end
this node's sessions. So a writer may show new events of a session Redis holds only while
`now < t + lease - margin`. After a break (the key was gone when we renewed, and our own
deadline had passed: the process was paused or cut off from Redis), the lease is not trusted
again until a replication round has asked Redis whether each session is still ours.
"""

from __future__ import annotations

import time

MARGIN_FRACTION = 0.1  # of the lease, kept back for the copy that follows a shown event
MAX_MARGIN_S = 0.5


class Lease:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.margin_s = min(MAX_MARGIN_S, lease_s * MARGIN_FRACTION)
        self._valid_until = -1.0  # monotonic; nothing is trusted before the first renewal
        self._pending_until = -1.0  # a renewed deadline waiting for the recheck after a break
        self.rechecking = False
        self.renewals = 0

    def holds(self) -> bool:
        """Whether this node may show new events of sessions that Redis holds."""
        return not self.rechecking and time.monotonic() < self._valid_until - self.margin_s

    def renewed(self, sent_at: float, *, continuous: bool) -> bool:
        """A renewal sent at `sent_at` succeeded; `continuous`: the key was still there.
        True if this node's sessions must be checked against Redis (the key was gone)."""
        self.renewals += 1
        deadline = sent_at + self.lease_s
        if continuous or self.renewals == 1:
            self._apply(deadline)
            return not continuous and self.renewals > 1
        if sent_at < self._valid_until:
            # Our deadline had not passed: Redis lost the key some other way (it restarted
            # empty, or evicted it). Keep writing; the recheck finds anything taken.
            self._apply(deadline)
            return True
        self.rechecking = True  # a real break: trust nothing until the recheck says so
        self._pending_until = max(self._pending_until, deadline)
        return True

    def rechecked(self) -> None:
        """Every session this node writes was confirmed (or cut) after a break."""
        if self.rechecking:
            self.rechecking = False
            self._apply(self._pending_until)

    def _apply(self, deadline: float) -> None:
        self._valid_until = max(self._valid_until, deadline)
