"""Who may read a session: its owner (the identity Envoy authenticated when it was created),
or a holder of a read-only share token the owner minted for that one session.

Envoy authenticates the caller and passes on what it verified, stripping any copy a client
sends (SECURITY.md); `extproc/identity.py` turns that into the owner key compared here. A caller
who may not read a session gets the same 404 as for an unknown id, so ids cannot be probed.
Share tokens are `<token id>.<secret>`: the store keeps only the secret's SHA-256 and compares
it in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from extproc.errors import ConfigError, LimitExceeded, MalformedEventId

SHARE_HEADER = "x-relay-share"
SHARE_QUERY = "share"  # for EventSource, which cannot set headers
MAX_TOKEN_CHARS = 128
DEFAULT_SHARE_TTL_S = 3600.0
MAX_SHARE_TTL_S = 7 * 86400.0
MAX_SHARES_PER_SESSION = 32
DEFAULT_MAX_SESSIONS_PER_IDENTITY = 64  # open at once, per relay node
DEFAULT_MAX_READERS_PER_IDENTITY = 256  # attached at once, per relay node


@dataclass(frozen=True, kw_only=True)
class AccessLimits:
    max_sessions_per_identity: int = DEFAULT_MAX_SESSIONS_PER_IDENTITY
    max_readers_per_identity: int = DEFAULT_MAX_READERS_PER_IDENTITY

    def __post_init__(self) -> None:
        for name in ("max_sessions_per_identity", "max_readers_per_identity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1")


@dataclass(frozen=True)
class ShareRecord:
    digest: str  # hex SHA-256 of the token's secret
    expires_at: float  # wall clock, seconds


@dataclass(frozen=True)
class Access:
    """What a request presents: Envoy's identity for it, and a share token if any."""

    identity: str = ""  # the caller's owner key (extproc/identity.py); "" when auth is off
    share_token: str = ""
    owner_only: bool = False  # cancel and minting shares: the owner, never a token
    unchecked: bool = False  # the relay's own lookups, never a client's

    @classmethod
    def of(cls, identity: str | None, share_token: str | None = None) -> Access:
        if share_token and len(share_token) > MAX_TOKEN_CHARS:
            raise MalformedEventId(f"share tokens are at most {MAX_TOKEN_CHARS} characters")
        return cls(identity or "", share_token or "")

    def for_owner(self) -> Access:
        return Access(self.identity, "", owner_only=True)

    @property
    def token_id(self) -> str:
        return self.share_token.partition(".")[0]

    def admits(self, owner: str, share: ShareRecord | None) -> bool:
        """May this request read (or, owner_only, manage) a session owned by `owner`?"""
        if (
            self.unchecked
            or not owner
            or hmac.compare_digest(self.identity.encode(), owner.encode())
        ):
            return True  # no auth configured when it was made, or the owner itself
        if self.owner_only or share is None or share.expires_at <= time.time():
            return False
        secret = self.share_token.partition(".")[2].encode()
        return hmac.compare_digest(_digest(secret), share.digest)


OPEN = Access(unchecked=True)  # the relay's own lookups (and tests of the store)


@dataclass(frozen=True)
class NewShare:
    token: str
    token_id: str
    record: ShareRecord


def mint_share(ttl_s: float) -> NewShare:
    if not 0 < ttl_s <= MAX_SHARE_TTL_S:
        raise LimitExceeded(f"share token lifetime must be 0..{MAX_SHARE_TTL_S:g} seconds")
    token_id = secrets.token_urlsafe(9)  # 12 characters, no '.'
    secret = secrets.token_urlsafe(32)
    record = ShareRecord(_digest(secret.encode()), time.time() + ttl_s)
    return NewShare(f"{token_id}.{secret}", token_id, record)


def _digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()
