"""Who is calling: the owner key the relay derives from what Envoy authenticated.

Envoy verifies the caller and passes on exactly what it verified (SECURITY.md): for an API key
`x-relay-identity: key:<client name>`; for a JWT its payload, base64url as signed, in
`x-relay-jwt-payload`. The owner key is the kind plus a SHA-256 of the exact claim bytes (the
JWT's `iss` and `sub`; the identity header's bytes): fixed length and plain ASCII, so no header
normalisation, truncation or charset conversion can fold two callers into one. What cannot be
read losslessly (oversize, not UTF-8, duplicate claims, no `sub`) is refused, never folded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re

from extproc.errors import Unauthenticated

IDENTITY_HEADER = "x-relay-identity"
JWT_PAYLOAD_HEADER = "x-relay-jwt-payload"
ANONYMOUS = ""  # authentication off: sessions have no owner
MAX_IDENTITY_CHARS = 512  # the identity header (API key identities are at most 132)
MAX_JWT_PAYLOAD_CHARS = 16 * 1024  # the base64url payload; the token fit Envoy's header limit
MAX_CLAIM_BYTES = 1024  # `iss` and `sub`, each, in UTF-8
# Visible ASCII only: nothing that a header could trim, fold or re-encode.
_IDENTITY_VALUE = re.compile(r"[\x21-\x7e]+")


def owner_key(identity: str | None, jwt_payload: str | None) -> str:
    """The owner key for a request's Envoy-set headers; ANONYMOUS when there are none."""
    if jwt_payload is not None:
        if identity is not None:
            raise Unauthenticated("the request carries two identities (an API key and a JWT)")
        issuer, subject = _jwt_claims(jwt_payload)
        return "jwt:" + _digest(issuer, subject)
    if identity is None:
        return ANONYMOUS
    if len(identity) > MAX_IDENTITY_CHARS or _IDENTITY_VALUE.fullmatch(identity) is None:
        raise Unauthenticated(
            f"the caller's identity must be 1..{MAX_IDENTITY_CHARS} visible ASCII characters"
        )
    return "id:" + _digest(identity.encode("ascii"))


def _digest(*parts: bytes) -> str:
    """SHA-256 over length-prefixed parts (so ("ab", "c") and ("a", "bc") differ), base64url."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(4, "big"))
        hasher.update(part)
    return base64.urlsafe_b64encode(hasher.digest()).rstrip(b"=").decode("ascii")


class _DuplicateClaim(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Parsers disagree on which duplicate wins: a token with two `sub`s names no one.
    claims = dict(pairs)
    if len(claims) != len(pairs):
        raise _DuplicateClaim("duplicate claim")
    return claims


def _jwt_claims(payload: str) -> tuple[bytes, bytes]:
    """The exact UTF-8 bytes of a verified JWT's `iss` ("" when absent) and `sub`."""
    if not 0 < len(payload) <= MAX_JWT_PAYLOAD_CHARS:
        raise Unauthenticated(f"the JWT payload must be 1..{MAX_JWT_PAYLOAD_CHARS} characters")
    try:
        raw = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_", validate=True)
        claims = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Unauthenticated(
            "the JWT payload is not base64url UTF-8 JSON with unique claims"
        ) from None
    if not isinstance(claims, dict):
        raise Unauthenticated("the JWT payload is not a JSON object")
    subject, issuer = claims.get("sub"), claims.get("iss", "")
    if not isinstance(subject, str) or not subject or not isinstance(issuer, str):
        raise Unauthenticated("the JWT must carry a non-empty string `sub` (and a string `iss`)")
    try:
        parts = issuer.encode("utf-8"), subject.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written as a \u escape
        raise Unauthenticated("the JWT's `iss` and `sub` must be valid Unicode") from None
    if max(map(len, parts)) > MAX_CLAIM_BYTES:
        raise Unauthenticated(f"the JWT's `iss` and `sub` are limited to {MAX_CLAIM_BYTES} bytes")
    return parts
