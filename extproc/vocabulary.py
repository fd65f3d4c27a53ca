"""The relay's fixed lists, each defined once: every layer (the log, the fronts, metrics labels,
`stream-relay status`, the Envoy renderer) uses these, so no second copy can drift."""

from __future__ import annotations

import re
from enum import StrEnum

# The calls that generate a streamed answer: the path (without its query) of a POST that the
# relay may detach. Envoy's `generations` route matches it (RE2 `safe_regex`, whole path); the
# processor matches it for requests that arrive without a route's write path (node default).
GENERATION_PATHS = "/v1/(chat/completions|completions|responses|messages)|/api/(chat|generate)"
GENERATION_PATH = re.compile(GENERATION_PATHS)


class WritePath(StrEnum):
    """Who writes a session's log: Envoy's ext_proc stream, or the relay's own upstream call."""

    DETACHED = "detached"  # the default
    INLINE = "inline"


class EndState(StrEnum):
    OPEN = "open"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


ENDED = (EndState.DONE, EndState.CANCELLED, EndState.FAILED)


class Framing(StrEnum):
    """How a stream is cut into events; recorded on the log once, from its content type."""

    SSE = "sse"
    NDJSON = "ndjson"


class ReaderProtocol(StrEnum):
    """How a reader is attached. HTTP is the original endpoint (a resume, or a detached
    generation's first client)."""

    HTTP = "http"
    SSE = "sse"
    WS = "ws"
    GRPC = "grpc"


class ResumeOutcome(StrEnum):
    """What a client that came back with an event id found."""

    HIT = "hit"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    FORBIDDEN = "forbidden"
    MALFORMED = "malformed"
    CONFLICT = "conflict"  # the id's session was created by another request


class StoreOp(StrEnum):
    """Calls to a shared store, the label of its error counter."""

    SYNC = "sync"
    LOOKUP = "lookup"
    FOLLOW = "follow"
    HEARTBEAT = "heartbeat"
    CANCEL = "cancel"
    SHARE = "share"


class FenceReason(StrEnum):
    """Why a node stopped writing a session it had copied to the shared store."""

    LEASE_LAPSED = "lease_lapsed"  # this node stalled or lost Redis past its lease
    ENDED_ELSEWHERE = "ended_elsewhere"  # another node ended it (found this node's lease gone)


class DropReason(StrEnum):
    """Why a store let go of a session's log."""

    EVICTED = "evicted"
    EXPIRED = "expired"
