"""The owner key: a lossless function of what Envoy authenticated. Distinct callers never share
a key (long, whitespace-padded, mojibake or issuer-qualified subjects), and what cannot be read
losslessly is refused with 401, never folded."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.access.identity import ANONYMOUS, MAX_CLAIM_BYTES, owner_key
from extproc.errors import Unauthenticated


def payload(claims: dict[str, object] | bytes) -> str:
    raw = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_owner(sub: str, iss: str = "https://issuer.test") -> str:
    return owner_key(None, payload({"sub": sub, "iss": iss, "exp": 1}))


COLLIDING_BEFORE = [  # pairs the old owner key (a truncated, header-normalised sub) folded
    ("u" * 252 + "-victim", "u" * 252 + "-attacker"),
    ("victim", "victim "),
    ("victim", "victim\t"),
    ("victim", " victim"),
    ("josé", "josÃ©"),
    ("Victim", "victim"),
]


@pytest.mark.parametrize(("victim", "attacker"), COLLIDING_BEFORE)
def test_distinct_subjects_get_distinct_owner_keys(victim: str, attacker: str) -> None:
    assert jwt_owner(victim) != jwt_owner(attacker)
    assert jwt_owner(victim) == jwt_owner(victim)  # and the key is stable


def test_the_issuer_is_part_of_the_key_and_the_kinds_never_meet() -> None:
    assert jwt_owner("alice", "https://a.test") != jwt_owner("alice", "https://b.test")
    assert jwt_owner("alice", iss="") != jwt_owner("alice")
    assert owner_key("key:alice", None) != jwt_owner("key:alice")
    # ("ab", "c") and ("a", "bc") must not hash alike
    assert jwt_owner("c", "ab") != jwt_owner("bc", "a")


def test_keys_are_short_ascii_and_other_claims_do_not_matter() -> None:
    key = jwt_owner("x" * MAX_CLAIM_BYTES)
    assert key.isascii() and len(key) == len("jwt:") + 43
    again = owner_key(None, payload({"sub": "x" * MAX_CLAIM_BYTES, "iss": "https://issuer.test"}))
    assert again == key  # exp, aud, iat ... are not who the caller is
    assert owner_key(None, None) == ANONYMOUS


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_any_two_different_subjects_differ(a: str, b: str) -> None:
    try:
        keys = jwt_owner(a), jwt_owner(b)
    except Unauthenticated:
        return  # lone surrogates: refused, see below
    assert (keys[0] == keys[1]) == (a == b)


@pytest.mark.parametrize(
    ("identity", "jwt"),
    [
        (None, payload({"sub": "x" * (MAX_CLAIM_BYTES + 1)})),  # oversize: refused, not cut
        (None, payload({"sub": "é" * (MAX_CLAIM_BYTES // 2 + 1)})),  # counted in UTF-8 bytes
        (None, payload({"sub": "ok", "iss": "i" * (MAX_CLAIM_BYTES + 1)})),
        (None, payload(b'{"sub": "jos\xe9"}')),  # Latin-1 bytes: not UTF-8
        (None, payload(b'{"sub": "\\ud800"}')),  # a lone surrogate
        (None, payload(b'{"sub": "victim", "sub": "attacker"}')),  # which one?
        (None, payload({"iss": "https://issuer.test"})),  # no sub
        (None, payload({"sub": ""})),
        (None, payload({"sub": 7})),
        (None, payload({"sub": "ok", "iss": ["a"]})),
        (None, payload(b"[1, 2]")),
        (None, payload(b"not json")),
        (None, "not base64url!"),
        (None, ""),
        (None, "A" * (16 * 1024 + 4)),
        ("key:alice", payload({"sub": "alice"})),  # two identities
        ("key:al ice", None),  # Envoy never sets these
        ("key:alice\t", None),
        ("", None),
        ("key:jos\xe9", None),
        ("k" * 513, None),
    ],
)
def test_what_cannot_be_read_losslessly_is_refused(identity: str | None, jwt: str) -> None:
    with pytest.raises(Unauthenticated) as refused:
        owner_key(identity, jwt)
    assert refused.value.http_status == 401
    assert refused.value.code == "invalid_identity"


def test_padded_and_unpadded_payloads_are_the_same_caller() -> None:
    raw = json.dumps({"sub": "alice", "iss": "https://issuer.test"}).encode()
    unpadded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    padded = base64.urlsafe_b64encode(raw).decode()
    assert padded != unpadded
    assert owner_key(None, padded) == owner_key(None, unpadded)
