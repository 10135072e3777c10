"""Latency and availability figures computed from a run's request outcomes."""

from __future__ import annotations

import math
from collections.abc import Sequence

QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of an ascending, non-empty sequence."""
    assert sorted_values
    assert 0.0 < q <= 1.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max of the latencies in milliseconds (None when there are none)."""
    values = sorted(latencies_ms)
    if not values:
        return {**{name: None for name in QUANTILES}, "max": None}
    out: dict[str, float | None] = {
        name: round(percentile(values, q), 3) for name, q in QUANTILES.items()}
    out["max"] = round(values[-1], 3)
    return out


def availability(ok: int, issued: int) -> float | None:
    """ok / issued, or None when nothing was issued."""
    return round(ok / issued, 6) if issued else None
