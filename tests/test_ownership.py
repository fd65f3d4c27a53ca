"""Session ownership end to end: Envoy authenticates (API keys, JWT), the relay lets only the
owner, or a holder of the owner's share token, read a session, over every protocol, on both
write paths and on two nodes sharing Redis. Strangers get the 404 of an unknown id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import make_stack, upstream_stats
from test_e2e import events_of
from test_security import ALICE_KEY, AUDIENCE, BOB_KEY, CHAT, ISSUER, Creds, bearer
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from extproc.ops.supervisor import Stack
from extproc.proto.relay.v1 import relay_pb2_grpc
from extproc.proto.relay.v1.relay_pb2 import SubscribeRequest

SLOW = {"x-demo-rate": "20"}


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    return Creds(tmp_path_factory.mktemp("creds"))


@pytest.fixture(scope="module", params=["detached", "inline", "redis-2-nodes"])
def owned(
    request: pytest.FixtureRequest, creds: Creds, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(f"owned-{request.param}")
    if request.param == "redis-2-nodes":
        redis = request.getfixturevalue("shared_redis")
        stack = make_stack(
            workdir, security=creds.security(), relay_args=("--store", redis.url), nodes=2
        )
    else:
        stack = make_stack(workdir, security=creds.security(), write_path=request.param)
    yield stack
    stack.stop()


def generate(stack: Stack, headers: dict[str, str]) -> tuple[str, bytes]:
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.headers["x-relay-session"], response.content


def resume(stack: Stack, session: str, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json=CHAT,
        headers={"last-event-id": f"{session}:1", **headers},
        timeout=30,
    )


def reads(stack: Stack, session: str, headers: dict[str, str], query: str = "") -> httpx.Response:
    url = f"{stack.base_url}/relay/v1/sessions/{session}/events{query}"
    return httpx.get(url, headers=headers, timeout=30)


def as_unknown(response: httpx.Response, session: str) -> bytes:
    """The body with the session id blanked: what must equal an unknown id's answer."""
    assert response.status_code == 404, response.text
    return response.content.replace(session.encode(), b"<id>")


async def grpc_read(stack: Stack, session: str, metadata: tuple[tuple[str, str], ...]) -> int:
    """Events a gRPC subscriber gets, or raises the call's error."""
    target = httpx.URL(stack.base_url).netloc.decode()
    async with grpc.aio.insecure_channel(target) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Subscribe(
            SubscribeRequest(session=session), metadata=metadata
        )
        return len([r async for r in call])


def test_strangers_get_the_404_of_an_unknown_id_everywhere(owned: Stack, creds: Creds) -> None:
    session, body = generate(owned, bearer(ALICE_KEY))
    unknown = "Q" * 22
    reference = as_unknown(resume(owned, unknown, bearer(BOB_KEY)), unknown)

    mine = resume(owned, session, bearer(ALICE_KEY))
    assert mine.status_code == 200 and mine.content == b"".join(events_of(body)[1:])
    for stranger in (bearer(BOB_KEY), bearer(creds.jwt("mallory"))):
        assert as_unknown(resume(owned, session, stranger), session) == reference
        assert as_unknown(reads(owned, session, stranger), session) == as_unknown(
            reads(owned, unknown, stranger), unknown
        )
        for method in ("GET", "DELETE"):
            answer = httpx.request(
                method, f"{owned.base_url}/relay/v1/sessions/{session}", headers=stranger
            )
            assert answer.status_code == 404, (method, answer.text)
        share = httpx.post(
            f"{owned.base_url}/relay/v1/sessions/{session}/share", headers=stranger, timeout=30
        )
        assert share.status_code == 404


async def test_strangers_cannot_subscribe_over_grpc_or_websocket(owned: Stack) -> None:
    session, body = await asyncio.to_thread(generate, owned, bearer(ALICE_KEY))
    alice = (("authorization", f"Bearer {ALICE_KEY}"),)
    bob = (("authorization", f"Bearer {BOB_KEY}"),)
    assert await grpc_read(owned, session, alice) == len(events_of(body)) + 1  # + the end
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await grpc_read(owned, session, bob)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    ws_url = owned.base_url.replace("http", "ws", 1) + f"/relay/v1/sessions/{session}/ws"
    with pytest.raises(InvalidStatus) as rejected:
        async with ws_connect(ws_url, additional_headers=dict(bob)):
            pass
    assert rejected.value.response.status_code == 404
    async with ws_connect(ws_url, additional_headers=dict(alice)) as ws:
        messages = [message async for message in ws]
    assert len(messages) == len(events_of(body)) + 1


def test_a_share_token_lets_one_reader_in_read_only_until_revoked(owned: Stack) -> None:
    session, body = generate(owned, bearer(ALICE_KEY))
    minted = httpx.post(
        f"{owned.base_url}/relay/v1/sessions/{session}/share?ttl=600",
        headers=bearer(ALICE_KEY),
        timeout=30,
    )
    assert minted.status_code == 201, minted.text
    token = minted.json()["token"]
    assert minted.json()["events_url"].endswith(f"?share={token}")

    viewer = reads(owned, session, bearer(BOB_KEY), f"?share={token}")  # an EventSource
    assert viewer.status_code == 200
    assert events_of(viewer.content)[:-1] == events_of(body)
    again = resume(owned, session, bearer(BOB_KEY) | {"x-relay-share": token})
    assert again.status_code == 200 and again.content == b"".join(events_of(body)[1:])

    with_token = bearer(BOB_KEY) | {"x-relay-share": token}
    cancel = httpx.delete(f"{owned.base_url}/relay/v1/sessions/{session}", headers=with_token)
    assert cancel.status_code == 404  # read-only: the owner's rights stay the owner's
    other, _ = generate(owned, bearer(ALICE_KEY))
    assert reads(owned, other, with_token).status_code == 404  # one session per token

    revoked = httpx.delete(
        f"{owned.base_url}/relay/v1/sessions/{session}/share/{minted.json()['token_id']}",
        headers=bearer(ALICE_KEY),
    )
    assert revoked.status_code == 204
    assert reads(owned, session, with_token).status_code == 404


# Subjects the old owner key (cut to 256 characters, passed through a header that trims
# whitespace and re-encodes non-ASCII) folded into one owner.
COLLIDING_SUBJECTS = [
    ("u" * 252 + "-victim", "u" * 252 + "-attacker"),
    ("victim", "victim "),
    ("victim", "victim\t"),
    ("josé", "josÃ©"),
]


@pytest.mark.parametrize(("victim", "attacker"), COLLIDING_SUBJECTS)
async def test_subjects_that_once_collided_are_strangers_everywhere(
    owned: Stack, creds: Creds, victim: str, attacker: str
) -> None:
    mine, theirs = bearer(creds.jwt(victim)), bearer(creds.jwt(attacker))
    session, body = await asyncio.to_thread(generate, owned, mine)
    assert (await asyncio.to_thread(resume, owned, session, theirs)).status_code == 404
    assert (await asyncio.to_thread(reads, owned, session, theirs)).status_code == 404
    async with httpx.AsyncClient(base_url=owned.base_url, timeout=30) as client:
        for method, path in (
            ("GET", ""),
            ("DELETE", ""),
            ("POST", "/share"),
        ):
            answer = await client.request(
                method, f"/relay/v1/sessions/{session}{path}", headers=theirs
            )
            assert answer.status_code == 404, (method, path, answer.text)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await grpc_read(owned, session, tuple(theirs.items()))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    ws_url = owned.base_url.replace("http", "ws", 1) + f"/relay/v1/sessions/{session}/ws"
    with pytest.raises(InvalidStatus) as rejected:
        async with ws_connect(ws_url, additional_headers=theirs):
            pass
    assert rejected.value.response.status_code == 404
    # The owner still reads it all.
    assert await grpc_read(owned, session, tuple(mine.items())) == len(events_of(body)) + 1


def test_unreadable_or_unbounded_identities_get_401_not_a_folded_owner(
    owned: Stack, creds: Creds
) -> None:
    def raw(sub: bytes) -> str:  # a signed payload with exactly these `sub` bytes
        exp = int(time.time()) + 600
        claims = f'"iss": "{ISSUER}", "aud": "{AUDIENCE}", "exp": {exp}'.encode()
        return creds.sign(b"{" + claims + b", " + sub + b"}")

    # Envoy's JWT parser refuses some itself; the relay refuses the same (tests/test_identity.py)
    # in case an Envoy does not.
    refused = {
        "oversize sub": (creds.jwt("x" * 1025), "invalid_identity"),  # never cut to fit
        "lone surrogate": (raw(b'"sub": "\\ud800"'), None),
        "two subs": (raw(b'"sub": "victim", "sub": "attacker"'), None),
        "not UTF-8": (raw(b'"sub": "jos\xe9"'), None),
        "no exp": (creds.jwt("no-exp", exp=None), None),  # Envoy: require_expiration
        "valid too long": (creds.jwt("long", exp=int(time.time()) + 2 * 86400), None),
    }
    for case, (token, code) in refused.items():
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/relay/v1/sessions/x")):
            answer = httpx.request(
                method, owned.base_url + path, json=CHAT, headers=bearer(token), timeout=30
            )
            assert answer.status_code == 401, (case, path, answer.text)
            if code is not None:
                assert answer.json()["error"]["code"] == code, (case, path)


async def _reader_cut(stack: Stack, protocol: str, session: str, headers: dict[str, str]) -> str:
    """Read a session as `protocol` through Envoy until the relay stops it: "cut", or what else
    happened."""
    if protocol == "sse":
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream(
                "GET", f"{stack.base_url}/relay/v1/sessions/{session}/events", headers=headers
            ) as response,
        ):
            assert response.status_code == 200
            body = b""
            try:
                async for chunk in response.aiter_raw():
                    body += chunk
            except httpx.RemoteProtocolError:  # closed without the final chunk
                return "cut" if b": relay: no session" in body else f"closed: {body[-200:]!r}"
            return f"ended: {body[-200:]!r}"
    if protocol == "ws":
        url = stack.base_url.replace("http", "ws", 1) + f"/relay/v1/sessions/{session}/ws"
        messages = []
        async with ws_connect(url, additional_headers=headers) as ws:
            with contextlib.suppress(ConnectionClosedError):  # 1011 after the error message
                async for message in ws:
                    messages.append(json.loads(message))
        last = messages[-1]
        return "cut" if last.get("code") == "session_not_found" else repr(last)
    target = httpx.URL(stack.base_url).netloc.decode()
    async with grpc.aio.insecure_channel(target) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Subscribe(
            SubscribeRequest(session=session), metadata=tuple(headers.items())
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return "cut" if error.code() == grpc.StatusCode.NOT_FOUND else repr(error)
        return "ended"


@pytest.mark.parametrize("protocol", ["sse", "ws", "grpc"])
async def test_revoking_a_share_token_cuts_readers_on_every_node_within_a_second(
    owned: Stack, protocol: str
) -> None:
    """On two nodes the reader and the DELETE may land on different nodes: the reader's node
    learns of the revocation from the store (it checks twice a second)."""
    async with (
        httpx.AsyncClient(base_url=owned.base_url, timeout=30) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json=CHAT | {"max_tokens": 400},
            headers=bearer(ALICE_KEY) | SLOW,  # ~20 s of events: still open when revoked
        ) as generation,
    ):
        session = generation.headers["x-relay-session"]
        minted = await client.post(f"/relay/v1/sessions/{session}/share", headers=bearer(ALICE_KEY))
        token = minted.json()
        bob = bearer(BOB_KEY) | {"x-relay-share": token["token"]}
        info_url = f"/relay/v1/sessions/{session}"
        before = (await client.get(info_url, headers=bob)).json()["readers"]
        reading = asyncio.create_task(_reader_cut(owned, protocol, session, bob))
        async with asyncio.timeout(20):
            while not reading.done():  # polls the relay until bob's reader is counted
                if (await client.get(info_url, headers=bob)).json()["readers"] > before:
                    break
        revoked = await client.delete(
            f"/relay/v1/sessions/{session}/share/{token['token_id']}",
            headers=bearer(ALICE_KEY),
        )
        assert revoked.status_code == 204
        loop = asyncio.get_running_loop()
        revoked_at = loop.time()
        async with asyncio.timeout(10):
            outcome = await reading
        assert outcome == "cut", outcome
        # The design bound is 0.5 s (a node's check period) plus a store round trip; a
        # loaded test machine gets slack.
        assert loop.time() - revoked_at < 2.0
        assert generation.status_code == 200  # alice's own stream goes on


def test_concurrent_generations_of_one_caller_open_exactly_the_quota(
    tmp_path: Path, creds: Creds
) -> None:
    """20 generations at once, every request's headers sent before any body (the race of a
    check at the headers and a count later): exactly the quota opens, the rest get 429 and
    never reach the LLM; another caller has a quota of its own."""
    for write_path in ("inline", "detached"):
        (tmp_path / write_path).mkdir()
        stack = make_stack(
            tmp_path / write_path,
            security=creds.security(),
            write_path=write_path,
            relay_args=("--max-sessions-per-identity", "2"),
        )
        try:
            before = upstream_stats(stack)["chat_completions_streamed"]
            with headers_first_posts(stack, 20, CHAT | {"max_tokens": 200}, ALICE_KEY) as statuses:
                assert sorted(statuses) == [200] * 2 + [429] * 18, (write_path, statuses)
                url = f"{stack.base_url}/v1/chat/completions"
                refused = httpx.post(url, json=CHAT, headers=bearer(ALICE_KEY), timeout=30)
                assert refused.status_code == 429, (write_path, refused.text)
                assert refused.json()["error"]["code"] == "limit_exceeded"
                other = httpx.post(url, json=CHAT, headers=bearer(BOB_KEY), timeout=30)
                assert other.status_code == 200  # a quota per identity, not for everyone
            assert upstream_stats(stack)["chat_completions_streamed"] - before == 3, write_path
        finally:
            stack.stop()


@contextlib.contextmanager
def headers_first_posts(
    stack: Stack, count: int, body: dict[str, object], key: str
) -> Iterator[list[int]]:
    """`count` POSTs on raw sockets: every request's headers first, then every body; yields each
    response's status while the connections stay open (a 200 stream is not read further)."""
    payload = json.dumps(body).encode()
    host, port = httpx.URL(stack.base_url).host, httpx.URL(stack.base_url).port
    assert port is not None
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nx-demo-rate: 20\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sockets = [socket.create_connection((host, port), timeout=30) for _ in range(count)]
    try:
        for sock in sockets:
            sock.sendall(head)
        for sock in sockets:
            sock.sendall(payload)
        yield [int(sock.makefile("rb").readline().split()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
