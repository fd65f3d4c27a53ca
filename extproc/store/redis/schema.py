"""How sessions are laid out in Redis (or Valkey), and the scripts that change them atomically.

Keys of one session share a hash tag, so one script can touch them all (Redis Cluster too):
  {prefix}:{<id>}:events   stream; entry `0-<seq>` holds event <seq> in field `d`; the end
                           marker `0-<last_seq+1>` (fields `end`, `reason`) comes with the end
  {prefix}:{<id>}:meta     hash: state, reason, last_seq, content_type, write_path, node, owner,
                           request (the key a resume must repeat, session/request_key.py)
  {prefix}:{<id>}:gone     the owner, written at the end and kept a day longer: 410, not 404
  {prefix}:{<id>}:shares   hash: share token id -> "<expiry> <sha256 of its secret>"
  {prefix}:{<id>}:readers  hash: node -> "<readers> <expiry ms>", who reads the session where
  {prefix}:node:<node>     a writing node's lease; when it lapses, its open sessions fail
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

# Append events at their seqs and record the state, atomically, so a reader never sees an
# end before the last event. Idempotent: events already stored are skipped (a retried round);
# a gap (Redis lost data, e.g. restarted empty) returns what Redis has so the writer resends.
# Returns the last stored seq, or -1 if someone else ended the session (its lease lapsed).
SYNC = """
local n = redis.call('XLEN', KEYS[1])
local current = redis.call('HGET', KEYS[2], 'state')
if current and current ~= 'open' then return -1 end
local first = tonumber(ARGV[1])
local count = tonumber(ARGV[2])
if first > n + 1 then return n end
for i = 1, count do
  local seq = first + i - 1
  if seq > n then redis.call('XADD', KEYS[1], '0-' .. seq, 'd', ARGV[2 + i]) end
end
local last = n
if count > 0 and first + count - 1 > n then last = first + count - 1 end
local b = 2 + count
local state = ARGV[b + 1]
redis.call('HSET', KEYS[2], 'state', state, 'reason', ARGV[b + 2], 'last_seq', last,
  'content_type', ARGV[b + 5], 'write_path', ARGV[b + 6], 'node', ARGV[b + 7],
  'owner', ARGV[b + 8], 'request', ARGV[b + 9])
if state ~= 'open' then
  redis.call('XADD', KEYS[1], '0-' .. (last + 1), 'end', state, 'reason', ARGV[b + 2])
  redis.call('SET', KEYS[3], ARGV[b + 8], 'PX', ARGV[b + 4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[b + 3])
redis.call('PEXPIRE', KEYS[2], ARGV[b + 3])
return last
"""

# The writing node's lease lapsed while its session was open: end the session failed, once.
FAIL_IF_ORPHANED = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'open' then return 0 end
local n = redis.call('XLEN', KEYS[1])
redis.call('XADD', KEYS[1], '0-' .. (n + 1), 'end', 'failed', 'reason', ARGV[1])
redis.call('HSET', KEYS[2], 'state', 'failed', 'reason', ARGV[1], 'last_seq', n)
redis.call('SET', KEYS[3], redis.call('HGET', KEYS[2], 'owner') or '', 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Add a share token unless the session has MAX of them; expired ones give their slot back
# first. Returns 1 if added, 0 if full.
ADD_SHARE = """
local now = tonumber(ARGV[4])
for _, token in ipairs(redis.call('HKEYS', KEYS[1])) do
  local value = redis.call('HGET', KEYS[1], token)
  if tonumber(string.match(value, '^%S+')) <= now then redis.call('HDEL', KEYS[1], token) end
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[5])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


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
