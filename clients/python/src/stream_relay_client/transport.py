"""httpx transports that make a relay event stream's body survive broken connections."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import httpx

from ._protocol import RetryPolicy, is_resumable
from ._resume import AsyncResumer, SyncResumer


def _response(
    first: httpx.Response, stream: httpx.SyncByteStream | httpx.AsyncByteStream
) -> httpx.Response:
    # A new Response: the client rebinds `.stream` of what we return, and the resumer still
    # reads the first one.
    return httpx.Response(
        first.status_code, headers=first.headers, stream=stream, extensions=first.extensions
    )


class ResumingTransport(httpx.BaseTransport):
    """Wraps `inner`. A `200 text/event-stream` response with `x-relay-session` gets a body
    that, when its connection breaks, sends the same request again with `Last-Event-ID` and
    carries on: the application reads one uninterrupted body, every event exactly once.

    Request bodies are read into memory first, so that they can be sent again.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ) -> None:
        self.inner = inner if inner is not None else httpx.HTTPTransport()
        self.policy = policy if policy is not None else RetryPolicy()
        self._sleep = sleep
        self._seed = seed

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self.inner.handle_request(request)
        if not is_resumable(response):
            return response
        resumer = SyncResumer(
            request,
            response,
            send=self.inner.handle_request,
            chunks=lambda r: r.iter_raw(),
            policy=self.policy,
            sleep=self._sleep,
            seed=self._seed,
        )
        return _response(response, resumer)

    def close(self) -> None:
        self.inner.close()


class AsyncResumingTransport(httpx.AsyncBaseTransport):
    """`ResumingTransport` for `httpx.AsyncClient`."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        seed: int | None = None,
    ) -> None:
        self.inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self.policy = policy if policy is not None else RetryPolicy()
        self._sleep = sleep
        self._seed = seed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        response = await self.inner.handle_async_request(request)
        if not is_resumable(response):
            return response
        resumer = AsyncResumer(
            request,
            response,
            send=self.inner.handle_async_request,
            chunks=lambda r: r.aiter_raw(),
            policy=self.policy,
            sleep=self._sleep,
            seed=self._seed,
        )
        return _response(response, resumer)

    async def aclose(self) -> None:
        await self.inner.aclose()
