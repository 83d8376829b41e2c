"""`find_optimal_batch`: the batch size with the best throughput whose latency percentile meets a budget.

Sweep: ``start, 2·start, 4·start, ...`` up to `max_batch` (each size timed by `torchopt.profile.latency`),
stopping at a throughput plateau (`patience` doublings without a `plateau_pct` gain), at the first size whose
latency percentile exceeds the budget, or at an out-of-memory error. Between the largest size within the
budget and the first one above it (or the OOM), `refine_steps` bisection steps look for a larger size that
still meets the budget. The result is the measured size with the best throughput among those meeting it
(sizes within `tie_pct` of the best are ties, and the smallest of them wins: same throughput, lower latency).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

from torchopt.batch._calls import (
    as_make_inputs,
    as_step,
    batch_device,
    build_batch,
    check_batch_limit,
    oom_text,
    run_guarded,
)
from torchopt.batch.memory_backends import release_memory
from torchopt.config import ConfigBase, check_positive, check_range, check_type
from torchopt.profile import LatencyConfig, LatencyResult, latency
from torchopt.profile import percentile as percentile_of

__all__ = ["OptimalBatchConfig", "OptimalBatchResult", "SweepPoint", "find_optimal_batch"]

_WHERE = "find_optimal_batch"


def _default_latency() -> LatencyConfig:
    # Enough calls for a p99 estimate per size while keeping a 10-size sweep in seconds.
    return LatencyConfig(warmup=3, iters=50, max_time_s=2.0)


def _sweep_latency(options: dict[str, Any], where: str) -> LatencyConfig:
    # Partial latency options fill in from the sweep's defaults, not from LatencyConfig's slower ones.
    return LatencyConfig.merge(_default_latency(), where=where, **options)


@dataclasses.dataclass
class OptimalBatchConfig(ConfigBase):
    """Every option of `find_optimal_batch`.

    latency_budget_ms: the latency percentile a batch may take (None = no budget: best throughput).
    percentile: which percentile of the per-call latency must meet the budget (0-100).
    max_batch: the largest size swept (e.g. `find_max_batch`'s result); None = until the plateau, the
        budget or an OOM stops the sweep, capped at `limit`.
    start: the first size swept; sizes double from there.
    plateau_pct / patience: a size makes progress when it beats the best throughput so far by more than
        `plateau_pct` percent; the sweep stops after `patience` sizes without progress.
    refine_steps: bisection steps between the largest size within the budget and the first size above it.
    tie_pct: sizes within this percent of the best throughput count as ties and the smallest of them wins
        (the same throughput at a lower latency); 0 = strictly the best measured throughput.
    recheck_misses: time a size that misses the budget once more, and let the second measurement count (a
        few stray slow calls in a short window must not end the sweep).
    latency: how each size is timed (`torchopt.profile.LatencyConfig`; its batch_size is set per size).
    progress: tqdm bar over the sizes.
    """

    latency_budget_ms: float | None = None
    percentile: float = 99.0
    max_batch: int | None = None
    start: int = 1
    limit: int = 65536
    plateau_pct: float = 5.0
    patience: int = 2
    refine_steps: int = 2
    tie_pct: float = 2.0
    recheck_misses: bool = True
    latency: LatencyConfig = dataclasses.field(default_factory=_default_latency)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.latency_budget_ms is not None:
            check_positive("latency_budget_ms", self.latency_budget_ms, types_=(int, float))
        check_range("percentile", self.percentile, low=0, high=100)
        if self.max_batch is not None:
            check_batch_limit("max_batch", self.max_batch)
        check_positive("start", self.start)
        check_positive("limit", self.limit)
        if self.start > self.cap:
            raise ValueError(f"start ({self.start}) must be <= max_batch ({self.cap})")
        check_positive("plateau_pct", self.plateau_pct, allow_zero=True, types_=(int, float))
        check_positive("patience", self.patience)
        check_positive("refine_steps", self.refine_steps, allow_zero=True)
        check_positive("tie_pct", self.tie_pct, allow_zero=True, types_=(int, float))
        check_type("recheck_misses", self.recheck_misses, bool)
        if isinstance(self.latency, dict):
            self.latency = _sweep_latency(self.latency, f"{_WHERE}.latency")
        check_type("latency", self.latency, LatencyConfig)
        if self.latency.batch_size is not None:
            raise ValueError(f"latency.batch_size is set per swept size; leave it None, got {self.latency.batch_size}")
        check_type("progress", self.progress, bool)

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None) -> OptimalBatchConfig:
        if isinstance(data, dict) and isinstance(data.get("latency"), dict):
            data = {**data, "latency": _sweep_latency(data["latency"], f"{where or cls.__name__}.latency")}
        return super().from_dict(data, where=where)

    @property
    def cap(self) -> int:
        return self.max_batch if self.max_batch is not None else self.limit


@dataclasses.dataclass
class SweepPoint:
    """One swept size: its latency (ms, at the configured percentile and p50) and throughput (items/s).

    `throughput` is ``size / p50``: the median is what the batch size itself costs, while a few calls delayed
    by other processes would move the mean. `mean_throughput` (``size / mean``) is kept alongside.
    """

    size: int
    status: str  # "ok" or "oom"
    latency_ms: float | None = None  # at the configured percentile
    p50_ms: float | None = None
    throughput: float | None = None
    mean_throughput: float | None = None
    meets_budget: bool = False
    stable: bool | None = None
    phase: str = "sweep"  # "sweep" (doubling), "refine" (bisection) or "recheck" (a miss timed again)
    message: str = ""


@dataclasses.dataclass
class OptimalBatchResult:
    """The chosen size, its latency and throughput (``size / p50``), every swept point and why the sweep
    stopped."""

    size: int
    latency_ms: float
    throughput: float
    percentile: float
    latency_budget_ms: float | None
    points: list[SweepPoint]
    stop_reason: str  # "plateau", "latency_budget", "oom", "max_batch"
    device: str
    seconds: float

    @property
    def latest(self) -> list[SweepPoint]:
        """The measurement that counts for each size (a recheck replaces the first), in size order."""
        return sorted({p.size: p for p in self.points}.values(), key=lambda p: p.size)

    @property
    def best_point(self) -> SweepPoint:
        return next(p for p in self.latest if p.size == self.size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        budget = f"p{self.percentile:g} <= {self.latency_budget_ms} ms" if self.latency_budget_ms else "no budget"
        lines = [
            f"optimal batch {self.size}: {self.throughput:,.1f} items/s, p{self.percentile:g}"
            f" {self.latency_ms:.3f} ms ({budget}; sweep stopped: {self.stop_reason};"
            f" {len(self.points)} sizes in {self.seconds:.1f} s on {self.device})"
        ]
        for p in self.points:
            if p.status == "oom":
                lines.append(f"  batch {p.size:>7}  out of memory")
                continue
            mark = "*" if p.size == self.size else " "
            verdict = "meets" if p.meets_budget else "misses"
            lines.append(
                f"{mark} batch {p.size:>7}  p{self.percentile:g} {p.latency_ms:9.3f} ms"
                f"  {p.throughput:12,.1f} items/s  {verdict} budget  ({p.phase})"
            )
        return "\n".join(lines)

    def plot(self, ax=None):
        """Throughput (left axis) and the latency percentile (right axis, with the budget) against batch."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(6.4, 4.0), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        pts = [p for p in self.latest if p.status == "ok"]
        xs = [p.size for p in pts]
        ax.plot(xs, [p.throughput for p in pts], "o-", color="tab:blue", label="throughput")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput (items/s)", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, [p.latency_ms for p in pts], "s--", color="tab:orange", label=f"p{self.percentile:g} latency")
        ax2.set_ylabel(f"p{self.percentile:g} latency (ms)", color="tab:orange")
        if self.latency_budget_ms is not None:
            ax2.axhline(self.latency_budget_ms, color="tab:red", ls=":", lw=1, label="latency budget")
        ax.axvline(self.size, color="tab:green", ls="-.", lw=1, label=f"chosen: {self.size}")
        handles = ax.get_legend_handles_labels()
        handles2 = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize="small", loc="upper left")
        ax.set_title(f"find_optimal_batch ({self.stop_reason})")
        return fig


def find_optimal_batch(
    fn: Any,
    make_inputs: Any,
    *,
    config: OptimalBatchConfig | None = None,
    timer: Callable[..., LatencyResult] = latency,
    **overrides: Any,
) -> OptimalBatchResult:
    """The batch size with the best throughput whose latency percentile (p99 by default) meets the budget.

    Args:
        fn: an ``nn.Module`` (run under ``no_grad``) or a callable taking one batch.
        make_inputs: ``make_inputs(batch)`` → a tensor, a tuple of inputs or a dict of keyword inputs; or
            InputSpec(s) (dim 0 is the batch, the other dims at their opt).
        config: an `OptimalBatchConfig` (default: its defaults).
        **overrides: any field of `OptimalBatchConfig` (latency_budget_ms, percentile, max_batch, ...),
            replacing the config's value.
        timer: times one size: called like `torchopt.profile.latency` (``timer(call, *args, **options)``
            with the config's latency options, ``device`` and ``batch_size``) and returns a `LatencyResult`.
            The default measures; a latency model in its place (e.g. a simulator of a target device, or a
            test's deterministic cost per size) makes the sweep's decisions reproducible.

    Example::

        res = torchopt.batch.find_optimal_batch(model, lambda n: torch.randn(n, 3, 224, 224, device="cuda"),
                                                latency_budget_ms=20, max_batch=512)
        print(res.size, res.throughput, res.latency_ms)
        res.plot().savefig("optimal_batch.png")
    """
    if not callable(timer):
        raise TypeError(f"timer must be callable like torchopt.profile.latency, got {type(timer).__name__}")
    t_start = time.perf_counter()
    cfg = OptimalBatchConfig.merge(config, where=f"{_WHERE} options", **overrides)
    step = as_step(fn, _WHERE)
    make = as_make_inputs(make_inputs, fn, _WHERE, which="opt")
    device = batch_device(fn, build_batch(make, cfg.start, _WHERE))
    sweep = _Sweep(_measurer(step, make, timer, cfg, device), cfg.recheck_misses)

    from tqdm.auto import tqdm

    with tqdm(desc=_WHERE, unit="size", disable=not cfg.progress, leave=False) as bar:
        stop_reason, above = _double(sweep, cfg, bar)
        _refine(sweep, cfg, bar, above)
    chosen = _choose(sweep.points, cfg)
    return OptimalBatchResult(
        size=chosen.size,
        latency_ms=chosen.latency_ms,
        throughput=chosen.throughput,
        percentile=float(cfg.percentile),
        latency_budget_ms=cfg.latency_budget_ms,
        points=sweep.points,
        stop_reason=stop_reason,
        device=str(device),
        seconds=time.perf_counter() - t_start,
    )


def _measurer(step: Any, make: Any, timer: Callable[..., LatencyResult], cfg: OptimalBatchConfig, device: Any):
    """`measure_once(size, phase)`: one size timed into a SweepPoint (an "oom" point when it runs out of memory)."""
    latency_options = {**cfg.latency.to_dict(), "device": str(device)}

    def measure_once(size: int, phase: str) -> SweepPoint:
        def attempt() -> SweepPoint:
            args, kwargs = build_batch(make, size, _WHERE)
            res = timer(lambda *a: step(*a, **kwargs), *args, **{**latency_options, "batch_size": size})
            value = percentile_of(sorted(res.samples_ms), cfg.percentile)
            meets = cfg.latency_budget_ms is None or value <= cfg.latency_budget_ms
            median_throughput = size * 1000.0 / res.p50_ms if res.p50_ms > 0 else math.inf
            return SweepPoint(
                size, "ok", value, res.p50_ms, median_throughput, res.throughput, meets, res.stable, phase
            )

        point, failure = run_guarded(attempt, size, _WHERE, lambda: release_memory(device))
        if failure is not None:
            return SweepPoint(size, "oom", phase=phase, message=oom_text(failure))
        return point

    return measure_once


@dataclasses.dataclass
class _Sweep:
    """The points measured so far, in order; a size that misses the budget is measured once more when `recheck`
    (a latency spike should not end the sweep)."""

    measure_once: Callable[[int, str], SweepPoint]
    recheck: bool
    points: list[SweepPoint] = dataclasses.field(default_factory=list)

    def measure(self, size: int, phase: str) -> SweepPoint:
        point = self.measure_once(size, phase)
        self.points.append(point)
        if point.status == "ok" and not point.meets_budget and self.recheck:
            point = self.measure_once(size, "recheck")
            self.points.append(point)
        return point


def _latest(points: list[SweepPoint]) -> list[SweepPoint]:
    """Each measured size's last point (a recheck replaces the first measurement)."""
    return list({q.size: q for q in points}.values())


def _double(sweep: _Sweep, cfg: OptimalBatchConfig, bar: Any) -> tuple[str, int | None]:
    """Double the size from `start` until the budget is missed, memory runs out, throughput plateaus or the cap is
    reached; returns the stop reason and the smallest size that missed the budget or ran out of memory."""
    best, stalled, size = 0.0, 0, cfg.start
    while True:
        point = sweep.measure(size, "sweep")
        bar.update(1)
        bar.set_postfix_str(f"batch {size}: {point.status}")
        if not point.meets_budget:
            return ("oom" if point.status == "oom" else "latency_budget"), size
        if point.throughput > best * (1 + cfg.plateau_pct / 100):
            best, stalled = point.throughput, 0
        else:
            stalled += 1
            if stalled >= cfg.patience:
                return "plateau", None
        if size >= cfg.cap:
            return "max_batch", None
        size = min(2 * size, cfg.cap)


def _refine(sweep: _Sweep, cfg: OptimalBatchConfig, bar: Any, above: int | None) -> None:
    """Bisect between the largest size within the budget and `above`, the first one past it."""
    feasible = [p.size for p in _latest(sweep.points) if p.meets_budget]
    low = max(feasible) if feasible else None
    for _ in range(cfg.refine_steps):
        if low is None or above is None or above - low <= 1:
            return
        mid = (low + above) // 2
        point = sweep.measure(mid, "refine")
        bar.update(1)
        if point.meets_budget:
            low = mid
        else:
            above = mid


def _choose(points: list[SweepPoint], cfg: OptimalBatchConfig) -> SweepPoint:
    """The smallest size within `tie_pct` of the best throughput among those meeting the budget."""
    candidates = [p for p in _latest(points) if p.meets_budget]
    if not candidates:
        first = [q for q in points if q.size == points[0].size][-1]
        got = "ran out of memory" if first.status == "oom" else f"has p{cfg.percentile:g} {first.latency_ms:.3f} ms"
        raise ValueError(
            f"{_WHERE}: no batch size meets latency_budget_ms={cfg.latency_budget_ms} at p{cfg.percentile:g}:"
            f" the smallest, batch {first.size}, {got}. Raise the budget or speed up the step."
        )
    best = max(p.throughput for p in candidates)
    return min((p for p in candidates if p.throughput >= best * (1 - cfg.tie_pct / 100)), key=lambda p: p.size)
