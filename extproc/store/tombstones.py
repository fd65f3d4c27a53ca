"""The ids of the last dropped sessions, why they were dropped and whose they were, so a reader
of one hears 410 Gone (said out loud), not 404, and only if it could have read the session.

Kept in flat buffers allocated once, with no Python object per tombstone: tombstones are made
all through a busy period and outlive it, and small objects made then (a str, a tuple) pin
the allocator's arenas that every session's events shared, so a node's memory never came back
after a load (measured: bench/RESULTS.md, "Soak"). A ring of `capacity` slots (the oldest
tombstone makes room for a new one) and an open-addressing index over it (linear probing at a
load of at most one half, backward-shift deletion).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from array import array

from extproc.vocabulary import DropReason

ID_BYTES = 16  # a session id is 16 random bytes, url-safe base64 without padding
OWNER_BYTES = 16  # a prefix of the owner key's SHA-256
BYTES_PER_TOMBSTONE = ID_BYTES + OWNER_BYTES + 1 + 2 * 4  # ring, owner, reason, index
_REASONS = tuple(DropReason)
_OWNED = 0x80  # in a slot's reason byte: the session had an owner
_EMPTY = -1
NOT_THE_OWNER = "\0"  # an owner key no identity has (identities come from HTTP headers)


def _raw_id(session_id: str) -> bytes | None:
    try:
        raw = base64.urlsafe_b64decode(session_id + "==")
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == ID_BYTES else None


def _owner_digest(owner: str) -> bytes:
    return hashlib.sha256(owner.encode()).digest()[:OWNER_BYTES]


class Tombstones:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids = bytearray(ID_BYTES * capacity)
        self._owners = bytearray(OWNER_BYTES * capacity)
        self._reasons = bytearray(capacity)  # 0: a free slot; else reason index + 1 (| _OWNED)
        self._next = 0  # the ring slot the next tombstone takes
        self._count = 0
        size = 1 << max(1, (2 * capacity - 1).bit_length())  # at least twice the capacity
        self._mask = size - 1
        self._index = array("i", [_EMPTY]) * size  # hash slot -> ring slot

    def __len__(self) -> int:
        return self._count

    def add(self, session_id: str, reason: DropReason, owner: str) -> None:
        raw = _raw_id(session_id)
        if raw is None or not self.capacity:
            return
        slot = self._next
        self._next = (slot + 1) % self.capacity
        if self._reasons[slot]:
            self._unindex(slot)  # the oldest tombstone makes room
        else:
            self._count += 1
        self._ids[slot * ID_BYTES : (slot + 1) * ID_BYTES] = raw
        self._owners[slot * OWNER_BYTES : (slot + 1) * OWNER_BYTES] = (
            _owner_digest(owner) if owner else bytes(OWNER_BYTES)
        )
        self._reasons[slot] = (_REASONS.index(reason) + 1) | (_OWNED if owner else 0)
        at = self._home(raw)
        while self._index[at] != _EMPTY:
            at = (at + 1) & self._mask
        self._index[at] = slot

    def reason(self, session_id: str) -> str | None:
        """Why the session was dropped ("evicted", "expired"), or None: no tombstone."""
        slot = self._find(session_id)
        if slot is None:
            return None
        return _REASONS[(self._reasons[slot] & ~_OWNED) - 1].value

    def owner_seen_by(self, session_id: str, identity: str) -> str:
        """The dropped session's owner as far as `identity` may know it: "" (it had none),
        `identity` itself, or NOT_THE_OWNER; for Access.admits."""
        slot = self._find(session_id)
        if slot is None or not self._reasons[slot] & _OWNED:
            return ""
        stored = self._owners[slot * OWNER_BYTES : (slot + 1) * OWNER_BYTES]
        return identity if identity and _owner_digest(identity) == stored else NOT_THE_OWNER

    def _home(self, raw: bytes) -> int:
        return int.from_bytes(raw[:8], "little") & self._mask  # the ids are random

    def _find(self, session_id: str) -> int | None:
        raw = _raw_id(session_id)
        if raw is None or not self.capacity:
            return None
        at = self._home(raw)
        while (slot := self._index[at]) != _EMPTY:
            if self._ids[slot * ID_BYTES : (slot + 1) * ID_BYTES] == raw:
                return slot
            at = (at + 1) & self._mask
        return None

    def _unindex(self, slot: int) -> None:
        """Take ring slot `slot` out of the index, shifting back what probed past it."""
        raw = bytes(self._ids[slot * ID_BYTES : (slot + 1) * ID_BYTES])
        hole = self._home(raw)
        while self._index[hole] != slot:
            hole = (hole + 1) & self._mask
        at = hole
        while True:
            at = (at + 1) & self._mask
            moved = self._index[at]
            if moved == _EMPTY:
                break
            home = self._home(bytes(self._ids[moved * ID_BYTES : (moved + 1) * ID_BYTES]))
            # `moved` may fill the hole unless its home lies cyclically in (hole, at].
            if (at - home) & self._mask >= (at - hole) & self._mask:
                self._index[hole] = moved
                hole = at
        self._index[hole] = _EMPTY
