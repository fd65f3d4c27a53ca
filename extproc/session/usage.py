"""Token usage from the upstream's own reports, vendor by vendor; pure: event data in, counts out.

OpenAI reports `usage.prompt_tokens`/`completion_tokens` (chat, with `stream_options`) or
`usage.input_tokens`/`output_tokens` (Responses, nested in `response`); Anthropic in
`message_start.message.usage` and `message_delta.usage`; Ollama in its final line's
`prompt_eval_count`/`eval_count`. Anything else, or unparseable, is no report. Reports within
one response are running totals (Anthropic's message_delta repeats message_start's counts and
grows them; some servers report on every chunk): `UsageTally` counts what each one adds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# An event without one of these bytes cannot hold a report: checked before parsing any JSON
# (OpenAI, Responses and Anthropic report under "usage", Ollama in "eval_count" fields).
USAGE_MARKER = b'"usage"'
OLLAMA_MARKER = b'"eval_count"'
MAX_MODEL_CHARS = 128
UNKNOWN_MODEL = "unknown"  # a report that names no model (Anthropic's message_delta)


@dataclass(frozen=True, slots=True)
class Usage:
    model: str
    prompt: int
    completion: int


def may_report_usage(raw: bytes) -> bool:
    # Once per event: find rather than `in` (bytes `in` first tries its operand as an int,
    # raising and clearing a TypeError), and no loop over a tuple of markers.
    return raw.find(USAGE_MARKER) >= 0 or raw.find(OLLAMA_MARKER) >= 0


def parse_usage(data: bytes) -> Usage | None:
    """The usage report in one event's data (an SSE event's data, or an NDJSON line)."""
    try:
        doc = json.loads(data or b"")
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    nested = doc.get("message") or doc.get("response")  # Anthropic / OpenAI Responses
    message: dict[str, object] = nested if isinstance(nested, dict) else {}
    usage = doc.get("usage") or message.get("usage") or {}
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or usage.get("input_tokens") or doc.get("prompt_eval_count")
    completion = (
        usage.get("completion_tokens") or usage.get("output_tokens") or doc.get("eval_count")
    )
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return None
    model = doc.get("model") or message.get("model") or UNKNOWN_MODEL
    return Usage(
        str(model)[:MAX_MODEL_CHARS],
        prompt if isinstance(prompt, int) else 0,
        completion if isinstance(completion, int) else 0,
    )


class UsageTally:
    """One response's usage reports, as what each adds to the totals reported before it; the
    model is the first one named."""

    __slots__ = ("_completion", "_model", "_prompt")

    def __init__(self) -> None:
        self._model = UNKNOWN_MODEL
        self._prompt = 0
        self._completion = 0

    def add(self, usage: Usage) -> Usage | None:
        """The new tokens in `usage`, or None when it adds none."""
        if self._model == UNKNOWN_MODEL:
            self._model = usage.model
        prompt = max(0, usage.prompt - self._prompt)
        completion = max(0, usage.completion - self._completion)
        self._prompt += prompt
        self._completion += completion
        if not prompt and not completion:
            return None
        return Usage(self._model, prompt, completion)
