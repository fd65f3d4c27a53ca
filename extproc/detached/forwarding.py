"""Which headers cross the relay on the detached path, in each direction.

The relay is a proxy here: what it does not own passes through. Hop-by-hop headers (RFC 9110
§7.6.1) describe one connection, never the message, so they stay behind in both directions;
the relay's own and Envoy's internal headers never reach the LLM.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

from extproc.session.ids import LAST_EVENT_ID_HEADER

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade"}
)  # fmt: skip
# Never sent upstream: what the relay's own client sets (host, length, encoding), and what
# asks for a resume.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "accept-encoding", LAST_EVENT_ID_HEADER}
_INTERNAL_PREFIXES = ("x-relay-", "x-envoy-")
# aiohttp frames the body itself, so the upstream's length goes with the hop-by-hop headers.
_NOT_RELAYED = HOP_BY_HOP | {"content-length"}


def upstream_request_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The client's request headers as the relay sends them to the LLM through egress."""
    forwarded = CIMultiDict(
        (name, value)
        for name, value in headers
        if name.lower() not in _NOT_FORWARDED and not name.lower().startswith(_INTERNAL_PREFIXES)
    )
    forwarded["Accept-Encoding"] = "identity"  # the framer needs the bytes as sent
    return forwarded


def client_response_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's response headers as the relay passes them to its client."""
    return CIMultiDict((name, value) for name, value in headers if name.lower() not in _NOT_RELAYED)
