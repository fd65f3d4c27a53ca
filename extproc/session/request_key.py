"""The request that created a session, which a resume must repeat: method, target (path and
query exactly as sent) and a SHA-256 of the body. Stored with the session as one string (in
memory and in the Redis metadata), so an old `Last-Event-ID` sent with another question is
refused instead of replaying another question's answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_DIGEST_CHARS = 64  # hex SHA-256


@dataclass(frozen=True, slots=True)
class RequestKey:
    method: str
    target: str  # path and query as the client sent them, e.g. /v1/chat/completions?x=1
    body_sha256: str  # hex

    def __str__(self) -> str:
        """How it is stored; a target has no spaces (RFC 9112 request-target)."""
        return f"{self.method} {self.target} {self.body_sha256}"

    @classmethod
    def parse(cls, text: str) -> RequestKey | None:
        """A stored key; None for "" (a session whose request is not known) or junk."""
        method, _, rest = text.partition(" ")
        target, _, digest = rest.rpartition(" ")
        if not method or not target or len(digest) != _DIGEST_CHARS:
            return None
        return cls(method, target, digest)

    def difference(self, other: RequestKey) -> str | None:
        """What `other` (a resume) changed compared with this key (the session's), said for a
        human; None when it is the same request."""
        if other.method != self.method:
            return f"method {other.method}, but the session was created by {self.method}"
        if other.target != self.target:
            return f"path {other.target}, but the session was created on {self.target}"
        if other.body_sha256 != self.body_sha256:
            return "a different request body"
        return None


class RequestKeyBuilder:
    """The key of a request whose body arrives in chunks (ext_proc, aiohttp)."""

    __slots__ = ("_body", "method", "target")

    def __init__(self, method: str, target: str) -> None:
        self.method = method
        self.target = target
        self._body = hashlib.sha256()

    def feed(self, chunk: bytes) -> None:
        self._body.update(chunk)

    def finish(self) -> RequestKey:
        return RequestKey(self.method, self.target, self._body.hexdigest())
