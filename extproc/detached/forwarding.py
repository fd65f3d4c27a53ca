"""Which headers cross the relay on the detached path, in each direction.

The relay is a proxy here: what it does not own passes through, so a client sees what the
inline path (Envoy alone) would show it. Hop-by-hop headers (RFC 9110 §7.6.1: its list and
any that `Connection` names; also `Trailer`, as the relay passes no trailers on) describe one
connection, never the message, so they stay behind in both directions; the relay's own and
Envoy's internal headers never reach the LLM. Changed on purpose: `Accept-Encoding` (the relay
must read the stream as written; Envoy compresses toward clients that accept it), `Expect`
(the relay has read the whole body before it calls) and, on a logged stream, `Content-Length`
(the body gains `id:` lines).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

from extproc.session.ids import SESSION_HEADER

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade"}
)  # fmt: skip
# Set by the relay's HTTP client from the body it sends, or replaced below.
_NOT_FORWARDED = frozenset({"content-length", "accept-encoding", "expect"})
_INTERNAL_PREFIXES = ("x-relay-", "x-envoy-")
# On a stream the relay logs and serves as a reader, these are the relay's (the session id is
# set by the relay in any case).
_STREAM_OWN = frozenset({"content-length", "content-type", SESSION_HEADER})


def _hop_by_hop(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The fixed hop-by-hop names plus those this message's `Connection` header lists."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return HOP_BY_HOP | named


def upstream_request_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The client's request headers as the relay sends them to the LLM through egress: all of
    them (`Host`, a foreign `Last-Event-ID` included) but hop-by-hop and internal ones."""
    pairs = list(headers)
    dropped = _hop_by_hop(pairs) | _NOT_FORWARDED
    forwarded = CIMultiDict(
        (name, value)
        for name, value in pairs
        if name.lower() not in dropped and not name.lower().startswith(_INTERNAL_PREFIXES)
    )
    # The framer needs the bytes as written; Envoy's public listener compresses toward clients
    # that accept it (JSON), and the inline routes ask the LLM for identity just the same.
    forwarded["Accept-Encoding"] = "identity"
    return forwarded


def pass_through_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """A response relayed as-is (JSON, errors, binary): every end-to-end header, its
    `Content-Length` included, as the body's bytes are unchanged."""
    pairs = list(headers)
    dropped = _hop_by_hop(pairs)
    return CIMultiDict((name, value) for name, value in pairs if name.lower() not in dropped)


def stream_response_headers(
    upstream: Iterable[tuple[str, str]], own: Mapping[str, str]
) -> CIMultiDict[str]:
    """A logged stream's first response: the upstream's end-to-end headers and the relay's
    `own` (session id, content type, caching): the session id and content type replace the
    upstream's, the rest only fill in what the upstream did not say. `Content-Length` goes, as
    the body gains `id:` lines."""
    pairs = list(upstream)
    dropped = _hop_by_hop(pairs) | _STREAM_OWN
    merged = CIMultiDict((name, value) for name, value in pairs if name.lower() not in dropped)
    for name, value in own.items():
        if name.lower() in _STREAM_OWN or name.lower() not in merged:
            merged[name] = value
    return merged
