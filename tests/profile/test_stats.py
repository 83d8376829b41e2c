"""torchopt.profile.stats: summaries and percentiles agree with numpy; the windowed stability rule; errors."""

import math

import numpy as np
import pytest

from torchopt.profile.stats import percentile, stability_spread_pct, summarize

# Statistics are exact float64 arithmetic on both sides; only summation order differs.
STATS_RTOL = 1e-12


def _samples(kind: str, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    if kind == "lognormal":  # latency-like: long right tail
        return list(rng.lognormal(mean=0.0, sigma=0.6, size=n))
    if kind == "bimodal":
        return list(np.concatenate([rng.normal(1.0, 0.05, n - n // 7), rng.normal(9.0, 0.5, n // 7)]))
    return list(rng.uniform(0.1, 5.0, n))


@pytest.mark.parametrize("kind", ["lognormal", "bimodal", "uniform"])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1013])
def test_summarize_matches_numpy(kind, n):
    s = _samples(kind, n, seed=n)
    got = summarize(s)
    want = {
        "mean": np.mean(s),
        "std": np.std(s, ddof=1) if n > 1 else 0.0,
        "min": np.min(s),
        "p50": np.percentile(s, 50),
        "p90": np.percentile(s, 90),
        "p95": np.percentile(s, 95),
        "p99": np.percentile(s, 99),
        "max": np.max(s),
    }
    assert list(got) == list(want)
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=STATS_RTOL, abs_tol=1e-15), f"{k}: {got[k]} vs {v}, n={n}"


@pytest.mark.parametrize("q", [0.0, 12.5, 50.0, 99.9, 100.0])
def test_percentile_matches_numpy(q):
    s = sorted(_samples("lognormal", 37, seed=3))
    assert math.isclose(percentile(s, q), np.percentile(s, q), rel_tol=STATS_RTOL)


def test_stats_bad_input():
    with pytest.raises(ValueError, match="empty"):
        summarize([])
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_stability_rule():
    steady = [1.0, 1.02, 0.99] * 10
    assert stability_spread_pct(steady, windows=3, window_size=10) < 5
    drifting = [1.0] * 10 + [1.5] * 10 + [2.0] * 10  # medians 1.0, 1.5, 2.0: 100 % spread
    assert stability_spread_pct(drifting, 3, 10) == pytest.approx(100.0)
    # Only the last windows count: a slow start is forgiven once three windows agree.
    assert stability_spread_pct([5.0] * 10 + steady, 3, 10) < 5
    assert stability_spread_pct(steady[:20], 3, 10) is None  # too few samples to judge
