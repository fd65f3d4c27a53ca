"""Tests for extproc.session.framing: fixtures under any chunking, a naive WHATWG reference
parser on arbitrary bytes, CRLF split across chunks, frame-size limits and the tag/read helpers."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.session import framing
from extproc.session.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    Frame,
    FrameTooLarge,
    NdjsonFramer,
    SseFramer,
    framing_of,
    sse_data,
    tag_sse,
    tag_sse_id,
)
from extproc.session.ids import event_id_prefix, format_event_id, new_session_id
from extproc.vocabulary import Framing

FIXTURES = Path(__file__).parent / "fixtures"
BOM = b"\xef\xbb\xbf"

# fixture -> (events, non-event frames) from tests/fixtures/README.md
SSE_COUNTS = {
    "openai-chat-usage.sse": (13, 0),
    "anthropic-messages.sse": (10, 0),
    "openai-responses.sse": (7, 0),
    "crlf-comments-multiline.sse": (3, 3),  # `: keep-alive`, `retry:`-only, `: ping`
    "openai-tool-calls.sse": (6, 0),
    "openai-error-midstream.sse": (2, 0),
    "truncated-last-event.sse": (3, 0),  # plus the unterminated 4th from close()
}
ALL_FIXTURES = [*SSE_COUNTS, "ollama-chat.ndjson"]

Framer = SseFramer | NdjsonFramer


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def new_framer(name: str, **kw: int) -> Framer:
    return NdjsonFramer(**kw) if name.endswith(".ndjson") else SseFramer(**kw)


def frame_all(framer: Framer, chunks: list[bytes]) -> list[Frame]:
    frames = [f for chunk in chunks for f in framer.feed(chunk)]
    last = framer.close()
    return [*frames, last] if last is not None else frames


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# Naive WHATWG event-stream interpretation of a whole stream, as the reference for the framer.
_LINE = re.compile(rb"([^\r\n]*)(?:\r\n|\n|\r)")


def _field_is_data(line: bytes) -> bool:
    return line.partition(b":")[0] == b"data"


def whatwg(stream: bytes) -> tuple[list[tuple[bytes, bytes | None]], bytes, bool]:
    """(block raw, dispatched data or None) per blank line; the unterminated rest; whether the
    rest has a data field. A trailing CR at end of stream counts as a line end."""
    body0 = 3 if stream.startswith(BOM) else 0
    pos, start = body0, 0
    blocks: list[tuple[bytes, bytes | None]] = []
    data: list[bytes] | None = None
    while m := _LINE.match(stream, pos):
        line, pos = m.group(1), m.end()
        if not line:
            blocks.append((stream[start:pos], None if data is None else b"\n".join(data)))
            start, data = pos, None
        elif _field_is_data(line):
            value = line.partition(b":")[2]
            data = [*(data or []), value[1:] if value.startswith(b" ") else value]
    rest = stream[start:]
    rest_has_data = any(map(_field_is_data, stream[max(start, body0) :].splitlines()))
    return blocks, rest, rest_has_data


def check_against_reference(stream: bytes, frames: list[Frame]) -> None:
    blocks, rest, rest_has_data = whatwg(stream)
    complete = [f for f in frames if f.complete]
    assert [f.raw for f in complete] == [raw for raw, _ in blocks]
    assert [f.is_event for f in complete] == [d is not None for _, d in blocks]
    for i, (f, (_, data)) in enumerate(zip(complete, blocks, strict=True)):
        if f.is_event and not (i and f.raw.startswith(BOM)):  # sse_data skips any leading BOM
            assert sse_data(f.raw) == data
    partial = [f for f in frames if not f.complete]
    assert partial == ([Frame(rest, rest_has_data, complete=False)] if rest else [])
    assert frames[len(complete) :] == partial  # only close() returns a partial frame


# ---- fixtures -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SSE_COUNTS)
def test_sse_fixture_counts_whole_and_bytewise(name: str) -> None:
    data = load(name)
    whole = frame_all(SseFramer(), [data])
    complete = [f for f in whole if f.complete]
    assert (sum(f.is_event for f in complete), sum(not f.is_event for f in complete)) == (
        SSE_COUNTS[name]
    )
    assert b"".join(f.raw for f in whole) == data
    bytewise = frame_all(SseFramer(), [data[i : i + 1] for i in range(len(data))])
    assert bytewise == whole
    check_against_reference(data, whole)


def test_ndjson_fixture_counts_whole_and_bytewise() -> None:
    data = load("ollama-chat.ndjson")
    whole = frame_all(NdjsonFramer(), [data])
    assert len(whole) == 5 and all(f.is_event and f.complete for f in whole)
    assert b"".join(f.raw for f in whole) == data
    assert frame_all(NdjsonFramer(), [data[i : i + 1] for i in range(len(data))]) == whole
    last = json.loads(whole[-1].raw)
    assert last["done"] is True and last["eval_count"] == 4


@given(st.sampled_from(ALL_FIXTURES), st.lists(st.integers(min_value=0), max_size=40))
def test_fixtures_random_splits(name: str, cuts: list[int]) -> None:
    data = load(name)
    whole = frame_all(new_framer(name), [data])
    assert frame_all(new_framer(name), split_at(data, cuts)) == whole


def test_openai_usage_and_text_via_sse_data() -> None:
    events = [f for f in SseFramer().feed(load("openai-chat-usage.sse")) if f.is_event]
    payloads = [sse_data(f.raw) for f in events]
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1] if p is not None]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Relays keep long answers alive when networks blink."
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 21


def test_anthropic_event_names_survive_tagging() -> None:
    events = SseFramer().feed(load("anthropic-messages.sse"))
    names = [f.raw.split(b"\n", 1)[0] for f in events]
    assert names[0] == b"event: message_start" and names[-1] == b"event: message_stop"
    delta = next(f for f in events if f.raw.startswith(b"event: message_delta"))
    assert json.loads(sse_data(delta.raw) or b"")["usage"]["output_tokens"] == 5
    for i, f in enumerate(events):
        assert tag_sse(f.raw, str(i)) == f"id: {i}\n".encode() + f.raw


def test_crlf_comments_and_multiline_data() -> None:
    frames = SseFramer().feed(load("crlf-comments-multiline.sse"))
    assert [f.raw for f in frames if not f.is_event] == [
        b": keep-alive\r\n\r\n",
        b"retry: 1500\r\n\r\n",
        b": ping\r\n\r\n",
    ]
    data = [sse_data(f.raw) for f in frames if f.is_event]
    assert data[0] == b'{"part": 1,\n "text": "multi-line data joins with LF"}'
    assert json.loads(data[0] or b"")["part"] == 1 and data[-1] == b"[DONE]"
    assert tag_sse(frames[2].raw, "7").startswith(b"id: 7\r\ndata: ")


def test_truncated_stream_close_returns_partial_event() -> None:
    framer = SseFramer()
    frames = framer.feed(load("truncated-last-event.sse"))
    assert len(frames) == 3 and all(f.is_event for f in frames)
    assert framer.close() == Frame(b'data: {"cut": "before the blank line"', True, complete=False)
    assert framer.close() is None


def test_tag_replaces_upstream_id_in_fixture_block() -> None:
    block = SseFramer().feed(load("openai-responses.sse"))[2].raw
    event_line, rest = block.split(b"\n", 1)
    upstream = event_line + b"\nid: up-7\n" + rest
    tagged = tag_sse(upstream, "s1-3")
    assert tagged == b"id: s1-3\n" + block
    assert b"up-7" not in tagged


# ---- SSE line ends, CR split across chunks, BOM ---------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\r", b"\n\r\n"],  # httpx-sse style: CRLF split after the CR
        [b"data: a\r\n\r", b"\n"],  # the blank line's CRLF split
        [b"data: a\r\n", b"\r", b"\n"],
        [b"data: a\r\n\r\n"],
    ],
)
def test_crlf_split_across_chunks_gives_one_frame(chunks: list[bytes]) -> None:
    framer = SseFramer()
    assert [f for c in chunks for f in framer.feed(c)] == [Frame(b"data: a\r\n\r\n", True)]
    assert framer.close() is None


def test_trailing_cr_resolved_by_next_byte_or_close() -> None:
    framer = SseFramer()
    assert framer.feed(b"data: a\n\r") == []  # the CR may still become CRLF
    assert framer.feed(b"data: b\r\r") == [Frame(b"data: a\n\r", True)]
    assert framer.close() == Frame(b"data: b\r\r", True, complete=True)  # final CR is a line end


def test_cr_only_and_mixed_line_ends() -> None:
    stream = b"data: a\rdata: b\r\r: c\n\nevent: x\r\ndata\n\r\n\n"
    frames = frame_all(SseFramer(), [stream])
    assert [f.raw for f in frames] == [
        b"data: a\rdata: b\r\r",
        b": c\n\n",
        b"event: x\r\ndata\n\r\n",
        b"\n",
    ]
    assert [sse_data(f.raw) for f in frames] == [b"a\nb", None, b"", None]
    check_against_reference(stream, frames)


@pytest.mark.parametrize("eol", [b"\r", b"\r\n", b"\n"])
def test_blocks_with_many_lines(eol: bytes) -> None:
    # Past a few CR-ended lines the search switches strategy; the frames must not change.
    block = eol.join([b": c"] * 9 + [b"data: " + b"d" * n for n in range(12)]) + eol + eol
    stream = block * 3 + b"data: tail" + eol
    whole = frame_all(SseFramer(), [stream])
    assert [f.raw for f in whole] == [block] * 3 + [b"data: tail" + eol]
    assert [f.complete for f in whole] == [True, True, True, False]
    assert frame_all(SseFramer(), [stream[i : i + 1] for i in range(len(stream))]) == whole
    check_against_reference(stream, whole)


def test_bom_belongs_to_first_frame() -> None:
    for stream in (BOM + b"data: x\n\n", BOM + b"\ndata: x\n\n", BOM + b"\r"):
        whole = frame_all(SseFramer(), [stream])
        assert whole[0].raw.startswith(BOM)
        assert frame_all(SseFramer(), [stream[i : i + 1] for i in range(len(stream))]) == whole
        check_against_reference(stream, whole)
    tagged = tag_sse(BOM + b"data: x\r\n\r\n", "1")
    assert tagged == BOM + b"id: 1\r\ndata: x\r\n\r\n"  # the BOM still opens the stream


# ---- arbitrary bytes: reference parser, concatenation, chunk independence ---------------------

sse_bytes = st.one_of(
    st.binary(max_size=300),  # arbitrary bytes: NULs, invalid UTF-8, lone CRs
    st.lists(
        st.sampled_from(
            [b"\r", b"\n", b"\r\n", b"data", b"data:", b": ", b" ", b"id:", b"x", b"\x00", BOM]
        ),
        max_size=80,
    ).map(b"".join),
)


@given(sse_bytes, st.lists(st.integers(min_value=0), max_size=30))
def test_sse_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    whole = frame_all(SseFramer(), [stream])
    assert b"".join(f.raw for f in whole) == stream
    check_against_reference(stream, whole)
    assert frame_all(SseFramer(), split_at(stream, cuts)) == whole


@given(sse_bytes, st.lists(st.integers(min_value=0), max_size=30))
def test_ndjson_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    whole = frame_all(NdjsonFramer(), [stream])
    assert b"".join(f.raw for f in whole) == stream
    assert [f.raw for f in whole] == re.findall(rb"[^\n]*\n|[^\n]+\Z", stream)
    for f in whole:
        assert f.complete and f.is_event == bool(f.raw.strip())
        assert f.raw.endswith(b"\n") or f is whole[-1]
    assert frame_all(NdjsonFramer(), split_at(stream, cuts)) == whole


def test_ndjson_crlf_blank_lines_and_unterminated_last_line() -> None:
    frames = frame_all(NdjsonFramer(), [b'{"a":1}\r\n\r\n  \n{"b":2}'])
    assert frames == [
        Frame(b'{"a":1}\r\n', True),
        Frame(b"\r\n", False),
        Frame(b"  \n", False),
        Frame(b'{"b":2}', True, complete=True),
    ]
    framer = NdjsonFramer()
    framer.feed(b"{}\n")
    assert framer.close() is None


# ---- frame-size limit -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SseFramer, NdjsonFramer])
def test_megabyte_without_newline_raises_promptly(cls: type[Framer]) -> None:
    limit, chunk = 64 * 1024, b"x" * 4096
    framer = cls(max_frame_bytes=limit)
    fed = 0
    with pytest.raises(FrameTooLarge) as err:
        for _ in range(256):  # 1 MiB
            framer.feed(chunk)
            fed += len(chunk)
    assert err.value.limit == limit
    assert fed <= limit < fed + len(chunk)  # raised by the chunk that crossed the limit
    assert len(err.value.rest) == fed + len(chunk)  # every byte held back is handed back
    with pytest.raises(FrameTooLarge):
        cls().feed(b"y" * (DEFAULT_MAX_FRAME_BYTES + 1))


@pytest.mark.parametrize(("cls", "end"), [(SseFramer, b"\n\n"), (NdjsonFramer, b"\n")])
def test_limit_applies_to_complete_frames_too(cls: type[Framer], end: bytes) -> None:
    small = b"data: s" + end
    exact = b"data: " + b"z" * (100 - 6 - len(end)) + end
    assert cls(max_frame_bytes=100).feed(exact) == [Frame(exact, True)]
    with pytest.raises(FrameTooLarge) as err:
        cls(max_frame_bytes=100).feed(small + b"data: " + b"z" * 100 + end + small)
    assert err.value.frames == [Frame(small, True)]  # frames before the oversized one survive
    assert err.value.rest == b"data: " + b"z" * 100 + end + small  # and so does every byte
    framer = cls(max_frame_bytes=100)
    assert framer.feed(small) == [Frame(small, True)]
    with pytest.raises(FrameTooLarge):  # one oversized event as a chunk of its own
        framer.feed(b"data: " + b"z" * 100 + end)


# ---- round trip: encode random events, frame, read back, tag, re-frame ------------------------

line_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
sse_event = st.tuples(
    st.one_of(st.none(), line_text),  # event name
    st.lists(line_text, max_size=2),  # comments
    st.lists(line_text, min_size=1, max_size=4),  # data lines
    st.booleans(),  # with an upstream id line
)


@given(
    st.lists(sse_event, max_size=8),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_round_trip_encode_frame_tag(
    events: list[tuple[str | None, list[str], list[str], bool]], eol: str, cuts: list[int]
) -> None:
    blocks = []
    for i, (name, comments, data, with_id) in enumerate(events):
        lines = [f": {c}" for c in comments] + ([f"event: {name}"] if name is not None else [])
        lines += [f"id: up{i}"] if with_id else []
        lines += [f"data: {d}" for d in data]
        blocks.append("".join(ln + eol for ln in lines) + eol)
    stream = "".join(blocks).encode()
    frames = frame_all(SseFramer(), [stream])
    assert [f.raw for f in frames] == [b.encode() for b in blocks]
    assert all(f.is_event and f.complete for f in frames)
    for f, (_, _, data, _) in zip(frames, events, strict=True):
        assert sse_data(f.raw) == "\n".join(data).encode()

    tagged = b"".join(tag_sse(f.raw, f"r{i}") for i, f in enumerate(frames))
    reframed = frame_all(SseFramer(), split_at(tagged, cuts))
    assert len(reframed) == len(frames)
    for i, (new, old) in enumerate(zip(reframed, frames, strict=True)):
        new_lines = new.raw.splitlines(keepends=True)
        assert new_lines[0] == f"id: r{i}{eol}".encode()
        kept = [ln for ln in old.raw.splitlines(keepends=True) if not ln.startswith(b"id:")]
        assert new_lines[1:] == kept  # order, names, comments and data untouched
        assert sse_data(new.raw) == sse_data(old.raw)


# ---- one event per chunk (the framer's shortcut) --------------------------------------------

lf_stream = st.lists(sse_event, max_size=8).map(
    lambda events: b"".join(
        "".join(
            [f": {c}\n" for c in comments]
            + ([f"event: {name}\n"] if name is not None else [])
            + ([f"id: up{i}\n"] if with_id else [])
            + [f"data: {d}\n" for d in data]
            + ["\n"]
        ).encode()
        for i, (name, comments, data, with_id) in enumerate(events)
    )
)


def frames_grouped(frames: list[Frame], cuts: list[int]) -> list[bytes]:
    """The frames' bytes as chunks that start and end on frame boundaries: one frame per chunk,
    or several (a lone blank line and an event, two blocks split by CR CR, ...)."""
    bounds = [0, *sorted({c % (len(frames) + 1) for c in cuts}), len(frames)]
    chunks = [b"".join(f.raw for f in frames[a:b]) for a, b in itertools.pairwise(bounds)]
    return [chunk for chunk in chunks if chunk]


@given(
    st.one_of(sse_bytes, lf_stream, st.sampled_from([load(n) for n in SSE_COUNTS])),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_whole_blocks_per_chunk_frame_as_the_whole_stream(stream: bytes, cuts: list[int]) -> None:
    """LLM servers write each event as one chunk: the framer's shortcut for a chunk that is
    exactly one block gives the frames the general path gives, and is not taken for a chunk
    of several blocks."""
    whole = frame_all(SseFramer(), [stream])
    assert frame_all(SseFramer(), [f.raw for f in whole]) == whole
    assert frame_all(SseFramer(), frames_grouped(whole, cuts)) == whole


@given(
    st.one_of(sse_bytes, st.just(load("ollama-chat.ndjson"))),
    st.lists(st.integers(min_value=0), max_size=10),
)
def test_whole_lines_per_chunk_frame_as_the_whole_stream(stream: bytes, cuts: list[int]) -> None:
    whole = frame_all(NdjsonFramer(), [stream])
    assert frame_all(NdjsonFramer(), [f.raw for f in whole]) == whole
    assert frame_all(NdjsonFramer(), [b"", *frames_grouped(whole, cuts)]) == whole


def test_several_blocks_in_one_chunk_are_several_frames() -> None:
    framer = SseFramer()
    framer.feed(b"data: 0\n\n")
    assert framer.feed(b"data: a\r\rdata: b\n\n") == [
        Frame(b"data: a\r\r", True),
        Frame(b"data: b\n\n", True),
    ]
    assert framer.feed(b"\ndata: c\n\n") == [Frame(b"\n", False), Frame(b"data: c\n\n", True)]


# ---- helpers --------------------------------------------------------------------------------


def test_sse_data_field_forms() -> None:
    assert sse_data(b"data\n\n") == b""
    assert sse_data(b"data:x\ndata:  y\n\n") == b"x\n y"
    assert sse_data(b"data :x\nDATA: y\n: data: z\n\n") is None
    assert sse_data(b"event: e\r\nretry: 1\r\n\r\n") is None


def test_tag_sse_line_ends_and_id_forms() -> None:
    assert tag_sse(b"data: a\r\r", "5") == b"id: 5\rdata: a\r\r"
    assert tag_sse(b"id\nid: 3\nid :kept\ndata: a\n\n", "5") == b"id: 5\nid :kept\ndata: a\n\n"
    assert tag_sse(b"data: a", "5") == b"id: 5\ndata: a"  # unterminated: LF by default
    assert tag_sse(b"data: a\nid: 3\n\n", "5") == b"id: 5\ndata: a\n\n"  # id after data
    assert tag_sse(b"data: a\r\nid: 3\r\n\r\n", "5") == b"id: 5\r\ndata: a\r\n\r\n"
    assert tag_sse(b"data: a\nidx: 3\n\n", "5") == b"id: 5\ndata: a\nidx: 3\n\n"
    with pytest.raises(ValueError):
        tag_sse(b"data: a\n\n", "bad\nid")


def test_framing_of_content_types_is_case_insensitive() -> None:
    assert framing_of("text/event-stream") is Framing.SSE
    assert framing_of(" Text/Event-Stream ; charset=utf-8") is Framing.SSE
    assert framing_of("TEXT/EVENT-STREAM") is Framing.SSE
    assert framing_of("application/x-ndjson") is Framing.NDJSON
    assert framing_of("Application/JSONL; charset=UTF-8") is Framing.NDJSON
    for other in ("application/json-seq", "application/json", "text/plain", ""):
        assert framing_of(other) is None
    assert isinstance(framing.new_framer(Framing.SSE), SseFramer)
    assert isinstance(framing.new_framer(Framing.NDJSON), NdjsonFramer)
    with pytest.raises(ValueError):
        framing.new_framer(Framing.SSE, max_frame_bytes=0)
    sse = framing.new_framer(Framing.SSE, max_frame_bytes=10)
    with pytest.raises(FrameTooLarge):
        sse.feed(b"x" * 11)


@given(sse_bytes, st.integers(min_value=0, max_value=10**15 - 1))
def test_tagging_with_a_prebuilt_id_prefix_is_tagging(raw: bytes, seq: int) -> None:
    """The writer's hot path (`<session>:` built once per session, the seq appended) tags
    every block exactly as `tag_sse` does with the formatted id."""
    session = new_session_id()
    event_id = b"%s%d" % (event_id_prefix(session), seq)
    assert tag_sse_id(raw, event_id) == tag_sse(raw, format_event_id(session, seq))


@pytest.mark.parametrize("bad", ["a\nb", "a:b", "a b", "é", "", "A" * 21, "A" * 23])
def test_an_id_prefix_takes_only_a_relay_session_id(bad: str) -> None:
    with pytest.raises(ValueError, match="not a relay session id"):
        event_id_prefix(bad)
