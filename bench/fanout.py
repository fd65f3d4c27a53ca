"""Multicast fan-out, resume latency and slow readers: what a session costs per extra reader.

One stack (demo upstream with --timestamps, relay node, one real Envoy); every client goes
through Envoy's public listener. Three measurements, one after the other:

1. multicast: one detached session at R ev/s read by N SSE readers on
   `/relay/v1/sessions/{id}/events`, all attached before its first event;
2. resume: a POST carrying `Last-Event-ID: <session>:<k>` on a fresh connection, timed to the
   first replayed event, over many finished sessions and many live ones;
3. slow readers: one session at 200 ev/s read by 45 fast and 5 slow readers (raw sockets with
   a 4 KiB receive buffer and a 1460-byte MSS, reading ten times slower than the stream),
   against the same session read by one lone fast reader and by the 45 fast readers alone;
   once with the demo's ~270-byte events and once with ~2.5 KB events (a padded model name,
   echoed in every chunk), because loopback socket buffers swallow a whole ~1 MiB session
   before the relay itself is held back.

Latency of an event = client receipt time - the upstream's `x_demo_ts` in it (same host clock).

    python bench/fanout.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import mkdtemp
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from overhead import REQUEST, cpu_snapshot, machine, start_upstream

from extproc.supervisor import Stack, StackOptions, start_stack

ROUTE = "/v1/chat/completions"
SESSION_HEADER = "x-relay-session"
TS_KEY = b'"x_demo_ts":'
MIB = 1024 * 1024
Row = dict[str, Any]
# Envoy pauses reading the relay for a reader whose downstream buffer is over its watermark.
ENVOY_PAUSED = "cluster.relay_http.upstream_flow_control_paused_reading_total"
SLOW_READ_BYTES = 256  # a slow reader's read size; its StreamReader pauses above 4x this
LAG_BUCKET = re.compile(r'^relay_reader_lag_events_bucket\{le="([^"]+)"\} (\S+)$', re.M)
STORE_BYTES = re.compile(r"^relay_store_bytes (\S+)$", re.M)


# ---------------------------------------------------------------------------------------------
# Reading event streams


@dataclass
class Tally:
    """What one reader got: id'd events, whether the ids were dense, per-event latency."""

    last_seq: int = 0  # the last id's seq; set it to k before reading a resume after k
    first_seq: int = 0
    events: int = 0
    event_bytes: int = 0
    gaps: int = 0  # ids that did not follow the previous one
    ended: str = ""  # the state announced by `event: relay.end`, once seen
    end_last_seq: int = -1  # the last_seq it announced
    first_at: float = 0.0  # time.time() of the first and last event's receipt
    last_at: float = 0.0
    error: str = ""
    buf: bytes = b""
    latencies_ms: list[float] = field(default_factory=list)

    def feed(self, data: bytes, now: float) -> None:
        """Account for received body bytes (minimal SSE: blocks split on blank lines)."""
        *blocks, self.buf = (self.buf + data).split(b"\n\n")
        for block in blocks:
            if block.startswith(b"event: relay.end") or b"\nevent: relay.end\n" in block:
                # The end marker (with or without an id line of its own): not an event.
                end = json.loads(block.split(b"data:", 1)[1])
                self.ended, self.end_last_seq = end["state"], end["last_seq"]
            elif block.startswith(b"id: "):
                eol = block.find(b"\n")
                seq = int(block[block.rfind(b":", 0, eol) + 1 : eol])
                self.gaps += seq != self.last_seq + 1
                self.first_seq = self.first_seq or seq
                self.last_seq, self.last_at = seq, now
                self.first_at = self.first_at or now
                self.events += 1
                self.event_bytes += len(block) + 2
                at = block.rfind(TS_KEY)
                if at >= 0:
                    stamp = float(block[at + len(TS_KEY) : block.index(b"}", at)])
                    self.latencies_ms.append((now - stamp) * 1000)

    @property
    def complete(self) -> bool:
        """Every event of a finished session, ids 1..last_seq with no gap."""
        return bool(self.ended) and self.gaps == 0 and self.last_seq == self.end_last_seq


async def consume(resp: aiohttp.ClientResponse, tally: Tally, until: int | None = None) -> None:
    """Read the body into `tally`; with `until`, stop once it has that many events."""
    async for chunk in resp.content.iter_any():
        tally.feed(chunk, time.time())
        if until is not None and tally.events >= until:
            return


class Joined:
    """Counts readers whose response headers arrived: they are attached to the session."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.all = asyncio.Event()
        if n <= 0:
            self.all.set()

    def one(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.all.set()


async def fast_reader(http: aiohttp.ClientSession, url: str, tally: Tally, joined: Joined) -> None:
    """An SSE reader that keeps up: aiohttp, one connection, reads whatever arrives."""
    try:
        async with http.get(url, headers={"Accept": "text/event-stream"}) as resp:
            if resp.status != 200:
                tally.error = f"HTTP {resp.status}"
                return
            joined.one()
            await consume(resp, tally)
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.error = repr(exc)


class Dechunker:
    """Incremental HTTP/1.1 chunked transfer decoding, for the raw slow reader."""

    def __init__(self) -> None:
        self._raw = b""
        self._left = 0  # data bytes still due in the current chunk
        self._crlf = False  # the CRLF after a chunk's data is due
        self.done = False

    def feed(self, data: bytes) -> bytes:
        raw, out = self._raw + data, []
        while raw and not self.done:
            if self._left:
                piece = raw[: self._left]
                out.append(piece)
                raw, self._left = raw[len(piece) :], self._left - len(piece)
                self._crlf = not self._left
            elif self._crlf:
                if len(raw) < 2:
                    break
                raw, self._crlf = raw[2:], False
            else:
                eol = raw.find(b"\r\n")
                if eol < 0:
                    break
                size, raw = int(raw[:eol].split(b";")[0], 16), raw[eol + 2 :]
                self.done, self._left = size == 0, size
        self._raw = raw
        return b"".join(out)


async def slow_reader(
    base_url: str,
    path: str,
    tally: Tally,
    joined: Joined,
    pace: float,
    rcvbuf: int,
    mss: int,
    drain: asyncio.Event,
) -> None:
    """A reader slow at the socket, through Envoy: a small SO_RCVBUF (set before connect, so
    the advertised window stays small), small reads with pauses that hold it to `pace`
    events/s, until `drain` is set; then it reads the rest at full speed.

    `mss` (TCP_MAXSEG before connect) makes it announce a real network's segment size instead
    of loopback's 64 KiB, which would let Envoy's send buffer to it grow to ~4 MiB."""
    loop = asyncio.get_running_loop()
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if mss:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
    except OSError as exc:
        sock.close()
        tally.error = repr(exc)
        return
    # limit: asyncio stops reading the socket once 2 x limit bytes wait in the StreamReader.
    reader, writer = await asyncio.open_connection(sock=sock, limit=4 * SLOW_READ_BYTES)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
        writer.write(request.encode())
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        if not head.startswith(b"http/1.1 200") or b"transfer-encoding: chunked" not in head:
            tally.error = head.split(b"\r\n", 1)[0].decode()
            return
        joined.one()
        body, started = Dechunker(), 0.0
        while not body.done:
            data = await reader.read(SLOW_READ_BYTES if not drain.is_set() else 1 << 16)
            if not data:
                tally.error = "connection closed before the end of the stream"
                return
            tally.feed(body.feed(data), time.time())
            if tally.events and not drain.is_set():
                started = started or time.monotonic()
                ahead = tally.events / pace - (time.monotonic() - started)
                if ahead > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(drain.wait(), ahead)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        tally.error = repr(exc)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# ---------------------------------------------------------------------------------------------
# The stack, its processes, its metrics


@dataclass
class Ctx:
    args: argparse.Namespace
    stack: Stack
    pids: dict[str, int]

    @property
    def base(self) -> str:
        return self.stack.base_url

    @property
    def relay_pid(self) -> int:
        return self.pids["relay"]


def rss_mib(pid: int) -> float:
    """Resident set size of one process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


class RssSampler:
    """Samples a process's RSS every 50 ms in the background; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_mib(pid)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mib(self.pid))
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def mark(self) -> float:
        """The peak so far; sampling goes on, with the peak reset to the current value."""
        now = rss_mib(self.pid)
        peak, self.peak = max(self.peak, now), now
        return peak

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return max(self.peak, rss_mib(self.pid))


async def get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        resp.raise_for_status()
        return await resp.text()


async def session_info(http: aiohttp.ClientSession, ctx: Ctx, session: str) -> Row:
    info: Row = json.loads(await get_text(http, f"{ctx.base}/relay/v1/sessions/{session}"))
    return info


async def relay_lag_buckets(http: aiohttp.ClientSession, ctx: Ctx) -> dict[float, float]:
    """The relay's reader-lag histogram: events behind the log's head at each write."""
    text = await get_text(http, ctx.stack.metrics_url)
    return {float(le): float(n) for le, n in LAG_BUCKET.findall(text)}


async def relay_store_bytes(http: aiohttp.ClientSession, ctx: Ctx) -> float:
    match = STORE_BYTES.search(await get_text(http, ctx.stack.metrics_url))
    return float(match[1]) if match else math.nan


async def envoy_counter(http: aiohttp.ClientSession, ctx: Ctx, name: str) -> int:
    text = await get_text(http, f"{ctx.stack.admin_url}/stats?filter={name.rsplit('.', 1)[-1]}")
    match = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.M)
    return int(match[1]) if match else 0


def lag_range(before: dict[float, float], after: dict[float, float]) -> tuple[float, float]:
    """(lower, upper] bounds of the largest reader lag the relay saw between two snapshots."""
    diff = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total, lower = diff.get(math.inf, 0.0), -1.0
    for le, n in diff.items():
        if n >= total:
            return lower, le
        lower = le
    return lower, math.inf


async def start_session(
    http: aiohttp.ClientSession,
    ctx: Ctx,
    rate: float,
    tokens: int,
    ttft_ms: float,
    model: str = "bench",
) -> str:
    """A detached generation; its first client leaves at once (it was only a reader)."""
    headers = {"x-demo-rate": f"{rate:g}", "x-demo-ttft-ms": f"{ttft_ms:g}"}
    body = {**REQUEST, "model": model, "max_tokens": tokens}
    async with http.post(ctx.base + ROUTE, json=body, headers=headers) as resp:
        session = resp.headers.get(SESSION_HEADER, "")
        resp.close()
    if resp.status != 200 or not session:
        raise RuntimeError(f"bench: POST {ROUTE} gave {resp.status} without a session")
    return session


def port_of(url: str) -> int:
    return urlsplit(url).port or 80


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    at = {
        n: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
        for n, q in (("p50_ms", 0.5), ("p99_ms", 0.99))
    }
    return {**at, "max_ms": ordered[-1]}


def per_event_cpu(before: dict[str, float], after: dict[str, float], events: int) -> Row:
    return {k: (after[k] - before[k]) * 1e6 / max(events, 1) for k in after}


async def with_timeout(what: str, awaitable: Awaitable[Any], seconds: float) -> Any:
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise RuntimeError(f"bench: timed out after {seconds:g} s waiting for {what}") from None


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def client(timeout_s: float = 60.0, **connector: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, **connector),  # a connection per reader
        timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_s),
    )


# ---------------------------------------------------------------------------------------------
# 1. Multicast fan-out


async def sanity(ctx: Ctx) -> None:
    """A short unpaced session read by two readers: ids dense, relay.end, all events."""
    async with client() as http:
        session = await start_session(http, ctx, 0, 20, 300)
        url = f"{ctx.base}/relay/v1/sessions/{session}/events"
        tallies, joined = [Tally(), Tally()], Joined(2)
        await asyncio.gather(*(fast_reader(http, url, t, joined) for t in tallies))
    if not all(t.complete and t.end_last_seq == 23 and not t.error for t in tallies):
        raise RuntimeError(f"bench: the reader endpoint misbehaves: {tallies[0]}")


async def multicast(ctx: Ctx, readers: int) -> Row:
    args = ctx.args
    tokens = max(1, round(args.duration * args.rate) - 2)
    ttft_ms = 1000 + 20 * readers  # time for every reader to attach before the first event
    tallies, joined = [Tally() for _ in range(readers)], Joined(readers)
    async with client() as http:
        rss_before = rss_mib(ctx.relay_pid)
        session = await start_session(http, ctx, args.rate, tokens, ttft_ms)
        url = f"{ctx.base}/relay/v1/sessions/{session}/events"
        tasks = [asyncio.create_task(fast_reader(http, url, t, joined)) for t in tallies]
        try:
            await with_timeout("the readers to attach", joined.all.wait(), ttft_ms / 1000)
            info = await session_info(http, ctx, session)
            sampler, cpu0, t0 = RssSampler(ctx.relay_pid), cpu_snapshot(ctx.pids), time.time()
            sampler.start()
            await with_timeout("the session to end", asyncio.gather(*tasks), args.duration * 4 + 60)
            cpu1, wall, rss_peak = cpu_snapshot(ctx.pids), time.time() - t0, await sampler.stop()
        finally:
            await cancel_all(tasks)
    delivered = sum(t.events for t in tallies)
    span = max(t.last_at for t in tallies) - min(t.first_at or math.inf for t in tallies)
    return {
        "readers": readers,
        "rate": args.rate,
        "session": session,
        "events_per_reader": tallies[0].end_last_seq,
        "delivered": delivered,
        "delivered_per_s": delivered / span if span > 0 else math.nan,
        "offered_per_s": readers * args.rate,
        "joined_before_first_event": info["readers"] == readers and info["last_seq"] == 0,
        "complete_readers": sum(t.complete for t in tallies),
        "errors": [t.error for t in tallies if t.error][:5],
        **percentiles([x for t in tallies for x in t.latencies_ms]),
        "cpu_us_per_delivered_event": per_event_cpu(cpu0, cpu1, delivered),
        "loadgen_core": (cpu1["loadgen"] - cpu0["loadgen"]) / wall,
        "relay_rss_before_mib": rss_before,
        "relay_rss_peak_mib": rss_peak,
    }


# ---------------------------------------------------------------------------------------------
# 2. Resume latency


async def finished_session(
    http: aiohttp.ClientSession, ctx: Ctx, tokens: int, gate: asyncio.Semaphore
) -> tuple[str, int]:
    """An unpaced session read to its end by its first client: (session, last seq)."""
    async with (
        gate,
        http.post(
            ctx.base + ROUTE, json={**REQUEST, "max_tokens": tokens}, headers={"x-demo-rate": "0"}
        ) as resp,
    ):
        tally = Tally()
        await consume(resp, tally)
        return resp.headers.get(SESSION_HEADER, ""), tally.last_seq


async def live_session(
    http: aiohttp.ClientSession, ctx: Ctx, rate: float, seen: int
) -> tuple[str, int]:
    """A paced, long session whose first client drops after `seen` events: (session, seq)."""
    body = {**REQUEST, "max_tokens": 4000}  # at 10 ev/s: 400 s; cancelled at the end
    async with http.post(ctx.base + ROUTE, json=body, headers={"x-demo-rate": f"{rate:g}"}) as resp:
        tally = Tally()
        await consume(resp, tally, until=seen)
        resp.close()
        return resp.headers.get(SESSION_HEADER, ""), tally.last_seq


async def resume_once(
    http: aiohttp.ClientSession, ctx: Ctx, session: str, after: int, to_end: bool
) -> Row:
    """POST with Last-Event-ID on a fresh connection: ms to the first replayed event (and, with
    `to_end`, to the end of the replay)."""
    tally = Tally(last_seq=after)
    headers = {"Last-Event-ID": f"{session}:{after}"}
    t0 = time.perf_counter()
    async with http.post(
        ctx.base + ROUTE, json={**REQUEST, "max_tokens": 8}, headers=headers
    ) as resp:
        if resp.status != 200:
            return {"ok": False, "error": f"HTTP {resp.status}"}
        await consume(resp, tally, until=1)
        first_ms = (time.perf_counter() - t0) * 1000
        if to_end:
            await consume(resp, tally)
        else:
            resp.close()
    return {
        "ok": tally.first_seq == after + 1 and tally.gaps == 0,
        "first_ms": first_ms,
        "all_ms": (time.perf_counter() - t0) * 1000,
        "replayed": tally.events,
    }


async def resume_phase(ctx: Ctx, state: str, sessions: list[tuple[str, int]]) -> Row:
    """Resumes one at a time (so this is the path's latency, not queueing), each after half of
    what its first client saw."""
    finished = state == "finished"
    async with client(force_close=True) as http:  # a fresh connection for every request
        cpu0, t0 = cpu_snapshot(ctx.pids), time.time()
        results = [
            await resume_once(http, ctx, s, max(1, seq // 2), finished) for s, seq in sessions
        ]
        cpu1, wall = cpu_snapshot(ctx.pids), time.time() - t0
    ok = [r for r in results if r["ok"]]
    replay = percentiles([r["all_ms"] for r in ok]) if finished else {}
    return {
        "state": state,
        "sessions": len(sessions),
        "resumed_ok": len(ok),
        "errors": sorted({r.get("error", "wrong first id") for r in results if not r["ok"]})[:5],
        **percentiles([r["first_ms"] for r in ok]),
        "replayed_mean": sum(r["replayed"] for r in ok) / max(len(ok), 1),
        "full_replay_p50_ms": replay.get("p50_ms", math.nan),
        "loadgen_core": (cpu1["loadgen"] - cpu0["loadgen"]) / wall,
    }


async def resume(ctx: Ctx) -> list[Row]:
    args, rows = ctx.args, []
    async with client() as http:
        gate = asyncio.Semaphore(20)
        done = await asyncio.gather(
            *(finished_session(http, ctx, args.resume_tokens, gate) for _ in range(args.sessions))
        )
    rows.append(await resume_phase(ctx, "finished", [d for d in done if d[0]]))
    async with client() as http:
        live = await asyncio.gather(
            *(live_session(http, ctx, args.live_rate, 10) for _ in range(args.sessions))
        )
        live = [s for s in live if s[0]]
        try:
            rows.append(await resume_phase(ctx, "live", live))
        finally:  # stop the live generations; 200 = it was still running
            statuses = await asyncio.gather(*(cancel_session(http, ctx, s) for s, _ in live))
        rows[-1]["still_live_at_cancel"] = statuses.count(200)
        rows[-1]["live_rate"] = args.live_rate
    return rows


async def cancel_session(http: aiohttp.ClientSession, ctx: Ctx, session: str) -> int:
    async with http.delete(f"{ctx.base}/relay/v1/sessions/{session}") as resp:
        return resp.status


# ---------------------------------------------------------------------------------------------
# 3. Slow readers


def kernel_queued_bytes(ports: set[int]) -> int:
    """Bytes in the send and receive queues of established TCP sockets to or from `ports`
    (/proc/net/tcp): what the kernel holds between the relay, Envoy and their clients."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(addr.rsplit(":", 1)[1], 16) for addr in fields[1:3])
        if fields[3] == "01" and (local in ports or remote in ports):
            total += sum(int(x, 16) for x in fields[4].split(":"))
    return total


async def slow_shape(ctx: Ctx, shape: str, fast: int, slow: int, pad: int) -> Row:
    """One session at --slow-rate with `fast` aiohttp readers and `slow` raw slow readers;
    `pad` bytes added to the model name (echoed in every chunk) make its events bigger."""
    args = ctx.args
    tokens = args.slow_events - 3  # + role chunk, finish chunk and [DONE]
    ttft_ms = 1000 + 20 * (fast + slow)
    fasts, slows = [Tally() for _ in range(fast)], [Tally() for _ in range(slow)]
    joined, drain = Joined(fast + slow), asyncio.Event()
    pace = args.slow_rate / args.slowdown
    ports = {port_of(ctx.base), port_of(ctx.stack.relay_http_url)}
    async with client() as http:
        lag0 = await relay_lag_buckets(http, ctx)
        paused0 = await envoy_counter(http, ctx, ENVOY_PAUSED)
        store0, rss_before = await relay_store_bytes(http, ctx), rss_mib(ctx.relay_pid)
        model = "bench-" + "x" * pad
        session = await start_session(http, ctx, args.slow_rate, tokens, ttft_ms, model)
        path = f"/relay/v1/sessions/{session}/events"
        tasks = [asyncio.create_task(fast_reader(http, ctx.base + path, t, joined)) for t in fasts]
        slow_tasks = [
            asyncio.create_task(
                slow_reader(ctx.base, path, t, joined, pace, args.rcvbuf, args.mss, drain)
            )
            for t in slows
        ]
        try:
            await with_timeout("the readers to attach", joined.all.wait(), ttft_ms / 1000)
            info = await session_info(http, ctx, session)
            sampler, cpu0, t0 = RssSampler(ctx.relay_pid), cpu_snapshot(ctx.pids), time.time()
            sampler.start()
            live_s = args.slow_events / args.slow_rate
            await with_timeout("the fast readers", asyncio.gather(*tasks), live_s * 3 + 60)
            cpu1, wall = cpu_snapshot(ctx.pids), time.time() - t0
            # The session has ended and the slow readers lag most: let the buffers between
            # them and the relay settle, then look at where the backlog is.
            await asyncio.sleep(1.0)
            rss_end, slow_seen = rss_mib(ctx.relay_pid), [t.last_seq for t in slows]
            in_kernel = kernel_queued_bytes(ports)
            slow_rates = [t.events / (time.time() - t.first_at) for t in slows if t.first_at]
            rss_peak = sampler.mark()  # the peak while the slow readers lagged
            drain.set()
            await with_timeout("the slow readers to drain", asyncio.gather(*slow_tasks), 120)
            rss_drain = await sampler.stop()  # the peak while they caught up at full speed
            # A write blocked by backpressure records its lag once it completes: read now.
            lag1 = await relay_lag_buckets(http, ctx)
            paused1 = await envoy_counter(http, ctx, ENVOY_PAUSED)
            await asyncio.sleep(0.5)
            rss_after, end = rss_mib(ctx.relay_pid), await session_info(http, ctx, session)
            store1 = await relay_store_bytes(http, ctx)
        finally:
            drain.set()
            await cancel_all(tasks + slow_tasks)
    last_seq, delivered = end["last_seq"], sum(t.events for t in fasts)
    event_bytes = sum(t.event_bytes for t in fasts) / max(delivered, 1)
    slow_lag = [last_seq - s for s in slow_seen]
    return {
        "shape": shape,
        "fast": fast,
        "slow": slow,
        "rate": args.slow_rate,
        "pad_bytes": pad,
        "session": session,
        "last_seq": last_seq,
        "event_bytes": event_bytes,
        "joined_before_first_event": info["readers"] == fast + slow and info["last_seq"] == 0,
        **percentiles([x for t in fasts for x in t.latencies_ms]),
        "fast_complete": sum(t.complete for t in fasts),
        "slow_complete": sum(t.complete for t in slows),
        "slow_events_min": min((t.events for t in slows), default=0),
        "slow_gaps": sum(t.gaps for t in slows),
        "slow_rate_during": sum(slow_rates) / max(len(slow_rates), 1),
        "slow_lag_at_end_events": slow_lag,
        "slow_lag_at_end_mib": sum(slow_lag) * event_bytes / MIB,
        "kernel_queued_at_end_mib": in_kernel / MIB,
        "relay_max_lag_events": list(lag_range(lag0, lag1)),
        "envoy_paused_reading_relay": paused1 - paused0,
        "errors": [t.error for t in fasts + slows if t.error][:5],
        "cpu_us_per_delivered_event": per_event_cpu(cpu0, cpu1, delivered),
        "loadgen_core": (cpu1["loadgen"] - cpu0["loadgen"]) / wall,
        "relay_rss_mib": {
            "before": rss_before,
            "peak": rss_peak,
            "at_end": rss_end,
            "drain_peak": rss_drain,
            "after": rss_after,
        },
        "rss_delta_mib": rss_peak - rss_before,
        "rss_drain_delta_mib": rss_drain - rss_before,
        "log_mib": last_seq * event_bytes / MIB,
        "store_delta_mib": (store1 - store0) / MIB,
    }


async def slow_readers(ctx: Ctx) -> list[Row]:
    args, rows = ctx.args, []
    shapes = [("lone", 1, 0), ("fast only", args.fast, 0), ("fast + slow", args.fast, args.slow)]
    if args.quick:
        shapes.pop(1)
    for pad in args.pads:
        for shape in shapes:
            rows.append(await slow_shape(ctx, *shape, pad))
            print(f"  slow readers: {shape[0]}, pad {pad} done", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def ms3(row: Row) -> list[str]:
    return [f"{row[k]:.2f}" for k in ("p50_ms", "p99_ms", "max_ms")]


def lag_text(bounds: list[float]) -> str:
    """A histogram bucket as text: the relay's largest lag lies in (low, high]."""
    low, high = bounds
    if low < 0:
        return "0"
    return f"> {low:g}" if high == math.inf else f"{low:g}-{high:g}"


def multicast_table(args: argparse.Namespace, rows: list[Row]) -> list[str]:
    title = (
        f"## Multicast: 1 session at {args.rate:g} ev/s for {args.duration:g} s, N readers on "
        "/relay/v1/sessions/{id}/events (through Envoy), all attached before the first event"
    )
    body = []
    for r in rows:
        cpu = r["cpu_us_per_delivered_event"]
        body.append(
            [
                str(r["readers"]),
                f"{r['delivered_per_s']:.0f}",
                *ms3(r),
                f"{r['complete_readers']}/{r['readers']}",
                *(f"{cpu[p]:.1f}" for p in ("relay", "envoy", "loadgen")),
                f"{r['relay_rss_before_mib']:.1f} / {r['relay_rss_peak_mib']:.1f}",
                f"{r['loadgen_core']:.0%}",
            ]
        )
    head = ["readers", "delivered ev/s", "p50 ms", "p99 ms", "max ms", "complete"]
    head += ["relay µs/ev", "envoy µs/ev", "loadgen µs/ev", "relay RSS MiB before / peak"]
    return [title, "", *table([*head, "loadgen core"], body)]


def resume_table(rows: list[Row]) -> list[str]:
    title = (
        "## Resume: POST with Last-Event-ID on a fresh connection, through Envoy, one at a "
        "time; ms from sending it to the first replayed event"
    )
    body = []
    for r in rows:
        finished = r["state"] == "finished"
        state = r["state"] if finished else f"live ({r['live_rate']:g} ev/s)"
        body.append(
            [
                str(r["sessions"]),
                state,
                f"{r['resumed_ok']}/{r['sessions']}",
                *ms3(r),
                f"{r['replayed_mean']:.0f}" if finished else "first only",
                f"{r['full_replay_p50_ms']:.2f}" if finished else "-",
            ]
        )
    head = ["sessions", "state", "resumed ok", "p50 ms", "p99 ms", "max ms"]
    live = rows[-1]
    note = f"live sessions still running when cancelled: {live['still_live_at_cancel']}/"
    note += f"{live['sessions']}"
    return [title, "", *table([*head, "events replayed", "full replay p50 ms"], body), "", note]


def slow_tables(args: argparse.Namespace, rows: list[Row]) -> list[str]:
    """Per event size: the fast readers' latency and the slow readers' fate, then memory."""
    out: list[str] = []
    for pad in args.pads:
        group = [r for r in rows if r["pad_bytes"] == pad]
        by_shape = {r["shape"]: r for r in group}
        lone, mixed = by_shape["lone"], by_shape["fast + slow"]
        fast_only = by_shape.get("fast only")
        out += [
            f"## Slow readers: 1 session at {args.slow_rate:g} ev/s, {mixed['last_seq']} events "
            f"of {mixed['event_bytes']:.0f} B ({mixed['log_mib']:.1f} MiB); slow readers: "
            f"SO_RCVBUF {args.rcvbuf} B, MSS {args.mss or 'default'}, {SLOW_READ_BYTES} B reads "
            f"paced at {args.slow_rate / args.slowdown:g} ev/s until the session ends",
            "",
        ]
        body = []
        for r in group:
            slow = r["slow"] > 0
            lag = r["slow_lag_at_end_events"]
            body.append(
                [
                    f"{r['shape']} ({r['fast']}+{r['slow']})",
                    *ms3(r),
                    f"{r['fast_complete']}/{r['fast']}",
                    f"{r['slow_complete']}/{r['slow']}, {r['slow_gaps']} gaps" if slow else "-",
                    f"{r['slow_rate_during']:.1f}" if slow else "-",
                    f"{min(lag)}-{max(lag)}" if slow else "-",
                    f"{r['kernel_queued_at_end_mib']:.2f}" if slow else "-",
                    lag_text(r["relay_max_lag_events"]),
                    str(r["envoy_paused_reading_relay"]),
                    f"{r['cpu_us_per_delivered_event']['relay']:.1f}",
                    f"{r['loadgen_core']:.0%}",
                ]
            )
        head = ["readers (fast+slow)", "fast p50 ms", "fast p99 ms", "fast max ms"]
        head += ["fast complete", "slow complete", "slow ev/s", "slow lag at end (ev)"]
        head += ["in socket queues MiB", "relay-side max lag (ev)", "envoy paused relay"]
        out += table([*head, "relay µs/ev", "loadgen core"], body)
        body = []
        for r in group:
            rss = r["relay_rss_mib"]
            body.append(
                [
                    r["shape"],
                    *(f"{rss[k]:.1f}" for k in ("before", "peak", "at_end", "drain_peak", "after")),
                    f"{r['rss_delta_mib']:+.1f}",
                    f"{r['rss_drain_delta_mib']:+.1f}",
                    f"{r['log_mib']:.2f}",
                    f"{r['store_delta_mib']:.2f}",
                ]
            )
        head = ["relay RSS MiB", "before", "peak lagging", "at session end", "peak draining"]
        head += ["after", "lagging - before", "draining - before", "log MiB (last_seq x size)"]
        out += ["", *table([*head, "store delta MiB"], body), ""]
        p99_gap = mixed["p99_ms"] - lone["p99_ms"]
        verdict = "met" if p99_gap <= 2 else "NOT met"
        line = (
            f"fast p99 with slow readers - lone p99: {p99_gap:+.2f} ms (target <= +2 ms: {verdict})"
        )
        if fast_only is not None:
            line += f"; - fast-only p99: {mixed['p99_ms'] - fast_only['p99_ms']:+.2f} ms"
        lagging = mixed["rss_delta_mib"] - mixed["log_mib"]
        draining = mixed["rss_drain_delta_mib"] - mixed["log_mib"]
        out += [
            line,
            f"relay RSS beyond the {mixed['log_mib']:.1f} MiB log with slow readers: "
            f"{lagging:+.1f} MiB while they lagged ({mixed['slow_lag_at_end_mib']:.1f} MiB behind "
            f"in all at the end, {mixed['kernel_queued_at_end_mib']:.1f} MiB of it in socket "
            f"queues), {draining:+.1f} MiB while they caught up",
            "",
        ]
    return out


def report(host: Row, args: argparse.Namespace, result: Row) -> str:
    out = [
        f"machine: {host['cores']} cores, {host['cpu']}; Python {host['python']}, "
        f"Envoy {host['envoy']}; load average at start {host['loadavg']}",
        "",
        *multicast_table(args, result["multicast"]),
        "",
        *resume_table(result["resume"]),
        "",
        *slow_tables(args, result["slow"]),
    ]
    for name in ("multicast", "resume", "slow"):
        for r in result[name]:
            if r["loadgen_core"] > 0.8:
                out.append(
                    f"WARNING: the load generator used {r['loadgen_core']:.0%} of a core in "
                    f"{name}: it may be the bottleneck, not the stack"
                )
            if r.get("errors"):
                out.append(f"WARNING: errors in {name}: {r['errors']}")
            if r.get("joined_before_first_event") is False:
                out.append(f"WARNING: in {name}, not every reader attached before the first event")
            if r.get("complete_readers", r.get("fast_complete")) != r.get("readers", r.get("fast")):
                out.append(f"WARNING: in {name}, some readers did not get the whole session")
            if r.get("slow_complete", 0) != r.get("slow", 0):
                out.append(f"WARNING: in {name}, some slow readers missed events")
    return "\n".join(out).rstrip() + "\n"


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------


async def measure(ctx: Ctx) -> Row:
    await sanity(ctx)
    multicast_rows = []
    for readers in ctx.args.readers:
        multicast_rows.append(await multicast(ctx, readers))
        print(f"  multicast {readers} readers done", file=sys.stderr)
    resume_rows = await resume(ctx)
    print("  resume done", file=sys.stderr)
    slow_rows = await slow_readers(ctx)
    return {"multicast": multicast_rows, "resume": resume_rows, "slow": slow_rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--rate", type=float, default=100.0, help="multicast: events/s of the session (100)")
    add("--readers", default="1,10,100", help="multicast: reader counts (1,10,100)")
    add("--duration", type=float, default=10.0, help="multicast: seconds per session (10)")
    add("--sessions", type=int, default=200, help="resume: finished and live sessions (200)")
    add("--resume-tokens", type=int, default=100, help="resume: tokens per finished one (100)")
    add("--live-rate", type=float, default=10.0, help="resume: live sessions' events/s (10)")
    add("--slow-rate", type=float, default=200.0, help="slow readers: session events/s (200)")
    add("--slow-events", type=int, default=4000, help="slow readers: events (4000)")
    add("--fast", type=int, default=45, help="slow readers: fast readers (45)")
    add("--slow", type=int, default=5, help="slow readers: slow readers (5)")
    add("--slowdown", type=float, default=10.0, help="slow readers read this much slower (10)")
    add("--rcvbuf", type=int, default=4096, help="slow readers' SO_RCVBUF bytes (4096)")
    add("--mss", type=int, default=1460, help="slow readers' TCP_MAXSEG, 0 = loopback's (1460)")
    add("--pad-bytes", default="0,2200", help="bytes added to each event, one run each (0,2200)")
    add(
        "--quick",
        action="store_true",
        help="4 s multicast, 50 sessions, 2000 slow events, no fast-only control",
    )
    add("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.sessions, args.slow_events = 4.0, 50, 2000
    args.readers = [int(n) for n in str(args.readers).split(",")]
    args.pads = [int(n) for n in str(args.pad_bytes).split(",")]
    if min(args.readers) < 1 or min(args.pads) < 0 or min(args.sessions, args.fast, args.slow) < 1:
        parser.error("reader and session counts must be positive")
    if not 4 <= args.slow_events <= 4099 or args.rate <= 0 or args.slow_rate <= 0:
        parser.error("--slow-events must be in 4..4099 (the demo's cap) and rates positive")
    if not 1 <= args.duration * args.rate <= 4096 or args.slowdown <= 1:
        parser.error("--duration x --rate must be in 1..4096 events and --slowdown above 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    stacks: list[Stack] = []  # stopped in reverse start order
    workdir, ok = Path(mkdtemp(prefix="bench-fanout-")), False  # logs, envoy.yaml
    try:
        stacks.append(start_upstream(args.rate, workdir))
        options = StackOptions(upstream=stacks[0].upstream_url, port=0, admin_port=0)
        stacks.append(start_stack(options, workdir))
        pids = {c.name: c.process.pid for s in stacks for c in s.children}
        host = {**machine(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        result = asyncio.run(measure(Ctx(args, stacks[1], pids)))
        print(report(host, args, result))
        if args.json:
            params = {k: v for k, v in vars(args).items() if k != "json"}
            doc = {"machine": host, "params": params, **result}
            args.json.write_text(json.dumps(finite(doc), indent=2) + "\n")
        ok = True
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for stack in reversed(stacks):
            stack.stop()
        if not ok:
            print(f"bench: logs and envoy.yaml kept in {workdir}", file=sys.stderr)
    shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
