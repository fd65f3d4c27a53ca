"""What a bench run does: the load shape and the plan (main load, sweep levels, the relay
jobs' sizes) for a full and a quick run."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]
P99_BOUND_MS = 25.0  # saturation: the highest load whose p99 stays within this ...
MIN_DELIVERED = 0.95  # ... and that delivers this share of what the upstream offered


@dataclass(frozen=True, kw_only=True)
class Load:
    """LLM-like traffic: streams at 20-100 ev/s each, a TTFT before the first event, answers
    of 100-400 tokens back to back; model names of varying length make events ~220-300 B."""

    events_per_s: float  # offered: the streams' rates add up to this
    duration_s: float
    warmup_s: float
    rate: tuple[float, float] = (20.0, 100.0)
    ttft_ms: tuple[float, float] = (50.0, 500.0)
    tokens: tuple[int, int] = (100, 400)
    seed: int = 7

    def streams(self) -> list[Json]:
        rng, out, total = random.Random(self.seed), [], 0.0
        while total < self.events_per_s:
            rate = round(rng.uniform(*self.rate))
            model = "m" + "x" * rng.randint(2, 60)
            out.append({"rate": rate, "model": model, "seed": rng.getrandbits(32)})
            total += rate
        for i, stream in enumerate(out):  # starts spread over a second: no lockstep ticks
            stream["delay_s"] = i / len(out)
        return out


@dataclass(frozen=True, kw_only=True)
class Plan:
    main: Load
    sweep: tuple[float, ...]  # offered events/s levels
    sweep_duration_s: float
    sweep_warmup_s: float
    readers: tuple[int, ...]
    multicast_rate: float
    multicast_tokens: int
    resume_sessions: int
    hold_sessions: int
    finished_sessions: int


FULL = Plan(
    main=Load(events_per_s=10_000, duration_s=10, warmup_s=3),
    sweep=(2_500, 5_000, 10_000, 15_000, 20_000, 25_000, 30_000),
    sweep_duration_s=5,
    sweep_warmup_s=2,
    readers=(1, 10, 100),
    multicast_rate=100,
    multicast_tokens=500,
    resume_sessions=100,
    hold_sessions=800,
    finished_sessions=1000,
)
QUICK = Plan(
    main=Load(events_per_s=2_000, duration_s=2, warmup_s=1),
    sweep=(),
    sweep_duration_s=0,
    sweep_warmup_s=0,
    readers=(1, 10, 100),
    multicast_rate=100,
    multicast_tokens=50,
    resume_sessions=10,
    hold_sessions=100,
    finished_sessions=100,
)
