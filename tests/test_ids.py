"""Tests for extproc.session.ids: the one cursor format. Ids we issue round-trip; anything else is
MalformedEventId (400), never a crash and never a silently different cursor."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from extproc.errors import MalformedEventId
from extproc.session.ids import (
    MAX_EVENT_ID_LENGTH,
    EventId,
    format_event_id,
    is_session_id,
    new_session_id,
    parse_event_id,
)

URL_SAFE = string.ascii_letters + string.digits + "-_"
MAX_SEQ = 10**15 - 1  # the largest seq the format carries (15 digits)
SESSION = "AbCdEfGhIjKlMnOpQr-_09"  # 22 URL-safe characters

sessions = st.text(alphabet=URL_SAFE, min_size=22, max_size=22)
seqs = st.integers(min_value=0, max_value=MAX_SEQ)


@given(session=sessions, seq=seqs)
def test_issued_ids_round_trip(session: str, seq: int) -> None:
    text = format_event_id(session, seq)
    parsed = parse_event_id(text)
    assert parsed == EventId(session, seq)
    assert str(parsed) == text


def test_seq_zero_means_before_the_first_event() -> None:
    assert parse_event_id(f"{SESSION}:0") == EventId(SESSION, 0)


def test_longest_issued_id_fits_the_length_bound() -> None:
    text = format_event_id(SESSION, MAX_SEQ)
    assert len(text) <= MAX_EVENT_ID_LENGTH
    assert parse_event_id(text).seq == MAX_SEQ


def test_overlong_input_is_refused_before_matching() -> None:
    with pytest.raises(MalformedEventId, match="longer than"):
        parse_event_id("x" * (MAX_EVENT_ID_LENGTH + 1))
    with pytest.raises(MalformedEventId, match="longer than"):
        parse_event_id(f"{SESSION}:1" + "0" * 10_000_000)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        ":1",
        SESSION,
        f"{SESSION}:",
        f"{SESSION}:-1",
        f"{SESSION}:+1",
        f"{SESSION}:01",  # we never issue leading zeros: a second spelling of the same cursor
        f"{SESSION}:00",
        f"{SESSION}:1.0",
        f"{SESSION}:1e3",
        f"{SESSION}:1:2",
        f"{SESSION}:{MAX_SEQ + 1}",
        f"{SESSION}:\u0661",  # ARABIC-INDIC DIGIT ONE: int() would accept it
        f"{SESSION}:\uff11",  # FULLWIDTH DIGIT ONE
        f"{SESSION}:1\u0661",
        f"{SESSION[:-1]}\u00e9:1",
        f"{SESSION[:-1]}:1",
        f"{SESSION}A:1",
        f"{SESSION[:-1]}+:1",  # standard base64, not URL-safe
        f"{SESSION[:-1]}/:1",
        f"{SESSION[:-1]}=:1",
        f"{SESSION}:1\n",
        f"{SESSION}\n:1",
        f"\t{SESSION}:1",
        f"{SESSION}:1\x00",
        f"{SESSION}:1 ",
        f" {SESSION}:1",
        f"{SESSION} :1",
        f"{SESSION}: 1",
        f"id: {SESSION}:1",
    ],
)
def test_ids_we_never_issue_are_malformed(text: str) -> None:
    with pytest.raises(MalformedEventId) as info:
        parse_event_id(text)
    assert info.value.http_status == 400


@given(st.text())
@example(f"{SESSION}:7")
@example(f" {SESSION}:7")
@example(f"{SESSION}:7 ")
@example(f"{SESSION}:07")
def test_any_text_is_refused_or_round_trips_exactly(text: str) -> None:
    try:
        parsed = parse_event_id(text)
    except MalformedEventId:
        return
    assert str(parsed) == text


near_ids = st.text(alphabet=URL_SAFE + ": \t\r\n+/=.\u0661", min_size=20, max_size=45)


@given(near_ids)
def test_near_miss_text_is_refused_or_round_trips_exactly(text: str) -> None:
    """Dense in almost-valid ids, where a loose pattern would slip."""
    try:
        parsed = parse_event_id(text)
    except MalformedEventId:
        return
    assert str(parsed) == text
    assert is_session_id(parsed.session)
    assert 0 <= parsed.seq <= MAX_SEQ


def test_session_ids_are_unique_and_22_url_safe_chars() -> None:
    ids = [new_session_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for session in ids:
        assert len(session) == 22
        assert set(session) <= set(URL_SAFE)
        assert is_session_id(session)
        assert parse_event_id(format_event_id(session, 1)) == EventId(session, 1)


@pytest.mark.parametrize(
    "text",
    ["", SESSION[:-1], SESSION + "A", SESSION[:-1] + "+", SESSION[:-1] + "=", f"{SESSION}\n"],
)
def test_is_session_id_rejects_other_shapes(text: str) -> None:
    assert not is_session_id(text)
