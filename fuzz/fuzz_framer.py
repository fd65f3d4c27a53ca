"""Coverage-guided fuzzing (atheris) of the SSE and NDJSON framers and the event id parser.

    pip install atheris   # a libFuzzer build for CPython; not needed by the test suite
    python fuzz/fuzz_framer.py -max_total_time=60 -max_len=4096 [corpus-dir]

Each input picks a framer, a frame-size limit and split points, then feeds the rest as a
stream. Any exception other than FrameTooLarge, or a broken invariant, is a crash:
- the frames' raw bytes, in order, are exactly the input (plus, after FrameTooLarge, the
  refused rest: nothing lost, nothing invented);
- the frames do not depend on how the input was chunked;
- an event id is either refused (MalformedEventId) or round-trips exactly.
tests/test_framing.py and tests/test_hostile.py check the same properties with hypothesis in CI.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from extproc.errors import MalformedEventId
    from extproc.session.framing import Frame, FrameTooLarge, NdjsonFramer, SseFramer
    from extproc.session.ids import format_event_id, parse_event_id

FRAMERS = (SseFramer, NdjsonFramer)


def _run(
    cls: type[SseFramer] | type[NdjsonFramer], limit: int, chunks: list[bytes]
) -> tuple[list[Frame], bytes | None]:
    """All frames, and the refused rest if the limit was hit (None if it was not)."""
    framer = cls(max_frame_bytes=limit)
    frames: list[Frame] = []
    try:
        for chunk in chunks:
            frames += framer.feed(chunk)
    except FrameTooLarge as exc:
        return frames + exc.frames, exc.rest
    last = framer.close()
    return frames + ([last] if last is not None else []), None


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cls = FRAMERS[fdp.ConsumeIntInRange(0, 1)]
    limit = fdp.ConsumeIntInRange(1, 4096)
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 16)))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    points = [0, *(c for c in cuts if c <= len(stream)), len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]

    frames, rest = _run(cls, limit, chunks)
    out = b"".join(f.raw for f in frames) + (rest or b"")
    if rest is None:
        assert out == stream, "frames are not exactly the input"
        whole, whole_rest = _run(cls, limit, [stream])
        assert whole_rest is None and whole == frames, "frames depend on the chunking"
    else:
        assert stream.startswith(out), "bytes invented or reordered before the limit"
        assert all(len(f.raw) <= limit for f in frames), "a frame over the limit was returned"

    text = stream[:200].decode("utf-8", errors="replace")
    try:
        parsed = parse_event_id(text)
    except MalformedEventId:
        return
    assert format_event_id(parsed.session, parsed.seq) == text, "id does not round-trip"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
