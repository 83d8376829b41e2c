"""Recipe step `validate`: the accuracy guard and the before/after latency measurement.

It runs last, also in recipes that do not list it (then with its defaults), on the optimized call exactly as
the user will make it (`StepContext.dispatch`). Tolerances left at None take the defaults for the final
precision (`DEFAULT_TOLERANCES`); a missed one raises `AccuracyError` with the figures, and the user's module
stays unchanged. Latency is measured for the original and the optimized module together, in alternating rounds.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch

from torchopt.accuracy import TASKS, AccuracyError, AccuracyMetrics, compare_outputs, is_classifier_output
from torchopt.config import check_choice, check_positive, check_range, check_type
from torchopt.profile.comparison import compare_latency
from torchopt.recipe import StepConfig, StepContext, register_step
from torchopt.runtime import Dispatch

__all__ = ["DEFAULT_TOLERANCES", "ValidateConfig"]

# Chosen from the expected rounding noise of each precision on deep nets' outputs (fp16: 11-bit mantissa,
# bf16: 8-bit, int8/fp8: ~30-40 dB per layer, accumulating over depth); generous enough for random-weight
# models whose logits are nearly tied, strict enough to catch a broken conversion (SQNR < 10 dB).
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"min_cosine": 0.9999, "min_sqnr_db": 40.0},
    "float16": {"min_cosine": 0.999, "min_sqnr_db": 25.0},
    "bfloat16": {"min_cosine": 0.99, "min_sqnr_db": 15.0},
    "quantized": {"min_cosine": 0.95, "min_sqnr_db": 10.0},
}


def _batches(ctx: StepContext, n: int) -> Iterator[list[torch.Tensor]]:
    """Validation batches: the (checked) calibration batches first, then random examples at the profile points."""
    yield from ctx.calib_inputs[:n]
    count = min(n, len(ctx.calib_inputs))
    points = ["opt", "max", "min"]
    for i, (p, which) in enumerate(itertools.product(range(len(ctx.profiles)), points)):
        if count >= n:
            return
        yield [s.example(which, seed=1000 + 17 * i + j) for j, s in enumerate(ctx.profiles[p])]
        count += 1


def _check_accuracy(config: ValidateConfig, ctx: StepContext, optimized: Dispatch) -> None:
    report, reference = ctx.report, ctx.reference
    metrics = []
    task = config.task
    with torch.no_grad():
        for batch in _batches(ctx, config.batches):
            ref_args = [a.to(ctx.device) for a in batch]
            ref_out = reference(*ref_args)
            if task == "auto":  # decided once, on the first batch, for all
                task = "classify" if is_classifier_output(ref_out, reference) else "embed"
            metrics.append(compare_outputs(ref_out, optimized(*ref_args), task=task))
    merged = AccuracyMetrics.merge(metrics)
    precision = "quantized" if ctx.quantized or ctx.lowp else report.precision
    limits = config.limits(precision)
    report.accuracy, report.tolerances = {**merged.to_dict(), "task": task}, limits
    if config.task == "auto" and task == "embed" and "min_top1" in limits:
        report.notes.append(
            "validate.min_top1 not checked: the output is not a classifier's [batch, classes] logits (the model"
            " does not end in a Linear head); set validate.task: classify to check it"
        )
    failures = []
    if "max_abs" in limits and merged.max_abs > limits["max_abs"]:
        failures.append(f"max |Δ| {merged.max_abs:.4g} > {limits['max_abs']}")
    if merged.cosine < limits["min_cosine"]:
        failures.append(f"cosine {merged.cosine:.6f} < {limits['min_cosine']}")
    if merged.sqnr_db < limits["min_sqnr_db"]:
        failures.append(f"SQNR {merged.sqnr_db:.2f} dB < {limits['min_sqnr_db']} dB")
    if "min_top1" in limits and merged.top1_agreement is not None and merged.top1_agreement < limits["min_top1"]:
        failures.append(f"top-1 agreement {merged.top1_agreement:.4f} < {limits['min_top1']}")
    report.accuracy_passed = not failures
    if failures:
        raise AccuracyError(
            f"recipe {report.recipe!r} ({report.backend}, {report.precision}) misses its accuracy tolerances on"
            f" {merged.samples} samples: {'; '.join(failures)}. The original module is unchanged; loosen the"
            " recipe's `validate` step or keep sensitive layers in higher precision.",
            report,
        )


def _measure_speedup(config: ValidateConfig, ctx: StepContext, optimized: Dispatch) -> None:
    """Time the original and the optimized module together, in alternating rounds under the same conditions
    (same process, threads and load), and record both latencies and the speedup with its spread."""
    args = [s.example("opt", seed=i).to(ctx.device) for i, s in enumerate(ctx.profiles[0])]
    with torch.no_grad():
        cmp = compare_latency(
            {"original": ctx.reference, "optimized": optimized},
            *args,
            rounds=config.rounds,
            iters=config.iters,
            warmup=config.warmup,
            batch_size=args[0].shape[0] if args[0].dim() > 0 else None,
        )
    ctx.report.latency_before = cmp.results["original"].to_dict(samples=False)
    ctx.report.latency_after = cmp.results["optimized"].to_dict(samples=False)
    ctx.report.latency_speedup = cmp.speedups["optimized"].to_dict()


def _apply_validate(config: ValidateConfig, ctx: StepContext) -> None:
    optimized = ctx.dispatch()
    if config.enabled:
        ctx.log("checking accuracy against the original module")
        _check_accuracy(config, ctx, optimized)
    # Without TensorRT, Q/DQ layers run as fake-quant: the latency says nothing about deployed int8/fp8 speed.
    ctx.report.fake_quant = ctx.quantized and ctx.report.backend != "tensorrt"
    if config.measure_latency:
        ctx.log("measuring latency: original and optimized modules in alternating rounds")
        _measure_speedup(config, ctx, optimized)


@register_step("validate", _apply_validate, implicit=True)
@dataclasses.dataclass
class ValidateConfig(StepConfig):
    """Accuracy tolerances against the original module, and how latency is measured.

    max_abs / min_cosine / min_sqnr_db / min_top1: limits (None = precision default, see DEFAULT_TOLERANCES;
        top-1 agreement and max_abs are only checked when set). Set `enabled: false` to skip the check.
    task: "auto", "classify" or "embed": whether top-1 agreement is reported ("auto": the output is
        [batch, classes] and the model ends in a Linear with that many outputs; see `torchopt.accuracy`).
    batches: how many example batches to compare (calibration batches first, then random profile examples).
    measure_latency / warmup / rounds / iters: latency of the original and the optimized module at the first
        profile's opt shape, measured together after optimization: `warmup` untimed calls of each, then
        `rounds` alternating rounds of `iters` timed calls of each; the speedup is reported with its spread
        (see `torchopt.profile.compare_latency`).
    """

    enabled: bool = True
    max_abs: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None
    task: str = "auto"
    batches: int = 3
    measure_latency: bool = True
    warmup: int = 3
    rounds: int = 10
    iters: int = 3

    def __post_init__(self) -> None:
        check_type("validate.enabled", self.enabled, bool)
        for name in ("max_abs", "min_cosine", "min_sqnr_db", "min_top1"):
            v = getattr(self, name)
            if v is not None:
                check_type(f"validate.{name}", v, (int, float))
        if self.min_top1 is not None:
            check_range("validate.min_top1", self.min_top1, low=0, high=1)
        if self.min_cosine is not None:
            check_range("validate.min_cosine", self.min_cosine, low=-1, high=1)
        check_choice("validate.task", self.task, TASKS)
        if self.task == "embed" and self.min_top1 is not None:
            raise ValueError(
                f"validate.min_top1={self.min_top1} needs top-1 agreement, which task 'embed' does not report;"
                " set task to 'classify' or 'auto', or drop min_top1"
            )
        check_positive("validate.batches", self.batches)
        check_type("validate.measure_latency", self.measure_latency, bool)
        # At least one warm-up call: a module's first call pays one-time work (allocations, lazy init).
        check_positive("validate.warmup", self.warmup)
        check_positive("validate.rounds", self.rounds)
        check_positive("validate.iters", self.iters)

    def calib_batches(self) -> int:
        """How many calibration batches the step compares on (the engine checks them up front)."""
        return self.batches

    def limits(self, precision: str) -> dict[str, float]:
        """The tolerances in force for a final precision ('float32', 'float16', 'bfloat16', 'quantized')."""
        out = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["quantized"]))
        for name in ("max_abs", "min_cosine", "min_sqnr_db", "min_top1"):
            if getattr(self, name) is not None:
                out[name] = float(getattr(self, name))
        return out
