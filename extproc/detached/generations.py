"""The detached write path: the relay makes the upstream call itself and writes the log.

Envoy re-routes a generation request here; the relay sends it back out through Envoy's
egress listener (so Envoy keeps load balancing, retries, TLS and upstream stats) and every
client, the first one included, reads the log as a cursor. A client that drops does not stop
the generation: it runs while a reader is attached (on any node) and for `detach_grace` after
the last one leaves, then the upstream request is cancelled and the log ends `cancelled`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from extproc.access.quota import Slot
from extproc.detached.forwarding import upstream_request_headers
from extproc.errors import ConfigError, RelayUnavailable, StoreUnavailable, UpstreamUnreachable
from extproc.node.metrics import RelayMetrics
from extproc.session.framing import framing_of, identity_coded, new_framer
from extproc.session.log import EndState, SessionLog, WritePath
from extproc.session.writer import SessionWriter
from extproc.store.base import SessionStore

DEFAULT_DETACH_GRACE_S = 30.0
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
EGRESS_CONNECT_TIMEOUT_S = 10.0
UNIX_EGRESS = "unix:"  # --egress-url unix:/path/egress.sock: Envoy's egress on a Unix socket


@dataclass(frozen=True, kw_only=True)
class DetachSettings:
    """Named as their flags: --egress-url, --detach-grace, --max-request-bytes."""

    egress_url: str = ""  # Envoy's egress, http://127.0.0.1:10001 or unix:/path; "" = disabled
    detach_grace: float = DEFAULT_DETACH_GRACE_S  # a generation outlives its last reader so long
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # a generation request body, at most

    def __post_init__(self) -> None:
        if self.detach_grace < 0:
            raise ConfigError(f"--detach-grace must be >= 0 seconds, got {self.detach_grace}")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")


class Generation:
    """One upstream call that the relay makes and owns."""

    __slots__ = ("grace_check", "grace_timer", "log", "readers", "slot", "task")

    def __init__(self, log: SessionLog, task: asyncio.Task[None], slot: Slot) -> None:
        self.log = log
        self.task = task
        self.slot = slot  # its place in the owner's session quota, given back at its end
        self.readers = 0  # readers on this node, as the reader registry last said
        self.grace_timer: asyncio.TimerHandle | None = None
        self.grace_check: asyncio.Task[None] | None = None  # asking other nodes for readers


class Generations:
    """Running detached generations."""

    def __init__(
        self,
        store: SessionStore,
        settings: DetachSettings,
        metrics: RelayMetrics,
        *,
        max_event_bytes: int,
    ) -> None:
        self._store = store
        self.settings = settings
        self._metrics = metrics
        self._max_event_bytes = max_event_bytes
        self._running: dict[str, Generation] = {}
        self._http: aiohttp.ClientSession | None = None
        self._closed = False
        metrics.generations_running = lambda: len(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    async def close(self, reason: str = "relay node stopping") -> None:
        """Shutdown: cancel every generation (their logs end `cancelled` with `reason`); a
        request still on its way in is refused from now on (typed 503, no new LLM call)."""
        self._closed = True
        for generation in list(self._running.values()):
            generation.task.cancel(reason)
        await asyncio.gather(*(g.task for g in self._running.values()), return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def cancel(self, session_id: str, reason: str = "cancelled by owner") -> bool:
        """Stop a running generation; False if none runs for this session on this node."""
        generation = self._running.get(session_id)
        if generation is None:
            return False
        generation.task.cancel(reason)
        return True

    def readers_changed(self, session_id: str, readers: int) -> None:
        """The reader registry's count for a session on this node: the last one leaving starts
        the grace period, a reader arriving ends it."""
        generation = self._running.get(session_id)
        if generation is None:
            return
        generation.readers = readers
        if readers:
            if generation.grace_timer is not None:
                generation.grace_timer.cancel()
                generation.grace_timer = None
        elif generation.grace_timer is None:
            generation.grace_timer = asyncio.get_running_loop().call_later(
                self.settings.detach_grace, self._grace_over, session_id
            )

    def _grace_over(self, session_id: str) -> None:
        generation = self._running.get(session_id)
        if generation is not None:
            generation.grace_timer = None
            generation.grace_check = asyncio.create_task(self._grace_check(generation))

    async def _grace_check(self, generation: Generation) -> None:
        """The grace is over here; readers on other nodes (a shared store) still count, and
        so does not knowing: a store that cannot answer never cancels a generation."""
        session_id = generation.log.session_id
        try:
            elsewhere = await self._store.remote_readers(session_id)
        except StoreUnavailable:
            elsewhere = 1
        if generation.readers or generation.grace_timer is not None:
            return  # a reader came back while we asked (and may have left: a new grace runs)
        if elsewhere:
            self.readers_changed(session_id, 0)  # look again after another grace
            return
        if self.cancel(session_id, f"no reader for {self.settings.detach_grace:g}s"):
            self._metrics.grace_cancelled()

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            socket_path = self.settings.egress_url.removeprefix(UNIX_EGRESS)
            unix = socket_path != self.settings.egress_url
            self._http = aiohttp.ClientSession(
                connector=(
                    aiohttp.UnixConnector(socket_path, limit=0)
                    if unix
                    else aiohttp.TCPConnector(limit=0)
                ),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=EGRESS_CONNECT_TIMEOUT_S),
                auto_decompress=False,
            )
        return self._http

    async def open(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes
    ) -> aiohttp.ClientResponse:
        """Send the client's request upstream through Envoy's egress; return its response.
        `target` is the path and query exactly as the client sent them."""
        if self._closed:
            raise RelayUnavailable("relay node stopping")
        if not self.settings.egress_url:
            raise UpstreamUnreachable("the detached path is not configured (no --egress-url)")
        egress = self.settings.egress_url
        base = "http://localhost" if egress.startswith(UNIX_EGRESS) else egress.rstrip("/")
        url = URL(base + target, encoded=True)
        try:
            return await self._client().request(
                method, url, data=body, headers=upstream_request_headers(headers.items())
            )
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnreachable(f"upstream unreachable: {exc!r}") from exc

    def start(
        self, response: aiohttp.ClientResponse, *, owner: str, slot: Slot, request_key: str
    ) -> SessionLog | None:
        """If the upstream answered with an event stream, log it in the background; the
        generation then holds `slot` until it ends. `request_key`: what a resume must repeat."""
        if self._closed:  # called before the node began to stop: end it here, not log it
            response.close()
            raise RelayUnavailable("relay node stopping")
        content_type = response.headers.get("Content-Type", "")
        framing = framing_of(content_type)
        encoded = not identity_coded(response.headers.get("Content-Encoding"))
        if response.status != 200 or framing is None or encoded:
            return None  # a compressed stream cannot be framed: passed through untouched
        session = self._store.create(
            content_type=content_type, write_path=WritePath.DETACHED, owner=owner
        )
        session.request_key = request_key
        framer = new_framer(framing, max_frame_bytes=self._max_event_bytes)
        writer = SessionWriter(self._store, session, framer, on_usage=self._metrics.count_tokens)
        task = asyncio.create_task(self._produce(writer, response))
        session_id = session.session_id
        self._running[session_id] = Generation(session, task, slot)
        task.add_done_callback(lambda _: self._finished(session_id))
        self.readers_changed(session_id, 0)  # no reader yet: the grace runs until one attaches
        return session

    def _finished(self, session_id: str) -> None:
        generation = self._running.pop(session_id, None)
        if generation is None:
            return
        if generation.grace_timer is not None:
            generation.grace_timer.cancel()
        generation.slot.release()

    async def _produce(self, writer: SessionWriter, response: aiohttp.ClientResponse) -> None:
        log = writer.log
        try:
            async for chunk in response.content.iter_any():
                writer.feed(chunk)
                if log.state is not EndState.OPEN or log.gone_reason:
                    # Failed by the writer (an event or the log over its limit) or dropped
                    # (evicted): no reader can get the rest, so the LLM call stops here
                    # instead of running on, unread and billed, until the grace runs out.
                    return
            writer.close()
        except asyncio.CancelledError as exc:
            self._store.end(log, EndState.CANCELLED, str(exc.args[0]) if exc.args else "")
        except (aiohttp.ClientError, OSError) as exc:
            self._store.end(log, EndState.FAILED, f"upstream connection lost: {exc!r}")
        finally:
            response.close()
