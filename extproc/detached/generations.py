"""The detached write path: the relay makes the upstream call itself and writes the log.

Envoy re-routes a generation request here; the relay sends it back out through Envoy's
egress listener (so Envoy keeps load balancing, retries, TLS and upstream stats) and every
client, the first one included, reads the log as a cursor. A client that drops does not stop
the generation: it runs while a reader is attached and for `grace_s` after the last one
leaves, then the upstream request is cancelled and the log ends `cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from extproc.access.grants import AccessLimits
from extproc.access.identity import IDENTITY_HEADER, JWT_PAYLOAD_HEADER, owner_key
from extproc.errors import ConfigError, LimitExceeded, StoreUnavailable, UpstreamUnreachable
from extproc.session.framing import framer_for
from extproc.session.log import Cursor, EndState, SessionLog, WritePath
from extproc.session.writer import SessionWriter
from extproc.store import SessionStore

log = logging.getLogger("stream_relay.detached")

DEFAULT_GRACE_S = 30.0
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_READERS_PER_SESSION = 1000
# Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, never the message.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade"}
)  # fmt: skip
# Also never sent upstream: what the relay's own client sets, or what asks for a resume.
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "accept-encoding", "last-event-id"}


@dataclass(frozen=True, kw_only=True)
class DetachSettings:
    egress_url: str = ""  # Envoy's egress listener, e.g. http://127.0.0.1:10001; "" = disabled
    grace_s: float = DEFAULT_GRACE_S  # generation outlives its last reader by this long
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a generation request body, at most
    max_readers_per_session: int = DEFAULT_MAX_READERS_PER_SESSION

    def __post_init__(self) -> None:
        if self.grace_s < 0:
            raise ConfigError(f"detach grace must be >= 0 seconds, got {self.grace_s}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"max request bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_readers_per_session < 1:
            raise ConfigError(
                f"max readers per session must be >= 1, got {self.max_readers_per_session}"
            )


def owner_of(request: web.Request) -> str:
    """The owner key of the caller Envoy authenticated ("" when auth is off)."""
    return owner_key(request.headers.get(IDENTITY_HEADER), request.headers.get(JWT_PAYLOAD_HEADER))


class Generation:
    """One upstream call that the relay makes and owns."""

    __slots__ = ("grace_check", "grace_timer", "log", "task")

    def __init__(self, log: SessionLog, task: asyncio.Task[None]) -> None:
        self.log = log
        self.task = task
        self.grace_timer: asyncio.TimerHandle | None = None
        self.grace_check: asyncio.Task[None] | None = None  # asking other nodes for readers


class Generations:
    """Running detached generations and the readers attached to every session."""

    def __init__(
        self,
        store: SessionStore,
        settings: DetachSettings,
        *,
        max_frame_bytes: int,
        access: AccessLimits | None = None,
    ) -> None:
        self._store = store
        self.settings = settings
        self.access = access or AccessLimits()
        self._readers_by_identity: dict[str, int] = {}
        self._max_frame_bytes = max_frame_bytes
        self._running: dict[str, Generation] = {}
        self._readers: dict[str, int] = {}
        self._http: aiohttp.ClientSession | None = None
        self._cursors: set[Cursor] = set()  # attached readers' positions, for the lag gauge
        store.on_cancel = lambda session_id: self.cancel(session_id, "cancelled by owner")
        store.reader_counts = self._readers.copy
        store.metrics.generations_running.set_function(lambda: len(self._running))
        store.metrics.reader_lag_max.set_function(self._max_lag)

    def readers(self, session_id: str) -> int:
        return self._readers.get(session_id, 0)

    @property
    def running(self) -> int:
        return len(self._running)

    async def close(self) -> None:
        """Shutdown: cancel every generation (their logs end `cancelled`)."""
        for generation in list(self._running.values()):
            generation.task.cancel("relay node shutting down")
        await asyncio.gather(*(g.task for g in self._running.values()), return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    @contextlib.contextmanager
    def reading(
        self, target: Cursor | SessionLog, *, protocol: str = "sse", identity: str = ""
    ) -> Iterator[None]:
        """Count a reader on a session for as long as it reads; enforces the reader limits
        (per session, and per identity on this node).

        Given the reader's cursor, also counts how much history it was replayed.
        """
        with self._identity_reading(identity), self._session_reading(target, protocol):
            yield

    @contextlib.contextmanager
    def _identity_reading(self, identity: str) -> Iterator[None]:
        if not identity:
            yield
            return
        count = self._readers_by_identity.get(identity, 0)
        if count >= self.access.max_readers_per_identity:
            raise LimitExceeded(
                f"{count} readers attached for this identity "
                f"(limit {self.access.max_readers_per_identity})"
            )
        self._readers_by_identity[identity] = count + 1
        try:
            yield
        finally:
            left = self._readers_by_identity[identity] - 1
            if left:
                self._readers_by_identity[identity] = left
            else:
                del self._readers_by_identity[identity]

    @contextlib.contextmanager
    def _session_reading(self, target: Cursor | SessionLog, protocol: str) -> Iterator[None]:
        cursor = target if isinstance(target, Cursor) else None
        session = target.log if isinstance(target, Cursor) else target
        session_id = session.session_id
        count = self._readers.get(session_id, 0)
        if count >= self.settings.max_readers_per_session:
            raise LimitExceeded(
                f"session already has {count} readers "
                f"(limit {self.settings.max_readers_per_session})"
            )
        self._readers[session_id] = count + 1
        self._store.readers_changed(session_id)
        session.peak_readers = max(session.peak_readers, count + 1)
        generation = self._running.get(session_id)
        if generation is not None and generation.grace_timer is not None:
            generation.grace_timer.cancel()
            generation.grace_timer = None
        metrics = self._store.metrics
        metrics.reader_connects.labels(protocol).inc()
        metrics.readers_active.labels(protocol).inc()
        start = cursor.seq if cursor is not None else 0
        if cursor is not None:
            metrics.replay_depth.observe(max(0, session.last_seq - start))
            self._cursors.add(cursor)
        try:
            yield
        finally:
            metrics.readers_active.labels(protocol).dec()
            if cursor is not None:
                self._cursors.discard(cursor)
            if session.state is EndState.OPEN and not session.gone_reason:
                metrics.client_disconnects.labels(protocol).inc()
            left = self._readers[session_id] - 1
            self._store.readers_changed(session_id)
            if left:
                self._readers[session_id] = left
            else:
                del self._readers[session_id]
                self._last_reader_left(session_id)

    def _max_lag(self) -> int:
        return max((c.log.last_seq - c.seq for c in self._cursors), default=0)

    def cancel(self, session_id: str, reason: str) -> bool:
        """Stop a running generation; False if none runs for this session."""
        generation = self._running.get(session_id)
        if generation is None:
            return False
        generation.task.cancel(reason)
        return True

    def _last_reader_left(self, session_id: str) -> None:
        generation = self._running.get(session_id)
        if generation is None:
            return
        loop = asyncio.get_running_loop()
        generation.grace_timer = loop.call_later(
            self.settings.grace_s, self._grace_over, session_id
        )

    def _grace_over(self, session_id: str) -> None:
        generation = self._running.get(session_id)
        if generation is not None:
            generation.grace_timer = None
            generation.grace_check = asyncio.create_task(self._grace_check(session_id))

    async def _grace_check(self, session_id: str) -> None:
        """The grace is over here; readers on other nodes (a shared store) still count, and
        so does not knowing: a store that cannot answer never cancels a generation."""
        try:
            elsewhere = await self._store.remote_readers(session_id)
        except StoreUnavailable:
            elsewhere = 1
        if elsewhere:
            if session_id not in self._readers:
                self._last_reader_left(session_id)  # look again after another grace
            return
        if session_id in self._readers:  # a reader came back while we asked
            return
        if self.cancel(session_id, f"no reader for {self.settings.grace_s:g}s"):
            self._store.metrics.grace_cancellations.inc()

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                auto_decompress=False,
            )
        return self._http

    async def open(self, request: web.Request, path: str, *, owner: str) -> aiohttp.ClientResponse:
        """Send the client's request upstream through Envoy's egress; return its response."""
        if not self.settings.egress_url:
            raise UpstreamUnreachable("the detached path is not configured (no --egress-url)")
        limit = self.access.max_sessions_per_identity
        if owner and self._store.open_sessions(owner) >= limit:
            raise LimitExceeded(f"{limit} open sessions for this identity (limit)")
        body = bytearray()
        async for chunk in request.content.iter_any():  # the whole body, however it arrives
            body += chunk
            if len(body) > self.settings.max_request_bytes:
                raise LimitExceeded(
                    f"request body larger than {self.settings.max_request_bytes} bytes"
                )
        headers = CIMultiDict(
            (k, v)
            for k, v in request.headers.items()
            if k.lower() not in _NOT_FORWARDED
            and not k.lower().startswith(("x-relay-", "x-envoy-"))
        )
        headers["Accept-Encoding"] = "identity"  # the framer needs the bytes as sent
        url = self.settings.egress_url.rstrip("/") + "/" + path
        try:
            return await self._client().request(
                request.method, url, params=request.query, data=bytes(body), headers=headers
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"upstream unreachable: {exc!r}") from exc

    def start(self, response: aiohttp.ClientResponse, *, owner: str = "") -> SessionLog | None:
        """If the upstream answered with an event stream, log it in the background."""
        content_type = response.headers.get("Content-Type", "")
        framer = framer_for(content_type, max_frame_bytes=self._max_frame_bytes)
        if response.status != 200 or framer is None:
            return None
        session = self._store.create(
            content_type=content_type, write_path=WritePath.DETACHED, owner=owner
        )
        writer = SessionWriter(self._store, session, framer)
        task = asyncio.create_task(self._produce(writer, response))
        self._running[session.session_id] = Generation(session, task)
        task.add_done_callback(lambda _: self._finished(session.session_id))
        return session

    def _finished(self, session_id: str) -> None:
        generation = self._running.pop(session_id, None)
        if generation is not None and generation.grace_timer is not None:
            generation.grace_timer.cancel()

    async def _produce(self, writer: SessionWriter, response: aiohttp.ClientResponse) -> None:
        try:
            async for chunk in response.content.iter_any():
                writer.feed(chunk)
            writer.close()
        except asyncio.CancelledError as exc:
            self._store.end(writer.log, EndState.CANCELLED, str(exc.args[0]) if exc.args else "")
        except (aiohttp.ClientError, OSError) as exc:
            self._store.end(writer.log, EndState.FAILED, f"upstream connection lost: {exc!r}")
        finally:
            response.close()
