"""Real clients (httpx, httpx-sse, websockets, grpcio) talking to a platform stack through its
Envoy, with the Host its virtual host answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect as ws_connect

from extproc.proto.relay.v1 import relay_pb2_grpc
from extproc.proto.relay.v1.relay_pb2 import SubscribeRequest
from mesh.harness import MeshStack

TIMEOUT_S = 30.0
Event = tuple[str, str]  # (id, data)
Read = tuple[list[Event], dict[str, Any]]  # the events, then how the session ended


def chat(
    max_tokens: int = 12, prompt: str = "hello mesh", *, stream: bool = True
) -> dict[str, Any]:
    return {
        "model": "demo-llm",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def headers(stack: MeshStack, **extra: str) -> dict[str, str]:
    return {"host": stack.host, **extra}


def post(
    stack: MeshStack, payload: dict[str, Any], path: str = "/v1/chat/completions", **extra: str
) -> httpx.Response:
    response = httpx.post(
        f"{stack.base_url}{path}", json=payload, headers=headers(stack, **extra), timeout=TIMEOUT_S
    )
    response.read()
    return response


def stream(
    client: httpx.Client, stack: MeshStack, payload: dict[str, Any], **extra: str
) -> Iterator[bytes]:
    """The session id, then the body as it arrives (the caller may stop at any time)."""
    url = f"{stack.base_url}/v1/chat/completions"
    with client.stream("POST", url, json=payload, headers=headers(stack, **extra)) as response:
        assert response.status_code == 200, response.read()
        yield response.headers["x-relay-session"].encode()
        yield from response.iter_bytes()


def session_info(stack: MeshStack, session: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.base_url}/relay/v1/sessions/{session}", headers=headers(stack), timeout=TIMEOUT_S
    )
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


async def read_sse(stack: MeshStack, session: str) -> Read:
    url = f"{stack.base_url}/relay/v1/sessions/{session}/events"
    async with (
        httpx.AsyncClient(timeout=TIMEOUT_S) as client,
        aconnect_sse(client, "GET", url, headers=headers(stack)) as source,
    ):
        events = [e async for e in source.aiter_sse()]
    assert events[-1].event == "relay.end"
    return [(e.id, e.data) for e in events[:-1]], json.loads(events[-1].data)


async def read_ws(stack: MeshStack, session: str) -> Read:
    port = urlsplit(stack.base_url).port
    events: list[Event] = []
    message: dict[str, Any] = {}
    uri = f"ws://{stack.host}/relay/v1/sessions/{session}/ws"
    # host/port: where to connect; the URI's host is what the Host header says.
    async with ws_connect(uri, host="127.0.0.1", port=port) as conn:
        async for text in conn:
            message = json.loads(text)
            if message["type"] != "event":
                break
            events.append((message["id"], message["data"]))
        await conn.wait_closed()
        assert conn.close_code == 1000
    assert message["type"] == "end"
    return events, message


async def read_grpc(stack: MeshStack, session: str) -> Read:
    events: list[Event] = []
    end: dict[str, Any] = {}
    target = str(urlsplit(stack.base_url).netloc)
    options = [("grpc.default_authority", stack.host)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        call = relay_pb2_grpc.RelayStub(channel).Subscribe(SubscribeRequest(session=session))
        async for response in call:
            if response.WhichOneof("kind") == "event":
                events.append((response.event.id, response.event.data))
            else:
                end = {"state": response.end.state, "last_seq": response.end.last_seq}
        assert await call.code() == grpc.StatusCode.OK
    return events, end
