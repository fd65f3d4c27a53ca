"""Clients for stream-relay: resume a broken event stream with `Last-Event-ID`, transparently.

- `ResumingTransport` / `AsyncResumingTransport`: httpx transports; any httpx-based client
  (the OpenAI SDK included) reads one uninterrupted body.
- `stream_events` / `astream_events`: parsed `Event`s from an `httpx.Client`/`AsyncClient`.
- `ResumeState`: the sans-IO state machine both are built on.
"""

from ._protocol import Event, EventDecoder, ResumeState, RetryPolicy
from .errors import (
    Forbidden,
    RelayClientError,
    RetryBudgetExhausted,
    SessionExpired,
    SessionNotFound,
)
from .events import astream_events, stream_events
from .transport import AsyncResumingTransport, ResumingTransport

__all__ = [
    "AsyncResumingTransport",
    "Event",
    "EventDecoder",
    "Forbidden",
    "RelayClientError",
    "ResumeState",
    "ResumingTransport",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "SessionExpired",
    "SessionNotFound",
    "astream_events",
    "stream_events",
]
