"""Summary statistics of latency samples and the windowed stability rule.

Percentiles interpolate linearly between order statistics (numpy's default ``method="linear"``); the
standard deviation is the sample one (``ddof=1``, 0 for a single sample). A run is *stable* when the medians
of its last ``windows`` consecutive windows lie within ``tolerance_pct`` of each other, relative to the
smallest — the rule of Triton Inference Server's perf_analyzer (three windows, 10 % by default), with medians
instead of means so that a single outlier does not restart the measurement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torchopt.config import check_range

__all__ = ["percentile", "stability_spread_pct", "summarize"]

# The percentiles every latency summary reports, as (field suffix, q).
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0))


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0–100) of already sorted samples, linearly interpolated like numpy's default."""
    if not sorted_samples:
        raise ValueError("percentile of an empty sample list is undefined")
    check_range("percentile q", q, low=0.0, high=100.0)
    pos = (len(sorted_samples) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    frac = pos - lo
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * frac


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """mean, std, min, p50, p90, p95, p99, max of `samples` (same unit in, same unit out)."""
    if not samples:
        raise ValueError("cannot summarize an empty list of samples")
    s = sorted(float(x) for x in samples)
    n = len(s)
    mean = math.fsum(s) / n
    var = math.fsum((x - mean) ** 2 for x in s) / (n - 1) if n > 1 else 0.0
    out = {"mean": mean, "std": math.sqrt(var), "min": s[0]}
    out.update({name: percentile(s, q) for name, q in PERCENTILES})
    out["max"] = s[-1]
    return out


def stability_spread_pct(samples: Sequence[float], windows: int, window_size: int) -> float | None:
    """Spread of the medians of the last `windows` windows of `window_size` samples, in percent.

    ``(max(medians) - min(medians)) / min(medians) * 100``; None when there are fewer than
    ``windows * window_size`` samples. Compare the result against a tolerance to get the verdict.
    """
    need = windows * window_size
    if windows < 1 or window_size < 1 or len(samples) < need:
        return None
    tail = list(samples[-need:])
    medians = [percentile(sorted(tail[i : i + window_size]), 50.0) for i in range(0, need, window_size)]
    lo = min(medians)
    if lo <= 0.0:
        return 0.0 if max(medians) <= 0.0 else math.inf
    return (max(medians) - lo) / lo * 100.0
