"""How sessions are laid out in Redis (or Valkey); the scripts that change them are in
`scripts.py`.

Keys of one session share a hash tag ({<id>}); a replication round writes many sessions in one
script call, so the store needs one Redis (or Valkey) primary, not a Redis Cluster.
  {prefix}:{<id>}:events   stream; entry `0-<seq>` holds event <seq> in field `d`; the end
                           marker `0-<last_seq+1>` (fields `end`, `reason`) comes with the end
  {prefix}:{<id>}:meta     hash: state, content_type, write_path, node (its writer), owner,
                           request (the key a resume must repeat, session/request_key.py);
                           with the end: reason, last_seq, and `fenced` if another node ended it
  {prefix}:{<id>}:gone     the owner, written at the end and kept a day longer: 410, not 404
  {prefix}:{<id>}:shares   hash: share token id -> "<expiry> <sha256 of its secret>"
  {prefix}:{<id>}:readers  hash: node -> "<readers> <expiry ms>", who reads the session where
  {prefix}:node:<node>     a writing node's lease; while it exists only that node writes its
                           sessions, once it lapses another node may end them `failed`
  {prefix}:epoch           when this Redis last started empty (ms), set by the first node to see
                           it missing: a lookup right after that says 503, not 404
  {prefix}:cancel          pub/sub channel of session ids whose generation should stop
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

from extproc.access.grants import ShareRecord
from extproc.errors import ConfigError

DEFAULT_LEASE_S = 5.0
DEFAULT_PREFIX = "stream-relay"
OPEN_TTL_S = 3600.0  # an open session nobody writes to any more is dropped after this long
GONE_TTL_S = 86400.0  # how long an ended session's id still answers 410 after its TTL


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    url: str  # redis://host:port/db, rediss:// for TLS, unix:///path (--store)
    node_lease: float = DEFAULT_LEASE_S  # a node that stops renewing for this long is dead
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"--store must be 'memory' or a redis://host:port/db URL, got {self.url!r}"
            )
        if not 0.3 <= self.node_lease <= 600:
            raise ConfigError(f"--node-lease must be 0.3..600 seconds, got {self.node_lease}")

    @property
    def display_url(self) -> str:
        """The URL without a password, for logs."""
        head, _, tail = self.url.rpartition("@")
        return f"{self.url.split('://')[0]}://***@{tail}" if head else self.url

    def lease_key(self, node: str) -> str:
        return f"{self.prefix}:node:{node}"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def epoch_key(self) -> str:
        return f"{self.prefix}:epoch"


class Keys:
    """The keys of one session."""

    __slots__ = ("events", "gone", "meta", "readers", "shares")

    def __init__(self, prefix: str, session_id: str) -> None:
        base = f"{prefix}:{{{session_id}}}"
        self.events = f"{base}:events"
        self.meta = f"{base}:meta"
        self.gone = f"{base}:gone"
        self.readers = f"{base}:readers"
        self.shares = f"{base}:shares"


Entry = tuple[bytes, dict[bytes, bytes]]


def entries(reply: object) -> list[Entry]:
    """Stream entries as this client returns them (bytes, RESP2); redis-py types them loosely."""
    return cast(list[Entry], reply or [])


def seq_of(entry_id: bytes) -> int:
    return int(entry_id.rpartition(b"-")[2])


def share_value(record: ShareRecord) -> str:
    return f"{record.expires_at} {record.digest}"


def share_record(value: bytes | None) -> ShareRecord | None:
    if value is None:
        return None
    expires_at, _, digest = value.decode().partition(" ")
    return ShareRecord(digest, float(expires_at))


def now_ms() -> int:
    return int(time.time() * 1000)
