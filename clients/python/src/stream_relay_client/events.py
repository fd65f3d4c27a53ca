"""Iterate a relay event stream as parsed events, resuming across broken connections."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx

from ._protocol import Event, EventDecoder, RetryPolicy
from ._resume import AsyncResumer, SyncResumer
from .errors import error_for_response


def stream_events(
    client: httpx.Client,
    method: str,
    url: str | httpx.URL,
    *,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> Iterator[Event]:
    """Send the request (`kwargs` as for `client.build_request`) and yield its events, each
    exactly once, reconnecting with `Last-Event-ID` whenever the connection breaks.

    A failed first request raises the typed error for its status (e.g. `SessionNotFound`).
    """
    headers = httpx.Headers(kwargs.pop("headers", None))
    headers.setdefault("Accept", "text/event-stream")
    request = client.build_request(method, url, headers=headers, **kwargs)
    response = client.send(request, stream=True)
    try:
        if response.status_code != 200:
            body = response.read()
            raise error_for_response(response.status_code, body, None)
        resumer = SyncResumer(
            request,
            response,
            send=lambda r: client.send(r, stream=True),
            chunks=lambda r: r.iter_bytes(),
            policy=policy if policy is not None else RetryPolicy(),
            sleep=sleep,
        )
        decoder = EventDecoder()
        try:
            for blocks in resumer.blocks():
                for block in blocks:
                    if (event := decoder.decode(block)) is not None:
                        yield event
        finally:
            resumer.close()  # a partial event at the end is not an event: dropped
    finally:
        response.close()


async def astream_events(
    client: httpx.AsyncClient,
    method: str,
    url: str | httpx.URL,
    *,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    **kwargs: Any,
) -> AsyncIterator[Event]:
    """`stream_events` for `httpx.AsyncClient`."""
    headers = httpx.Headers(kwargs.pop("headers", None))
    headers.setdefault("Accept", "text/event-stream")
    request = client.build_request(method, url, headers=headers, **kwargs)
    response = await client.send(request, stream=True)
    try:
        if response.status_code != 200:
            body = await response.aread()
            raise error_for_response(response.status_code, body, None)
        resumer = AsyncResumer(
            request,
            response,
            send=lambda r: client.send(r, stream=True),
            chunks=lambda r: r.aiter_bytes(),
            policy=policy if policy is not None else RetryPolicy(),
            sleep=sleep,
        )
        decoder = EventDecoder()
        try:
            async for blocks in resumer.blocks():
                for block in blocks:
                    if (event := decoder.decode(block)) is not None:
                        yield event
        finally:
            await resumer.aclose()
    finally:
        await response.aclose()


__all__ = ["astream_events", "stream_events"]
