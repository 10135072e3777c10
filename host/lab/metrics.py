"""Latency and availability figures computed from a run's request outcomes.

Two kinds of latency quantiles:

* ``latency_summary``: exact nearest-rank quantiles (rank ``ceil(q * n)``), for the small
  per-second windows of the report, where every value is kept anyway.
* ``latency_percentiles``: HDR-style percentiles of a whole run, from an HdrHistogram
  (``hdrhistogram`` on PyPI) of microseconds with 3 significant digits. The p-th percentile is
  the value at rank ``max(1, floor(p / 100 * n + 0.5))`` (HdrHistogram's rule), reported as the
  highest value equivalent to it in the histogram, capped at the maximum: never below the exact
  value at that rank (to the microsecond) and at most 1/1024 (about 0.1 %) above it. Mean and
  max are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hdrh.histogram import HdrHistogram

QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
HDR_DIGITS = 3  # significant decimal digits: relative error at most 2**-10
HDR_HIGHEST_US = 3_600_000_000  # one hour, in microseconds


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


def latency_percentiles(latencies_ms: Sequence[float]) -> dict[str, float | int | None]:
    """HDR-style p50, p90, p95, p99, p999 (99.9th), exact mean and max, in milliseconds
    rounded to the microsecond, and the count (see the module for the percentile contract).

    Every figure is None when there are no latencies; latencies are clamped to 1 us .. 1 h.
    """
    count = len(latencies_ms)
    if not count:
        return {**{name: None for name in PERCENTILES}, "mean": None, "max": None, "count": 0}
    histogram = HdrHistogram(1, HDR_HIGHEST_US, HDR_DIGITS)
    for ms in latencies_ms:
        histogram.record_value(min(max(1, round(ms * 1000.0)), HDR_HIGHEST_US))
    top = round(max(latencies_ms), 3)
    out: dict[str, float | int | None] = {
        name: min(histogram.get_value_at_percentile(p) / 1000.0, top)
        for name, p in PERCENTILES.items()}
    out["mean"] = round(sum(latencies_ms) / count, 3)
    out["max"] = top
    out["count"] = count
    return out


def availability(ok: int, issued: int) -> float | None:
    """ok / issued, or None when nothing was issued."""
    return round(ok / issued, 6) if issued else None
