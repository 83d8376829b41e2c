"""Recipe step `auto_batch`: set the input profile's batch range from measurements, before `compile`.

``max`` becomes the largest batch that fits in memory (`torchopt.batch.find_max_batch`, verified by running
it), ``opt`` the batch with the best throughput whose latency percentile meets the budget
(`torchopt.batch.find_optimal_batch`, swept up to that max); ``min`` stays. Both searches run the prepared
eager module (after `cast`, before `compile`): the compiled module's memory use differs, usually downwards
for inference. The memory search needs CUDA, or ``max_fit.memory_budget`` on CPU (peak RSS); otherwise the
profile's max is kept and the report says so.

    steps:
      - cast: {dtype: float16}
      - auto_batch: {optimal: {latency_budget_ms: 20, percentile: 99}}
      - compile: {backend: auto}
"""

from __future__ import annotations

import dataclasses

from torchopt.batch import (
    MaxBatchConfig,
    OptimalBatchConfig,
    batch_profile,
    find_max_batch,
    find_optimal_batch,
)
from torchopt.batch._calls import as_make_inputs, check_batch_limit
from torchopt.config import check_type
from torchopt.recipe import StepConfig, register_step

__all__ = ["AutoBatchConfig"]


def _inputs(specs, ctx, which: str, float_dtype):
    return as_make_inputs(specs, ctx.model, "auto_batch", which=which, float_dtype=float_dtype)


def _range(specs) -> str:
    return ", ".join(f"{s.name} {s.min[0]}/{s.opt[0]}/{s.max[0]}" for s in specs)


def _apply_auto_batch(config: AutoBatchConfig, ctx) -> None:
    if len(ctx.profiles) != 1:
        raise ValueError(
            "auto_batch sets the batch range of one input profile, but the recipe runs with"
            f" {len(ctx.profiles)} profiles; give a single profile (its batch dim is dim 0 of every input)"
            " or drop the step"
        )
    specs = list(ctx.profiles[0])
    before = _range(specs)
    # Floating inputs in the compute precision, as the prepared module receives them (see StepContext.adapt).
    float_dtype = None if ctx.quantized else ctx.dtype
    search_max = config.search_max
    if search_max is None:
        search_max = ctx.device.type == "cuda" or config.max_fit.memory_budget is not None
    if search_max:
        ctx.log("auto_batch: searching the largest batch that fits in memory")
        max_cfg = dataclasses.replace(config.max_fit, progress=config.max_fit.progress and ctx.progress)
        mx = find_max_batch(ctx.model, _inputs(specs, ctx, "max", float_dtype), config=max_cfg)
        max_fit = mx.size
        ctx.details["max_batch"] = mx.to_dict()
        why_max = (
            f"max {max_fit}: the largest batch run within {mx.target_bytes / 2**20:,.0f} MiB"
            f" ({mx.num_probes} probes after warm-up, {mx.limited_by}-limited)"
        )
    else:
        max_fit = max(s.max[0] for s in specs)
        why_max = (
            f"max {max_fit} kept from the profile: the memory search runs on CUDA, or on CPU with"
            " auto_batch.max_fit.memory_budget set"
        )
    cap = max_fit if config.optimal.max_batch is None else min(config.optimal.max_batch, max_fit)
    opt_cfg = dataclasses.replace(
        config.optimal,
        max_batch=cap,
        start=min(config.optimal.start, cap),
        progress=config.optimal.progress and ctx.progress,
    )
    ctx.log(f"auto_batch: sweeping batch sizes up to {cap} for throughput")
    best = find_optimal_batch(ctx.model, _inputs(specs, ctx, "opt", float_dtype), config=opt_cfg)
    ctx.details["optimal_batch"] = best.to_dict()
    new_specs = batch_profile(specs, max_fit, best, min_batch=config.min_batch)
    # In place: the engine and the OptimizedModule hold this very list.
    ctx.profiles[0][:] = new_specs
    ctx.report.profiles = [[s.to_dict() for s in p] for p in ctx.profiles]
    budget = (
        f"p{best.percentile:g} {best.latency_ms:.2f} ms <= {best.latency_budget_ms} ms"
        if best.latency_budget_ms is not None
        else f"p{best.percentile:g} {best.latency_ms:.2f} ms, no latency budget"
    )
    ctx.note(
        f"auto_batch: batch min/opt/max {before} → {_range(new_specs)}; {why_max}; opt {best.size}: best"
        f" throughput {best.throughput:,.0f} items/s ({budget}, sweep stopped: {best.stop_reason})"
    )


@register_step("auto_batch", _apply_auto_batch)
@dataclasses.dataclass
class AutoBatchConfig(StepConfig):
    """Set the profile's batch range: max = largest that fits in memory, opt = best throughput in budget.

    max_fit: options of the memory search (`torchopt.batch.MaxBatchConfig`).
    optimal: options of the throughput sweep (`torchopt.batch.OptimalBatchConfig`: latency_budget_ms,
        percentile, ...); the sweep never exceeds the max fit.
    search_max: None = auto (on CUDA, or on CPU when max_fit.memory_budget is set); False keeps the
        profile's max; True requires the search (a clear error on CPU without a budget).
    min_batch: the new min (None keeps the profile's).
    """

    max_fit: MaxBatchConfig = dataclasses.field(default_factory=MaxBatchConfig)
    optimal: OptimalBatchConfig = dataclasses.field(default_factory=OptimalBatchConfig)
    search_max: bool | None = None
    min_batch: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_fit, dict):
            self.max_fit = MaxBatchConfig.from_dict(self.max_fit, where="auto_batch.max_fit")
        check_type("auto_batch.max_fit", self.max_fit, MaxBatchConfig)
        if isinstance(self.optimal, dict):
            self.optimal = OptimalBatchConfig.from_dict(self.optimal, where="auto_batch.optimal")
        check_type("auto_batch.optimal", self.optimal, OptimalBatchConfig)
        if self.search_max is not None:
            check_type("auto_batch.search_max", self.search_max, bool, "true, false or null (auto)")
        if self.min_batch is not None:
            check_batch_limit("auto_batch.min_batch", self.min_batch)
