"""The relay's error tree: every error a client can see, with its HTTP status and gRPC code.

    RelayError
    ├── InvalidArgument         400  INVALID_ARGUMENT   a malformed session id, share token or ttl
    │   └── MalformedEventId    400  INVALID_ARGUMENT   an event id that is malformed, another
    │                                                   session's, or not sent yet
    ├── Unauthenticated         401  UNAUTHENTICATED    Envoy's identity cannot be read losslessly
    ├── SessionNotFound         404  NOT_FOUND          unknown id, or one the caller may not read
    │   └── AccessDenied        404  NOT_FOUND          (the latter, told apart only in metrics)
    ├── SessionGone             410  NOT_FOUND          existed, but expired or evicted; or an
    │                                                   id past a finished session's end
    ├── OriginNotAllowed        403  PERMISSION_DENIED  a WebSocket from an origin not granted (*)
    ├── SessionConflict         409  FAILED_PRECONDITION not possible in the session's state, or
    │                                                   a resume that is not the session's request
    ├── RequestTooLarge         413  RESOURCE_EXHAUSTED a declared request body over the limit (*)
    ├── LimitExceeded           429  RESOURCE_EXHAUSTED a documented limit was hit
    ├── UpstreamUnreachable     502  UNAVAILABLE        the LLM could not be reached
    ├── StoreUnavailable        503  UNAVAILABLE        the session store cannot be reached
    └── RelayUnavailable        503  UNAVAILABLE        no relay node answered (*)

Each front (HTTP, gRPC) maps these once, at its edge; nothing else builds error responses.
(*) Answered by Envoy itself (direct or local replies rendered from these classes' codes by
extproc/ops/), since the relay is not involved or not there; UpstreamUnreachable is answered
by both, Envoy when its own call to the LLM fails.
"""

from __future__ import annotations

import json
from typing import ClassVar

import grpc


class RelayError(Exception):
    """Base of every client-visible relay error."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def json_body(self) -> bytes:
        """OpenAI-shaped error body, so SDKs surface the message as they do for upstream errors."""
        error = {"message": self.message, "type": "relay_error", "code": self.code}
        return json.dumps({"error": error}).encode()


class InvalidArgument(RelayError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    code = "invalid_argument"


class MalformedEventId(InvalidArgument):
    code = "malformed_event_id"


class Unauthenticated(RelayError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    code = "invalid_identity"


class SessionNotFound(RelayError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    code = "session_not_found"


class AccessDenied(SessionNotFound):
    """Someone else's session: answered exactly as an unknown id, so ids cannot be probed;
    only the relay's own metrics tell the two apart."""


class SessionGone(RelayError):
    http_status = 410
    grpc_code = grpc.StatusCode.NOT_FOUND
    code = "session_gone"


class OriginNotAllowed(RelayError):
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    code = "origin_not_allowed"


class SessionConflict(RelayError):
    http_status = 409
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    code = "session_conflict"


class RequestTooLarge(RelayError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "request_too_large"


class LimitExceeded(RelayError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    code = "limit_exceeded"


class UpstreamUnreachable(RelayError):
    http_status = 502
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "upstream_unreachable"


class StoreUnavailable(RelayError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "store_unavailable"


class RelayUnavailable(RelayError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    code = "relay_unavailable"


class ConfigError(ValueError):
    """Invalid flags or configuration; the CLI prints it as one line and exits 2."""
