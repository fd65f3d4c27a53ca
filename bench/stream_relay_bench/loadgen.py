"""The load generator: paced LLM-like streams and the other jobs, run as its own process.

Every job talks HTTP/1.1 through `http1` (raw asyncio sockets); one `data_received` call
de-chunks the body and finds every `"x_demo_ts":` stamp with bytes.find, so nothing runs per
event but a float parse.

Run as `python -m stream_relay_bench.loadgen`: one JSON job on stdin, JSON lines on stdout:
`{"phase": "start"}` and `{"phase": "end"}` around the measured window (the orchestrator
samples the other processes' CPU there), `{"phase": "open"}` when held sessions are open
(then it waits for a line on stdin), and finally `{"result": {...}}`.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stream_relay_bench.http1 import Connection, HttpError, Response
from stream_relay_bench.stats import expected_events, summary

TS_KEY = b'"x_demo_ts":'
Job = dict[str, Any]


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


@dataclass
class Tally:
    """What the client received; latencies only for events received inside the window."""

    window: tuple[float, float] = (0.0, float("inf"))
    events: int = 0  # with a stamp, inside the window
    events_all: int = 0
    expected: int = 0  # events the upstream schedule put inside the window
    tagged: int = 0  # events carrying an SSE id line
    event_bytes: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)

    def result(self) -> Job:
        wall = self.window[1] - self.window[0]
        return {
            "events": self.events,
            "events_all": self.events_all,
            "expected": self.expected,
            "tagged": self.tagged,
            "requests": self.requests,
            "errors": len(self.errors),
            "error_samples": sorted(set(self.errors))[:5],
            "wall_s": wall,
            "events_per_s": self.events / wall if wall > 0 else 0.0,
            "offered_events_per_s": self.expected / wall if wall > 0 else 0.0,
            "event_bytes_mean": self.event_bytes / max(self.events_all, 1),
            "latency_ms": summary(self.latencies_ms),
            "ttft_ms": summary(self.ttft_ms, ("p50", "p99")),
        }


class SseCounter:
    """Counts events and their latency in a body stream of `data:` JSON events."""

    def __init__(self, tally: Tally, on_first: Callable[[float], None] | None = None) -> None:
        self.tally = tally
        self.on_first = on_first
        self._buf = b""
        self.events = 0
        self.ids: list[bytes] = []  # first id line seen, when asked for
        self.want_ids = False
        self.ended = False  # a relay.end marker arrived

    def __call__(self, data: bytes, now: float) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return
        block, self._buf = buf[: end + 2], buf[end + 2 :]
        tally, start, count = self.tally, 0, 0
        in_window = tally.window[0] <= now < tally.window[1]
        while (at := block.find(TS_KEY, start)) >= 0:
            close = block.find(b"}", at)
            start = close
            count += 1
            if in_window:
                tally.latencies_ms.append((now - float(block[at + 12 : close])) * 1000)
        if count:
            if self.events == 0 and self.on_first is not None:
                self.on_first(now)
            self.events += count
            tally.events_all += count
            tally.event_bytes += len(block)
            tally.tagged += block.count(b"\nid: ") + block.startswith(b"id: ")
            if in_window:
                tally.events += count
            if self.want_ids and not self.ids:
                line_end = block.find(b"\n")
                if block.startswith(b"id: "):
                    self.ids.append(block[4:line_end])
        if b"event: relay.end" in block:
            self.ended = True


def _chat_body(model: str, tokens: int) -> bytes:
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": model, "messages": messages, "max_tokens": tokens, "stream": True}
    return json.dumps(body).encode()


def _demo_headers(
    rate: float, ttft_ms: float, extra: dict[str, str] | None = None
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "x-demo-rate": f"{rate:g}",
        "x-demo-ttft-ms": f"{ttft_ms:g}",
    }
    return {**headers, **(extra or {})}


# ---------------------------------------------------------------------------------------------
# Jobs


async def _stream_worker(job: Job, spec: Job, tally: Tally, deadline: float) -> None:
    """One client: back-to-back streamed requests on one keep-alive connection, each capped so
    that it ends before the deadline (no generation outlives the run)."""
    rng = random.Random(spec["seed"])
    await asyncio.sleep(spec["delay_s"])
    conn: Connection | None = None
    rate = spec["rate"]
    try:
        while True:
            ttft_ms = rng.uniform(*job["ttft_ms"])
            left_s = deadline - time.time() - ttft_ms / 1000
            tokens = min(rng.randint(*job["tokens"]), int(left_s * rate) - 2)
            if tokens < 1:
                return
            if conn is None or conn.closed:
                conn = await Connection.open(job["host"], job["port"])
            sent = time.time()

            def first(now: float, sent: float = sent) -> None:
                tally.ttft_ms.append((now - sent) * 1000)

            response = Response(SseCounter(tally, first))
            conn.request(
                "POST",
                job["path"],
                _demo_headers(rate, ttft_ms, job.get("headers")),
                _chat_body(spec["model"], tokens),
                response,
            )
            tally.requests += 1
            tally.expected += expected_events(
                sent + ttft_ms / 1000, rate, tokens + 2, *tally.window
            )
            status = await response.head
            if status != 200:
                tally.errors.append(f"HTTP {status}")
            await response.done
            if response.headers.get("connection", "").lower() == "close":
                conn.close()
                conn = None
    except (OSError, HttpError, ValueError) as exc:
        tally.errors.append(repr(exc))
    finally:
        if conn is not None:
            conn.close()


async def streams(job: Job) -> Job:
    """Many concurrent paced streams for warmup_s + duration_s; the window is the last part."""
    t0 = time.time()
    tally = Tally(window=(t0 + job["warmup_s"], t0 + job["warmup_s"] + job["duration_s"]))
    deadline = tally.window[1]
    tasks = [
        asyncio.create_task(_stream_worker(job, spec, tally, deadline)) for spec in job["streams"]
    ]
    await asyncio.sleep(max(0.0, tally.window[0] - time.time()))
    cpu0 = _cpu_s()
    _emit({"phase": "start"})
    await asyncio.sleep(max(0.0, tally.window[1] - time.time()))
    cpu = _cpu_s() - cpu0
    _emit({"phase": "end"})
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    return {**tally.result(), "loadgen_cpu_s": cpu}


async def _post_session(
    job: Job,
    tally: Tally,
    rate: float,
    tokens: int,
    ttft_ms: float,
    extra: dict[str, str] | None = None,
) -> tuple[Connection, Response, SseCounter]:
    conn = await Connection.open(job["host"], job["port"])
    counter = SseCounter(tally)
    response = Response(counter)
    conn.request(
        "POST",
        "/v1/chat/completions",
        _demo_headers(rate, ttft_ms, extra),
        _chat_body(job.get("model", "bench"), tokens),
        response,
    )
    status = await response.head
    if status != 200 or ("x-relay-session" not in response.headers and job.get("session", True)):
        raise HttpError(f"no session: HTTP {response.status} {response.headers}")
    return conn, response, counter


async def _get(job: Job, path: str, counter: SseCounter) -> tuple[Connection, Response]:
    conn = await Connection.open(job["host"], job["port"])
    response = Response(counter)
    conn.request("GET", path, {"Accept": "text/event-stream"}, b"", response)
    return conn, response


async def multicast(job: Job) -> Job:
    """One detached session at `rate` read by `readers` clients: the POST's own response plus
    readers-1 SSE readers on /relay/v1/sessions/{id}/events, all joined before event 1."""
    readers, rate, tokens = job["readers"], job["rate"], job["tokens"]
    tally = Tally()
    ttft_ms = 500 + 10 * readers  # time for the readers to attach
    conn, response, first = await _post_session(job, tally, rate, tokens, ttft_ms)
    session = response.headers["x-relay-session"]
    counters = [first]
    conns, responses = [conn], [response]
    for _ in range(readers - 1):
        counter = SseCounter(tally)
        c, r = await _get(job, f"/relay/v1/sessions/{session}/events", counter)
        counters.append(counter)
        conns.append(c)
        responses.append(r)
    await asyncio.gather(*(r.head for r in responses))
    first_at: list[float] = []
    first.on_first = first_at.append
    joined = time.time()
    cpu0 = _cpu_s()
    _emit({"phase": "start"})
    try:
        await asyncio.wait_for(asyncio.gather(*(r.done for r in responses)), 60 + tokens / rate)
    finally:
        for c in conns:
            c.close()
    cpu = _cpu_s() - cpu0
    tally.window = (joined, time.time())
    _emit({"phase": "end"})
    complete = sum(c.events == tokens + 2 for c in counters)
    streaming_s = tally.window[1] - (first_at[0] if first_at else joined)
    return {
        **tally.result(),
        "events": tally.events_all,
        "readers": readers,
        "events_per_s": tally.events_all / streaming_s,
        "complete": complete,
        "loadgen_cpu_s": cpu,
    }


async def resume(job: Job) -> Job:
    """Reconnect -> first replayed event: a fresh connection (TCP connect included) sending
    the original request again with `Last-Event-ID: <session>:<k>`; finished and live sessions."""
    out: Job = {}
    for state in ("finished", "live"):
        tally, times, bad = Tally(), [], 0
        for i in range(job["sessions"]):
            live = state == "live"
            rate, tokens = (50.0, 200) if live else (0.0, 100)
            conn, response, counter = await _post_session(job, tally, rate, tokens, 0, None)
            session = response.headers["x-relay-session"]
            if live:
                while counter.events < 5:  # read a few events, then drop the connection
                    await asyncio.wait([response.done], timeout=0.01)
                k = counter.events - 3  # as if the last 3 were lost in flight: they replay
            else:
                await response.done
                k = (tokens + 2) // 2
            conn.close()
            seen = SseCounter(tally)
            seen.want_ids = True
            got = asyncio.get_running_loop().create_future()
            seen.on_first = lambda now, got=got: got.done() or got.set_result(now)
            started = time.time()
            conn = await Connection.open(job["host"], job["port"])
            response = Response(seen)
            headers = _demo_headers(rate, 0, {"Last-Event-ID": f"{session}:{k}"})
            # The very request that made the session: a resume must repeat it (else 409).
            body = _chat_body(job.get("model", "bench"), tokens)
            conn.request("POST", "/v1/chat/completions", headers, body, response)
            try:
                now = await asyncio.wait_for(got, 10)
                times.append((now - started) * 1000)
                bad += seen.ids[:1] != [f"{session}:{k + 1}".encode()]
            except TimeoutError:
                bad += 1
            finally:
                conn.close()
            if live:  # stop its generation: DELETE through the relay front
                c = await Connection.open(job["host"], job["port"])
                r = Response(lambda data, now: None)
                c.request("DELETE", f"/relay/v1/sessions/{session}", {}, b"", r)
                await asyncio.wait_for(r.done, 10)
                c.close()
            del i
        out[state] = {
            "sessions": job["sessions"],
            "wrong_first_id": bad,
            "first_event_ms": summary(times, ("p50", "p99", "max")),
        }
    return out


async def hold(job: Job) -> Job:
    """Open `sessions` streams whose first event is far away, report when all are open, wait
    for a line on stdin, close them. For the relay's memory per open session (`"session":
    false`: a path without relay sessions, such as the no-op processor's)."""
    tally = Tally()
    sem = asyncio.Semaphore(50)

    async def one() -> Connection:
        async with sem:
            conn, _, _ = await _post_session(job, tally, 1.0, 5, job["ttft_ms"])
            return conn

    conns = await asyncio.gather(*(one() for _ in range(job["sessions"])))
    _emit({"phase": "open"})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for conn in conns:
        conn.close()
    return {"sessions": len(conns)}


async def finished(job: Job) -> Job:
    """`sessions` short unpaced streams read to their end: idle finished sessions in the log."""
    tally = Tally()
    sem = asyncio.Semaphore(20)

    async def one() -> None:
        async with sem:
            conn, response, _ = await _post_session(job, tally, 0.0, job["tokens"], 0)
            await response.done
            conn.close()

    await asyncio.gather(*(one() for _ in range(job["sessions"])))
    return {
        "sessions": job["sessions"],
        "events": tally.events_all,
        "event_bytes": tally.event_bytes,
    }


JOBS = {
    "streams": streams,
    "multicast": multicast,
    "resume": resume,
    "hold": hold,
    "finished": finished,
}


def main() -> int:
    job = json.loads(sys.stdin.readline())
    result = asyncio.run(JOBS[job["kind"]](job))
    _emit({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
