"""Several relay nodes behind one Envoy, sharing sessions through a real redis-server: any node
serves any session, a SIGKILLed node's sessions end `failed` for their readers, a node paused
past its lease is fenced (its clients are cut, never told complete, and every node serves one
truth afterwards), Redis down means 503 for reads but never for the first client, and Redis
restarted empty means 503 while writers copy their live sessions back, then 404."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import envoy_stats, get_json, make_stack
from redis_server import RedisServer
from test_detached import read_events, wait_for
from test_e2e import ID_LINE, chat, events_of, stream_bytes

from extproc.ops.supervisor import Child, Stack

LEASE_S = 1.5
SLOW = {"x-demo-rate": "20"}  # a generation that outlives the test's actions


def cluster(
    tmp_path: Path, redis: RedisServer, *, write_path: str = "detached", lease: float = LEASE_S
) -> Stack:
    args = ("--store", redis.url, "--node-lease", str(lease), "--detach-grace", "10")
    return make_stack(tmp_path, write_path=write_path, relay_args=args, nodes=2)


@pytest.fixture
def two_nodes(tmp_path: Path, redis_server: RedisServer) -> Iterator[Stack]:
    running = cluster(tmp_path, redis_server)
    yield running
    running.stop()


def node(stack: Stack, index: int) -> Child:
    return [c for c in stack.children if c.name.startswith("relay")][index]


def sse_events(url: str, session: str, after: str = "") -> tuple[int, list[bytes]]:
    """Every event a reader of /events gets, relay.end included (or the status if not 200)."""
    params = {"after": after} if after else {}
    response = httpx.get(f"{url}/relay/v1/sessions/{session}/events", params=params, timeout=30)
    return response.status_code, events_of(response.content)


def end_of(events: list[bytes]) -> dict[str, object]:
    assert events and b"event: relay.end" in events[-1], events[-1:]
    data = events[-1].split(b"data: ", 1)[1].strip()
    return dict(json.loads(data))


def detach_on(url: str, payload: dict[str, object], **headers: str) -> httpx.Response:
    """A generation started on one particular node (what Envoy's detached route does)."""
    return httpx.post(
        f"{url}/_relay/detach/v1/chat/completions", json=payload, headers=headers, timeout=30
    )


def resume(url: str, session: str, seq: int, payload: dict[str, object]) -> httpx.Response:
    """A client coming back with Last-Event-ID and its request, as Envoy routes it to a node."""
    return httpx.post(
        f"{url}/_relay/resume/v1/chat/completions",
        json=payload,
        headers={"Last-Event-ID": f"{session}:{seq}"},
        timeout=30,
    )


def test_any_node_serves_a_session_any_node_wrote(two_nodes: Stack) -> None:
    originals = {}
    for i in range(4):  # Envoy balances the generations across both nodes
        payload = chat(prompt=f"shared {i}")
        response = stream_bytes(two_nodes, payload)
        assert response.status_code == 200
        originals[response.headers["x-relay-session"]] = (payload, response.content)
    for session, (payload, body) in originals.items():
        events = events_of(body)
        for url in [*two_nodes.relay_http_urls, two_nodes.base_url]:
            again = resume(url, session, 3, payload) if url != two_nodes.base_url else None
            if again is None:  # through Envoy: the client's own reconnect
                again = stream_bytes(two_nodes, payload, **{"Last-Event-ID": f"{session}:3"})
            assert again.status_code == 200, again.text
            assert again.content == b"".join(events[3:])
            status, read = sse_events(url, session)
            assert status == 200
            assert read[:-1] == events and end_of(read)["state"] == "done"


def test_a_live_session_is_tailed_through_the_other_node(two_nodes: Stack) -> None:
    writer, reader = two_nodes.relay_http_urls
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{writer}/_relay/detach/v1/chat/completions",
            json=chat(max_tokens=30),
            headers=SLOW,
        ) as first,
    ):
        session = first.headers["x-relay-session"]
        status, tailed = sse_events(reader, session)  # starts live, ends with the session
        first.read()
    assert status == 200
    assert tailed[:-1] == events_of(first.content)
    assert end_of(tailed) == {"state": "done", "reason": "", "last_seq": len(tailed) - 1}


def test_two_stacks_on_one_redis_see_each_others_sessions(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    args = ("--store", redis_server.url)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = make_stack(tmp_path / "a", relay_args=args)
    try:
        b = make_stack(tmp_path / "b", relay_args=args)
        try:
            payload = chat(prompt="from stack a")
            response = stream_bytes(a, payload)
            session = response.headers["x-relay-session"]
            again = stream_bytes(b, payload, **{"Last-Event-ID": f"{session}:2"})
            assert again.status_code == 200
            assert again.content == b"".join(events_of(response.content)[2:])
        finally:
            b.stop()
    finally:
        a.stop()


def healthy_relays(stack: Stack) -> int:
    clusters = get_json(f"{stack.admin_url}/clusters?format=json")["cluster_statuses"]
    assert isinstance(clusters, list)
    grpc = next(c for c in clusters if c["name"] == "relay_grpc")
    return sum(
        1
        for host in grpc["host_statuses"]
        if not host["health_status"].get("failed_active_health_check")
    )


def test_a_killed_node_fails_its_sessions_and_traffic_moves_on(two_nodes: Stack) -> None:
    survivor, doomed = two_nodes.relay_http_urls
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{doomed}/_relay/detach/v1/chat/completions",
            json=chat(max_tokens=400),
            headers=SLOW,
        ) as first,
    ):
        session = first.headers["x-relay-session"]
        read_events(first.iter_raw(), 3)
        wait_for(
            "the survivor to see the session",
            lambda: httpx.get(f"{survivor}/relay/v1/sessions/{session}").status_code == 200,
        )
        victim = node(two_nodes, 1)
        victim.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.process.wait(timeout=10)
        status, read = sse_events(survivor, session)  # returns once the session has ended
        failed_after = time.monotonic() - killed_at
    assert status == 200
    end = end_of(read)
    assert end["state"] == "failed" and "stopped" in str(end["reason"])
    assert end["last_seq"] == len(read) - 1 >= 3  # what was stored before the kill is kept
    # Bounded: the lease, plus one blocking read's timeout, plus scheduling slack.
    assert failed_after < LEASE_S + 5, failed_after

    wait_for("Envoy to take the dead node out", lambda: healthy_relays(two_nodes) == 1)
    for i in range(4):
        response = stream_bytes(two_nodes, chat(prompt=f"after the kill {i}"))
        assert response.status_code == 200
        assert len(ID_LINE.findall(response.content)) == len(events_of(response.content))


def test_inline_traffic_survives_a_killed_node(tmp_path: Path, redis_server: RedisServer) -> None:
    stack = cluster(tmp_path, redis_server, write_path="inline")
    try:
        with (
            httpx.Client(timeout=60) as client,
            client.stream(
                "POST",
                f"{stack.base_url}/v1/chat/completions",
                json=chat(max_tokens=60),
                headers=SLOW,
            ) as response,
        ):
            session = response.headers["x-relay-session"]
            chunks = response.iter_raw()
            seen = read_events(chunks, 3)
            owner = next(
                i for i, url in enumerate(stack.relay_http_urls) if _active_inline(url) == 1
            )
            other = stack.relay_http_urls[1 - owner]
            node(stack, owner).process.send_signal(signal.SIGKILL)
            body = seen + b"".join(chunks)  # the client's stream goes on, fail-open
        assert events_of(body)[-1] == b"data: [DONE]\n\n"
        assert envoy_stats(stack)["http.relay.ext_proc.failure_mode_allowed"] >= 1
        status, read = sse_events(other, session)
        assert status == 200 and end_of(read)["state"] == "failed"
    finally:
        stack.stop()


def _active_inline(url: str) -> float:
    return _active(url, "inline")


def _active(url: str, write_path: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith(f'relay_sessions_active{{write_path="{write_path}"}}')
    )
    return float(line.split()[-1])


def read_to_end(chunks: Iterator[bytes]) -> tuple[bytes, bool]:
    """The rest of a response's body, and whether it ended cleanly (False: it was cut)."""
    body = b""
    try:
        for chunk in chunks:
            body += chunk
    except (httpx.RemoteProtocolError, httpx.ReadError):  # no last chunk, or a reset
        return body, False
    return body, True


def stream_to_end(
    url: str, headers: dict[str, str], payload: dict[str, object]
) -> tuple[bytes, bool]:
    """A resume through Envoy, with the request that made the session: (everything it got,
    whether it ended cleanly)."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", url, json=payload, headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        return read_to_end(response.iter_raw())


class Reader(threading.Thread):
    """An SSE reader of /events on one node, in the background, until the session ends."""

    def __init__(self, url: str, session: str) -> None:
        super().__init__(daemon=True)
        self.url, self.session = url, session
        self.started = threading.Event()
        self.events: list[bytes] = []

    def run(self) -> None:
        url = f"{self.url}/relay/v1/sessions/{self.session}/events"
        with httpx.Client(timeout=60) as client, client.stream("GET", url) as response:
            body = b""
            for chunk in response.iter_raw():
                body += chunk
                self.started.set()
            self.events = events_of(body)


def one_truth(
    stack: Stack, session: str, payload: dict[str, object]
) -> tuple[list[bytes], dict[str, object]]:
    """What every node serves of an ended session, checked to be the same everywhere, and a
    resume through Envoy (whichever node it reaches) gets the same events and is cut."""
    views = [sse_events(url, session) for url in stack.relay_http_urls]
    assert all(status == 200 for status, _ in views), views
    first = views[0][1]
    assert all(events == first for _, events in views), "the nodes disagree"
    end = end_of(first)
    assert end["state"] == "failed" and end["last_seq"] == len(first) - 1
    for _ in range(4):
        body, complete = stream_to_end(
            f"{stack.base_url}/v1/chat/completions", {"Last-Event-ID": f"{session}:1"}, payload
        )
        assert not complete, "a failed session was passed off as complete"
        assert events_of(body)[:-1] == first[1:-1]  # then the cut's `: relay: ...` comment
    return first[:-1], end


# How long a writing node is stopped: past its lease, so another node may declare its session
# failed; this is the fault itself, not a wait for something to happen.
PAUSE_LEASES = 3.0


def test_a_writer_paused_past_its_lease_is_fenced_and_every_node_agrees(
    two_nodes: Stack,
) -> None:
    """The issue-16 split brain: the paused node's client gets neither the rest nor `done`."""
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{two_nodes.base_url}/v1/chat/completions",
            json=(payload := chat(max_tokens=400)),
            headers=SLOW,
        ) as first,
    ):
        session = first.headers["x-relay-session"]
        chunks = first.iter_raw()
        seen = read_events(chunks, 3)
        owner = next(
            i for i, url in enumerate(two_nodes.relay_http_urls) if _active(url, "detached")
        )
        reader = Reader(two_nodes.relay_http_urls[1 - owner], session)
        reader.start()
        assert reader.started.wait(10), "the other node's reader got nothing"
        writer = node(two_nodes, owner).process
        writer.send_signal(signal.SIGSTOP)
        try:
            reader.join(LEASE_S + 10)  # the other node declares the session failed
            assert not reader.is_alive(), "the paused node's session never ended elsewhere"
            time.sleep(max(0.0, PAUSE_LEASES * LEASE_S - LEASE_S))  # the fault, see above
        finally:
            writer.send_signal(signal.SIGCONT)
        rest, complete = read_to_end(chunks)
    shown = events_of(seen + rest)
    assert not complete and b"[DONE]" not in seen + rest
    served, end = one_truth(two_nodes, session, payload)
    assert reader.events[:-1] == served and end_of(reader.events) == end
    # What the paused node's client got is what every node serves, but for the events of one
    # replication round (~20 ms) shown just before the pause and never copied: its client
    # was cut after them, and a resume from there is answered 410.
    shown_events = [e for e in shown if not e.startswith(b": relay:")]
    assert shown_events[: len(served)] == served
    assert len(shown_events) - len(served) <= 2


def test_a_paused_inline_writer_cuts_its_client_and_every_node_agrees(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Inline: paused past its lease but within Envoy's 2 s message timeout, the writer cuts
    its client on waking (Envoy resets the response) instead of tagging and sending the rest."""
    lease = 0.8  # renewed every 0.27 s; the pause must stay under 2 s, see the docstring
    args = ("--store", redis_server.url, "--node-lease", str(lease))
    stack = make_stack(tmp_path, write_path="inline", relay_args=args, nodes=2)
    try:
        with (
            httpx.Client(timeout=60) as client,
            client.stream(
                "POST",
                f"{stack.base_url}/v1/chat/completions",
                json=(payload := chat(max_tokens=200)),
                headers=SLOW,
            ) as response,
        ):
            session = response.headers["x-relay-session"]
            chunks = response.iter_raw()
            seen = read_events(chunks, 3)
            owner = next(i for i, url in enumerate(stack.relay_http_urls) if _active_inline(url))
            writer = node(stack, owner).process
            writer.send_signal(signal.SIGSTOP)
            try:
                time.sleep(1.75 * lease)  # the fault, see PAUSE_LEASES
            finally:
                writer.send_signal(signal.SIGCONT)
            rest, complete = read_to_end(chunks)
        body = seen + rest
        assert not complete and b"[DONE]" not in body
        assert len(ID_LINE.findall(body)) == len(events_of(body))  # nothing untagged either
        assert envoy_stats(stack).get("http.relay.ext_proc.failure_mode_allowed", 0) == 0
        wait_for("the session to end in Redis", lambda: _ended(stack, session))
        served, _ = one_truth(stack, session, payload)
        assert events_of(body)[: len(served)] == served
        assert len(events_of(body)) - len(served) <= 2  # see the test above
    finally:
        stack.stop()


def _ended(stack: Stack, session: str) -> bool:
    response = httpx.get(f"{stack.relay_http_urls[0]}/relay/v1/sessions/{session}", timeout=10)
    return response.status_code == 200 and response.json()["state"] != "open"


def test_redis_down_503_for_reads_never_for_first_clients_then_recovery(
    two_nodes: Stack, redis_server: RedisServer
) -> None:
    asked = {"before": chat(prompt="before the outage"), "during": chat(prompt="during the outage")}
    before = stream_bytes(two_nodes, asked["before"])
    old = before.headers["x-relay-session"]
    for url in two_nodes.relay_http_urls:
        wait_for(
            "the session in Redis",
            lambda u=url: resume(u, old, 1, asked["before"]).status_code == 200,
        )

    redis_server.stop()
    during = stream_bytes(two_nodes, asked["during"])
    assert during.status_code == 200  # the first client never depends on Redis
    assert len(ID_LINE.findall(during.content)) == len(events_of(during.content)) > 3
    new = during.headers["x-relay-session"]
    refused = stream_bytes(two_nodes, asked["before"], **{"Last-Event-ID": f"{old}:1"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "store_unavailable"
    # The node that wrote the new session still answers for it; the other cannot yet.
    statuses = sorted(
        resume(url, new, 1, asked["during"]).status_code for url in two_nodes.relay_http_urls
    )
    assert statuses == [200, 503]

    redis_server.start()  # the same data: nothing already in Redis is lost
    for url in two_nodes.relay_http_urls:
        for session, body, payload in (
            (old, before.content, asked["before"]),
            (new, during.content, asked["during"]),
        ):
            wait_for(
                "reads to recover",
                lambda u=url, s=session, p=payload: resume(u, s, 1, p).status_code == 200,
            )
            assert resume(url, session, 1, payload).content == b"".join(events_of(body)[1:])


def test_redis_restarted_empty_means_unknown_sessions(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # A long lease: an idle writer copies its live session back only at its next beat (2 s).
    two_nodes = cluster(tmp_path, redis_server, lease=6.0)
    try:
        _restarted_empty(two_nodes, redis_server)
    finally:
        two_nodes.stop()


def _restarted_empty(two_nodes: Stack, redis_server: RedisServer) -> None:
    payload = chat(prompt="soon forgotten")
    response = stream_bytes(two_nodes, payload)
    session = response.headers["x-relay-session"]
    for url in two_nodes.relay_http_urls:
        wait_for(
            "the session in Redis", lambda u=url: resume(u, session, 1, payload).status_code == 200
        )
    writer, other = two_nodes.relay_http_urls
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{writer}/_relay/detach/v1/chat/completions",
            json=chat(max_tokens=100),
            headers={"x-demo-rate": "0.5"},  # idle: copied back at the writer's next beat
        ) as live,
    ):
        live_id = live.headers["x-relay-session"]
        read_events(live.iter_raw(), 1)
        info = f"{other}/relay/v1/sessions/{live_id}"
        wait_for("the other node to know it", lambda: httpx.get(info).status_code == 200)
        redis_server.stop()
        redis_server.start(empty=True)
        # The writer copies its live session back; meanwhile the other node says 503 (retry),
        # never 404, which a client would take as final.
        statuses: list[int] = []

        def copied_back() -> bool:
            statuses.append(httpx.get(info).status_code)
            return statuses[-1] == 200

        wait_for("the live session to be copied back", copied_back)
        assert set(statuses) <= {200, 503}, statuses
    for url in two_nodes.relay_http_urls:
        wait_for("Redis to answer", lambda u=url: resume(u, session, 1, payload).status_code != 503)
        gone = resume(url, session, 1, payload)
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "session_not_found"
