"""The real LiteLLM proxy as the upstream, on both write paths (an opt-in tier).

LiteLLM (pin `litellm[proxy]==1.108.7`; the unpinned extra backtracks through releases whose
`litellm-proxy` is not on PyPI) is not a test dependency: ~760 MB installed, 75-90 s to install,
~400 MB resident and 8-11 s to start, on machines shared by several engineers. The default suite
replays its recorded wire behaviour instead (tests/hosted_upstream.py). To run this tier,
install it in a venv of its own and point at its `litellm` executable:

    python3 -m venv /opt/litellm && /opt/litellm/bin/pip install 'litellm[proxy]==1.108.7'
    STREAM_RELAY_LITELLM=/opt/litellm/bin/litellm scripts/test tests/test_litellm.py

It runs fully offline (`LITELLM_LOCAL_MODEL_COST_MAP`): a mock model for chat, and LiteLLM's
own Anthropic adapter over the demo upstream for `/v1/messages` streams.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import make_stack

from extproc.ops.supervisor import Stack, free_port, python_child, read_ports

LITELLM = os.environ.get("STREAM_RELAY_LITELLM", "")
START_DEADLINE_S = 60.0
KEY = "sk-relay-test"
MOCK_TEXT = "Hello from the LiteLLM mock, streamed in pieces."
CONFIG = f"""\
model_list:
  - model_name: mock-gpt
    litellm_params:
      model: openai/mock-gpt
      api_key: sk-not-used
      mock_response: "{MOCK_TEXT}"
  - model_name: demo-custom
    litellm_params:
      model: custom_openai/demo-llm
      api_base: os.environ/DEMO_API_BASE
      api_key: sk-not-used
router_settings: {{ disable_cooldowns: true }}
litellm_settings: {{ telemetry: false, drop_params: true }}
general_settings: {{ master_key: {KEY} }}
"""

pytestmark = pytest.mark.skipif(
    not LITELLM, reason="opt-in: STREAM_RELAY_LITELLM=<path to a litellm 1.108.7 executable>"
)


def _wait(what: str, process: subprocess.Popen[bytes], ready: Any) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while not ready():  # polling child processes, bounded by the deadline
        assert process.poll() is None, f"{what} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{what} did not start in {START_DEADLINE_S:.0f}s"
        time.sleep(0.1)


def _live(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def litellm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """LiteLLM on a free loopback port, its demo-custom model backed by our demo upstream."""
    workdir = tmp_path_factory.mktemp("litellm")
    ports = workdir / "demo.ports"
    demo = subprocess.Popen(
        python_child("demo-upstream", "--port", "0", "--rate", "200", "--ports-file", str(ports))
    )
    children = [demo]
    try:
        _wait("the demo upstream", demo, lambda: read_ports(ports) is not None)
        demo_url = f"http://127.0.0.1:{(read_ports(ports) or {})['http_port']}"
        (workdir / "config.yaml").write_text(CONFIG)
        port = free_port()
        env = os.environ | {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # never wait on a black-holed network
            "LITELLM_TELEMETRY": "False",
            "DISABLE_ADMIN_UI": "True",
            "LITELLM_LOG": "ERROR",
            "NO_DOCS": "True",
            "DEMO_API_BASE": f"{demo_url}/v1",
        }
        where = ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        proxy = subprocess.Popen(
            [LITELLM, "--config", str(workdir / "config.yaml"), *where, "--telemetry", "False"],
            env=env,
            stdout=(workdir / "litellm.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        children.append(proxy)
        url = f"http://127.0.0.1:{port}"
        _wait("litellm", proxy, lambda: _live(f"{url}/health/liveliness"))
        yield url
    finally:
        for child in children:
            child.terminate()
            child.wait(timeout=30)


@pytest.fixture(scope="module", params=["detached", "inline"])
def litellm_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, litellm: str
) -> Iterator[Stack]:
    running = make_stack(
        tmp_path_factory.mktemp(f"litellm-{request.param}"),
        write_path=request.param,
        upstream=litellm,
    )
    yield running
    running.stop()


def _litellm_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("x-litellm-")}


def test_openai_sdk_streams_the_mock_with_litellms_headers(
    litellm_stack: Stack, litellm: str
) -> None:
    from openai import OpenAI

    texts, headers = [], []
    for base in (litellm, litellm_stack.base_url):
        client = OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="mock-gpt", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        headers.append(raw.headers)
        texts.append("".join((c.choices[0].delta.content or "") for c in raw.parse() if c.choices))
    assert texts == [MOCK_TEXT, MOCK_TEXT]
    direct, relayed = headers
    assert relayed["x-relay-session"]
    assert len(_litellm_headers(direct)) >= 18
    assert _litellm_headers(relayed).keys() == _litellm_headers(direct).keys()
    for name in ("x-frame-options", "content-security-policy", "x-content-type-options"):
        assert relayed[name] == direct[name]


def test_anthropic_sdk_streams_through_litellms_adapter(litellm_stack: Stack) -> None:
    from anthropic import Anthropic

    client = Anthropic(base_url=litellm_stack.base_url, api_key=KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": "hi"}]
    with client.messages.stream(model="demo-custom", max_tokens=12, messages=messages) as s:
        text = "".join(s.text_stream)
        session = s.response.headers["x-relay-session"]
    assert len(text.split()) == 12
    assert len(session) == 22


def test_litellms_errors_pass_with_their_length(litellm_stack: Stack, litellm: str) -> None:
    body = {"model": "nope", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {KEY}", "Accept-Encoding": "identity"}
    direct = httpx.post(f"{litellm}/v1/chat/completions", json=body, headers=headers, timeout=30)
    relayed = httpx.post(
        f"{litellm_stack.base_url}/v1/chat/completions", json=body, headers=headers, timeout=30
    )
    assert relayed.status_code == direct.status_code == 400
    assert relayed.json()["error"]["type"] == direct.json()["error"]["type"]
    assert relayed.headers["content-length"] == str(len(relayed.content))
    assert _litellm_headers(relayed.headers).keys() == _litellm_headers(direct.headers).keys()
