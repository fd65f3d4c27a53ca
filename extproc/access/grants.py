"""Who may read a session: its owner (the identity Envoy authenticated when it was created),
or a holder of a read-only share token the owner minted for that one session.

Envoy authenticates the caller and passes on what it verified, stripping any copy a client
sends (SECURITY.md); `access/identity.py` turns that into the owner key compared here. A caller
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

from extproc.errors import InvalidArgument

SHARE_HEADER = "x-relay-share"
SHARE_QUERY = "share"  # for EventSource, which cannot set headers
MAX_TOKEN_CHARS = 128
DEFAULT_SHARE_TTL_S = 3600.0
MAX_SHARE_TTL_S = 7 * 86400.0
MAX_SHARES_PER_SESSION = 32


@dataclass(frozen=True)
class ShareRecord:
    digest: str  # hex SHA-256 of the token's secret
    expires_at: float  # wall clock, seconds


@dataclass(frozen=True)
class Access:
    """What a request presents: Envoy's identity for it, and a share token if any."""

    identity: str = ""  # the caller's owner key (access/identity.py); "" when auth is off
    share_token: str = ""
    owner_only: bool = False  # cancel and minting shares: the owner, never a token
    unchecked: bool = False  # the relay's own lookups, never a client's

    @classmethod
    def of(cls, identity: str | None, share_token: str | None = None) -> Access:
        if share_token and len(share_token) > MAX_TOKEN_CHARS:
            raise InvalidArgument(f"share tokens are at most {MAX_TOKEN_CHARS} characters")
        return cls(identity or "", share_token or "")

    def for_owner(self) -> Access:
        return Access(self.identity, "", owner_only=True)

    @property
    def token_id(self) -> str:
        return self.share_token.partition(".")[0]

    def reads_by_share(self, owner: str) -> bool:
        """Whether a session of `owner` is read by this request's share token (so revoking or
        expiring the token must cut the reader), not by being its owner."""
        return bool(self.share_token and owner) and not hmac.compare_digest(
            self.identity.encode(), owner.encode()
        )

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
        raise InvalidArgument(f"share token lifetime must be 0..{MAX_SHARE_TTL_S:g} seconds")
    token_id = secrets.token_urlsafe(9)  # 12 characters, no '.'
    secret = secrets.token_urlsafe(32)
    record = ShareRecord(_digest(secret.encode()), time.time() + ttl_s)
    return NewShare(f"{token_id}.{secret}", token_id, record)


def _digest(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()
