"""The I/O around `ResumeState`: keep reading, and on a break send the request again with
`Last-Event-ID`. One driver per I/O flavour; the decisions are all in `_protocol`."""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator

import anyio
import httpx

from ._protocol import (
    RESUMABLE_ERRORS,
    RETRYABLE_STATUSES,
    SESSION_HEADER,
    ResumeState,
    RetryPolicy,
    resume_request,
)
from .errors import RelayClientError, RetryBudgetExhausted, error_for_response

Send = Callable[[httpx.Request], httpx.Response]
AsyncSend = Callable[[httpx.Request], Awaitable[httpx.Response]]
Chunks = Callable[[httpx.Response], Iterator[bytes]]
AsyncChunks = Callable[[httpx.Response], AsyncIterator[bytes]]


class _Driver:
    """What both flavours share: state, budget, and what a reconnect's answer means."""

    def __init__(
        self,
        request: httpx.Request,
        response: httpx.Response,
        policy: RetryPolicy,
        seed: int | None,
    ) -> None:
        self.request = request
        self.session = response.headers.get(SESSION_HEADER)
        self.state = ResumeState(self.session, request.headers.get("last-event-id"))
        self.policy = policy
        self.rng = random.Random(seed)
        self.reconnects = 0
        self.tail = b""  # a partial event at a clean end of the stream

    def next_delay(self, cause: BaseException | None) -> float:
        """Seconds until the next reconnect; raises when none is left (or none is possible)."""
        if self.state.last_event_id is None and cause is not None:
            raise cause  # no session and no id: nothing to resume from
        if self.reconnects >= self.policy.max_reconnects:
            raise RetryBudgetExhausted(
                f"stream of session {self.session} broke; {self.reconnects} reconnects failed",
                reconnects=self.reconnects,
                session=self.session,
            ) from cause
        delay = self.policy.delay(self.reconnects, self.state.retry_ms, self.rng)
        self.reconnects += 1
        return delay

    def next_request(self) -> httpx.Request:
        return resume_request(self.request, self.state.reconnect())

    def check(self, response: httpx.Response, body: bytes) -> RelayClientError | None:
        """None if `response` (200) continues the stream; the error it stands for otherwise.
        Raises the errors that end the stream; returns the ones worth another reconnect."""
        if response.status_code in RETRYABLE_STATUSES:
            return error_for_response(response.status_code, body, self.session)
        if response.status_code != 200:
            raise error_for_response(response.status_code, body, self.session)
        if response.headers.get(SESSION_HEADER) != self.session:
            raise RelayClientError(
                "the resume was not answered from the session's log (is the relay up?)",
                status_code=200,
                session=self.session,
            )
        return None


class SyncResumer(_Driver, httpx.SyncByteStream):
    """The body of `response`, continued across broken connections by resending `request`."""

    def __init__(
        self,
        request: httpx.Request,
        response: httpx.Response,
        *,
        send: Send,
        chunks: Chunks,
        policy: RetryPolicy,
        sleep: Callable[[float], None],
        seed: int | None = None,
    ) -> None:
        super().__init__(request, response, policy, seed)
        self._current: httpx.Response | None = response
        self._send, self._chunks, self._sleep = send, chunks, sleep
        self._blocks: Generator[list[bytes], None, None] | None = None

    def blocks(self) -> Generator[list[bytes], None, None]:
        """Whole events, chunk by chunk; `tail` holds a partial event left at a clean end."""
        cause: BaseException | None = None
        while True:
            if (response := self._current) is not None:
                try:
                    for chunk in self._chunks(response):
                        if blocks := self.state.feed(chunk):
                            yield blocks
                except RESUMABLE_ERRORS as exc:
                    cause = exc
                else:
                    blocks, self.tail = self.state.finish()
                    if blocks:
                        yield blocks
                    return
                finally:
                    self._current = None
                    response.close()
            self._sleep(self.next_delay(cause))
            try:
                response = self._send(self.next_request())
            except RESUMABLE_ERRORS as exc:
                cause = exc
                continue
            if response.status_code == 204:  # an EventSource endpoint: nothing is left
                response.close()
                return
            body = b""
            if response.status_code != 200:
                body = response.read()
                response.close()
            try:
                cause = self.check(response, body)
            except RelayClientError:
                response.close()
                raise
            if cause is None:
                self._current = response

    def __iter__(self) -> Iterator[bytes]:
        self._blocks = self.blocks()
        for blocks in self._blocks:
            yield b"".join(blocks)
        if self.tail:
            yield self.tail

    def close(self) -> None:
        if self._blocks is not None:
            self._blocks.close()
        if self._current is not None:
            self._current.close()
            self._current = None


class AsyncResumer(_Driver, httpx.AsyncByteStream):
    """`SyncResumer`, for async I/O."""

    def __init__(
        self,
        request: httpx.Request,
        response: httpx.Response,
        *,
        send: AsyncSend,
        chunks: AsyncChunks,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        seed: int | None = None,
    ) -> None:
        super().__init__(request, response, policy, seed)
        self._current: httpx.Response | None = response
        self._send, self._chunks, self._sleep = send, chunks, sleep
        self._blocks: AsyncGenerator[list[bytes], None] | None = None

    async def blocks(self) -> AsyncGenerator[list[bytes], None]:
        cause: BaseException | None = None
        while True:
            if (response := self._current) is not None:
                try:
                    async for chunk in self._chunks(response):
                        if blocks := self.state.feed(chunk):
                            yield blocks
                except RESUMABLE_ERRORS as exc:
                    cause = exc
                else:
                    blocks, self.tail = self.state.finish()
                    if blocks:
                        yield blocks
                    return
                finally:
                    self._current = None
                    await response.aclose()
            await self._sleep(self.next_delay(cause))
            try:
                response = await self._send(self.next_request())
            except RESUMABLE_ERRORS as exc:
                cause = exc
                continue
            if response.status_code == 204:
                await response.aclose()
                return
            body = b""
            if response.status_code != 200:
                body = await response.aread()
                await response.aclose()
            try:
                cause = self.check(response, body)
            except RelayClientError:
                await response.aclose()
                raise
            if cause is None:
                self._current = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._blocks = self.blocks()
        async for blocks in self._blocks:
            yield b"".join(blocks)
        if self.tail:
            yield self.tail

    async def aclose(self) -> None:
        if self._blocks is not None:
            await self._blocks.aclose()
        if self._current is not None:
            await self._current.aclose()
            self._current = None
