"""A TCP proxy that cuts connections: the network failing between a client and Envoy.

Loopback only. Every accepted connection is paired with a fresh connection to the target;
bytes from the client go through untouched, bytes back to the client are counted, and at the
connection's cut offset (drawn from a seeded `random.Random`) both sides are dropped: the
client gets exactly the first `offset` bytes of the server's answer and then the end of the
connection (all of them flushed, then FIN: so the offset is exact), and the target gets a TCP
reset (SO_LINGER 0), as when a client vanishes.

    async with ChaosProxy(target_port, CutPlan(seed=7, low=0, high=20_000)) as proxy:
        url = proxy.url  # talk to this instead of the target

The proxy owns its tasks and closes every socket when the `async with` ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

LOOPBACK = "127.0.0.1"
_READ_SIZE = 16 * 1024


@dataclass(frozen=True)
class CutPlan:
    """Where each accepted connection is cut, server->client byte offset, or None for never.

    Connection `n` (0-based, in accept order) is cut at an offset drawn uniformly from
    `[low, high]`, except that with probability `keep_probability` it is not cut at all.
    The first `always_cut` connections are always cut, and `first_low` (if set) raises the
    lower bound for connection 0 only: e.g. past the response head, so the client learns its
    session before the first cut.
    """

    seed: int
    low: int
    high: int
    keep_probability: float = 0.0
    always_cut: int = 0
    first_low: int | None = None

    def offsets(self) -> OffsetSource:
        return OffsetSource(self)


@dataclass
class OffsetSource:
    plan: CutPlan
    drawn: list[int | None] = field(default_factory=list)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.plan.seed)

    def next(self) -> int | None:
        plan, n = self.plan, len(self.drawn)
        low = plan.first_low if n == 0 and plan.first_low is not None else plan.low
        keep = self._rng.random() < plan.keep_probability  # always draw both: stable sequence
        offset: int | None = self._rng.randint(low, max(low, plan.high))
        if keep and n >= plan.always_cut:
            offset = None
        self.drawn.append(offset)
        return offset


@dataclass
class ConnectionRecord:
    index: int
    cut_at: int | None
    to_client: int = 0  # bytes delivered to the client
    cut: bool = False  # True if the proxy cut it (not a normal close by either side)
    data: bytes = b""  # what the client got, if the proxy records


class ChaosProxy:
    """An asyncio TCP proxy on 127.0.0.1 that cuts server->client streams per a `CutPlan`."""

    def __init__(
        self, target_port: int, plan: CutPlan, *, target_host: str = LOOPBACK, record: bool = False
    ) -> None:
        if target_host != LOOPBACK:
            raise ValueError("the chaos proxy only talks to loopback")
        self.target = (target_host, target_port)
        self.plan = plan
        self.record = record
        self.connections: list[ConnectionRecord] = []
        self._offsets = plan.offsets()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._errors: list[BaseException] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def cuts(self) -> int:
        return sum(1 for c in self.connections if c.cut)

    async def __aenter__(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._errors:
            raise RuntimeError(f"chaos proxy failed: {self._errors!r}")

    def _track(self, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # start_server runs each handler in its own task
        self._track(client_w)
        record = ConnectionRecord(len(self.connections), self._offsets.next())
        self.connections.append(record)
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            self._track(server_w)
            upstream = asyncio.create_task(self._pipe(client_r, server_w))
            self._tasks.add(upstream)
            try:
                await self._pipe_back(server_r, client_w, record)
            finally:
                upstream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await upstream
                self._tasks.discard(upstream)
        except (ConnectionError, OSError):
            pass  # one side went away: the other one is closed below
        except asyncio.CancelledError:
            pass  # the proxy is closing
        except Exception as exc:  # a bug in the proxy must fail the test, not vanish
            self._errors.append(exc)
        finally:
            if server_w is not None:
                if record.cut:
                    _reset(server_w)
                else:
                    server_w.close()
                self._writers.discard(server_w)
            client_w.close()  # after a flushed partial answer: the client sees it cut short
            self._writers.discard(client_w)
            self._tasks.discard(task)

    def _deliver(self, writer: asyncio.StreamWriter, record: ConnectionRecord, data: bytes) -> None:
        writer.write(data)
        record.to_client += len(data)
        if self.record:
            record.data += data

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """client -> server, untouched; half-close the server side at the client's EOF."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(_READ_SIZE):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

    async def _pipe_back(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: ConnectionRecord
    ) -> None:
        """server -> client, counted; stop at the cut offset with every byte before it sent."""
        writer.transport.set_write_buffer_limits(high=0)  # drain() = flushed to the kernel
        if record.cut_at == 0:
            record.cut = True
            return
        while data := await reader.read(_READ_SIZE):
            if record.cut_at is not None and record.to_client + len(data) >= record.cut_at:
                data = data[: record.cut_at - record.to_client]
                self._deliver(writer, record, data)
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.drain()
                record.cut = True
                return
            self._deliver(writer, record, data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # the server closed cleanly: pass the close on


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
