"""Percentiles and the small pure helpers shared by the load generator and the report."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of an ascending sequence; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(
    values: Sequence[float], keys: Sequence[str] = ("p50", "p99", "max")
) -> dict[str, float]:
    """{"p50": …, "p99": …, "max": …} of unsorted values; nan for an empty sequence."""
    ordered = sorted(values)
    quantiles = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
    return {key: percentile(ordered, quantiles[key]) for key in keys}


def expected_events(base: float, rate: float, count: int, start: float, end: float) -> int:
    """Events n = 0..count-1 of a paced stream (event n due at base + n / rate) due in
    [start, end): what the upstream offers in the measured window."""
    if count <= 0 or end <= start:
        return 0
    if rate <= 0:
        return count if start <= base < end else 0
    lo = max(0, math.ceil((start - base) * rate))
    hi = min(count - 1, math.ceil((end - base) * rate) - 1)
    return max(0, hi - lo + 1)
