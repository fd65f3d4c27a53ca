"""The client's error tree: everything it raises on its own is a `RelayClientError`."""

from __future__ import annotations

import json


class RelayClientError(Exception):
    """A resume could not continue the stream. `status_code` and `code` come from the relay's
    typed JSON error (`{"error": {"message", "type", "code"}}`) when there was one."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        session: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.session = session


class SessionExpired(RelayClientError):
    """410: the session expired or was evicted; its events are gone."""


class SessionNotFound(RelayClientError):
    """404: the relay does not know the session."""


class Forbidden(RelayClientError):
    """401 or 403: the resume was refused."""


class RetryBudgetExhausted(RelayClientError):
    """Every reconnect allowed for this stream failed; `__cause__` is the last failure."""

    def __init__(self, message: str, *, reconnects: int, session: str | None = None) -> None:
        super().__init__(message, session=session)
        self.reconnects = reconnects


_BY_STATUS: dict[int, type[RelayClientError]] = {
    401: Forbidden,
    403: Forbidden,
    404: SessionNotFound,
    410: SessionExpired,
}


def error_for_response(status_code: int, body: bytes, session: str | None) -> RelayClientError:
    """The typed error for a failed (re)connect, from its status and JSON error body."""
    message, code = f"HTTP {status_code}", None
    try:
        error = json.loads(body)["error"]
        message = f"HTTP {status_code}: {error['message']}"
        code = str(error["code"])
    except (ValueError, KeyError, TypeError):
        if body:
            message = f"HTTP {status_code}: {body[:200].decode('utf-8', 'replace')}"
    cls = _BY_STATUS.get(status_code, RelayClientError)
    return cls(message, status_code=status_code, code=code, session=session)
