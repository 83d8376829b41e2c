"""`compare_latency`: time several callables under the same conditions and report speedups with their spread.

Two latencies measured minutes apart are not comparable: the first calls of a process are slower (allocator,
oneDNN primitive caches), and on a shared machine the load changes between the two measurements. Here every
callable is warmed up first, then timed in rounds; within a round the callables are called in turn, call by
call, the order alternating (A B, B A, A B, ...) so that neither a burst of load nor a drift favours one.
A round has `iters` calls of each, or more when they are fast, so that the slowest callable's share lasts
`min_round_ms` (a median of 3 calls of 0.3 ms is mostly noise). Each round gives one ratio, the median of
its paired ratios ``baseline call / candidate call next to it``; the speedup is the median of these ratios
and its spread the
10th–90th percentile of them (the middle 80 % of the rounds). A speedup is *stable* when that spread is
within `stability_pct` of the median and each latency is stable by `latency`'s window rule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchopt.config import check_positive, check_type
from torchopt.profile.stats import percentile, stability_spread_pct
from torchopt.profile.timing import LatencyResult, infer_device, time_calls

__all__ = ["LatencyComparison", "Speedup", "compare_latency"]

# The spread of a speedup: the middle 80 % of the per-round ratios (robust to one disturbed round, yet wide
# enough that a module compared with itself contains 1.0).
SPREAD_PERCENTILES = (10.0, 90.0)


@dataclasses.dataclass
class Speedup:
    """Baseline latency / candidate latency: the median of per-round ratios and their middle-80 % range."""

    median: float
    low: float
    high: float
    rounds: int
    stable: bool

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Speedup:
        return cls(**data)

    def __str__(self) -> str:
        text = f"{self.median:.2f}x ({self.low:.2f}–{self.high:.2f})"
        return text if self.stable else text + " UNSTABLE"


@dataclasses.dataclass
class LatencyComparison:
    """Latency of each callable (pooled over the rounds) and each candidate's speedup over the baseline."""

    baseline: str
    results: dict[str, LatencyResult]
    speedups: dict[str, Speedup]  # every name but the baseline
    rounds: int
    iters_per_round: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "rounds": self.rounds,
            "iters_per_round": self.iters_per_round,
            "latency": {k: r.to_dict(samples=False) for k, r in self.results.items()},
            "speedup": {k: s.to_dict() for k, s in self.speedups.items()},
        }


def _speedup(base_rounds: list[list[float]], cand_rounds: list[list[float]], stable: bool, pct: float) -> Speedup:
    # Each baseline call is paired with the candidate call next to it (same load, same moment): a round's
    # ratio is the median of its pairs' ratios. Under bursty load latencies are bimodal, and a ratio of two
    # medians can pick different modes; a median of paired ratios cannot.
    ratios = sorted(
        percentile(sorted(b / max(c, 1e-12) for b, c in zip(base, cand, strict=True)), 50.0)
        for base, cand in zip(base_rounds, cand_rounds, strict=True)
    )
    median = percentile(ratios, 50.0)
    low, high = (percentile(ratios, q) for q in SPREAD_PERCENTILES)
    narrow = median > 0 and (high - low) / median * 100.0 <= pct
    return Speedup(median=median, low=low, high=high, rounds=len(ratios), stable=stable and narrow)


def _result(rounds: list[list[float]], device: torch.device, batch_size: int | None, warmup: int, pct: float):
    samples = [s for r in rounds for s in r]
    # latency's rule: the medians of three windows over the samples must agree within pct
    spread = stability_spread_pct(samples, 3, max(1, len(samples) // 3))
    return LatencyResult.from_samples(
        samples,
        device=device,
        batch_size=batch_size,
        stable=spread is not None and spread <= pct,
        warmup=warmup,
        stability_spread_pct=spread,
    )


def compare_latency(
    fns: Mapping[str, Callable[..., Any]],
    *inputs: Any,
    baseline: str | None = None,
    rounds: int = 10,
    iters: int = 5,
    warmup: int = 3,
    min_round_ms: float = 20.0,
    batch_size: int | None = None,
    stability_pct: float = 10.0,
    timer: Callable[[], int] | None = None,
) -> LatencyComparison:
    """Time each ``fn(*inputs)`` in alternating rounds and compare them with `baseline` (default: the first).

    `rounds` rounds of `iters` timed calls of each callable, interleaved (more calls when the warm-up shows
    that `iters` calls of the slowest take less than `min_round_ms`), follow `warmup` calls of each. `timer`
    replaces the clock, for tests. Run it under ``torch.no_grad()`` for inference.

    Example::

        cmp = torchopt.profile.compare_latency({"eager": model, "compiled": compiled}, x)
        print(cmp.speedups["compiled"])   # e.g. 1.41x (1.32–1.50)
    """
    check_type("fns", fns, Mapping, "a dict of name -> callable")
    if len(fns) < 2:
        raise ValueError(f"fns needs at least two callables to compare, got {len(fns)}: {list(fns)}")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"fns[{name!r}] must be callable, got {type(fn).__name__}")
    names = list(fns)
    baseline = names[0] if baseline is None else baseline
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of the compared names {names}")
    check_positive("rounds", rounds)
    check_positive("iters", iters)
    check_positive("warmup", warmup, allow_zero=True)
    check_positive("min_round_ms", min_round_ms, allow_zero=True, types_=(int, float))
    check_positive("stability_pct", stability_pct, types_=(int, float))
    device = infer_device(fns[baseline], inputs)

    calls = {name: (lambda fn=fn: fn(*inputs)) for name, fn in fns.items()}
    warm_ms = {name: time_calls(calls[name], warmup, device, timer=timer) if warmup else [] for name in names}
    per_call = _calls_per_round(warm_ms, iters, min_round_ms)
    per_round: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(per_call):
            # call by call, in alternating order: a burst of load hits every callable alike
            for name in names if (r * per_call + i) % 2 == 0 else reversed(names):
                samples[name] += time_calls(calls[name], 1, device, timer=timer)
        for name in names:
            per_round[name].append(samples[name])

    results = {n: _result(per_round[n], device, batch_size, warmup, stability_pct) for n in names}
    speedups = {
        n: _speedup(per_round[baseline], per_round[n], results[baseline].stable and results[n].stable, stability_pct)
        for n in names
        if n != baseline
    }
    return LatencyComparison(baseline, results, speedups, rounds, per_call)


def _calls_per_round(warm_ms: dict[str, list[float]], iters: int, min_round_ms: float) -> int:
    """`iters`, or enough calls of each that the slowest callable's share of a round lasts `min_round_ms`
    (judged by its fastest warm-up call; at most 1000)."""
    slowest = max((min(ms) for ms in warm_ms.values() if ms), default=0.0)
    if slowest <= 0.0:
        return iters
    return max(iters, min(1000, math.ceil(min_round_ms / slowest)))
