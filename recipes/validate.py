"""Recipe step `validate`: the accuracy guard and the before/after latency measurement.

Tolerances left at None take the defaults for the final precision (`DEFAULT_TOLERANCES`); `optimize`
raises `AccuracyError` with the figures when one is not met, and the user's module stays unchanged.
"""

from __future__ import annotations

import dataclasses

from torchopt.accuracy import TASKS
from torchopt.config import check_choice, check_positive, check_type
from torchopt.recipe import StepConfig, register_step

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


def _apply_validate(config: ValidateConfig, ctx) -> None:
    ctx.validate_config = config  # the engine runs the check after every step (and on the compiled runners)


@register_step("validate", _apply_validate)
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
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ValueError(f"validate.min_top1 must be in [0, 1], got {self.min_top1}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ValueError(f"validate.min_cosine must be in [-1, 1], got {self.min_cosine}")
        check_choice("validate.task", self.task, TASKS)
        if self.task == "embed" and self.min_top1 is not None:
            raise ValueError(
                f"validate.min_top1={self.min_top1} needs top-1 agreement, which task 'embed' does not report;"
                " set task to 'classify' or 'auto', or drop min_top1"
            )
        check_positive("validate.batches", self.batches)
        check_type("validate.measure_latency", self.measure_latency, bool)
        # The latency timer (`torchopt.profile.LatencyConfig`) needs at least one warm-up call.
        check_positive("validate.warmup", self.warmup)
        check_positive("validate.rounds", self.rounds)
        check_positive("validate.iters", self.iters)

    def limits(self, precision: str) -> dict[str, float]:
        """The tolerances in force for a final precision ('float32', 'float16', 'bfloat16', 'quantized')."""
        out = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["quantized"]))
        for name in ("max_abs", "min_cosine", "min_sqnr_db", "min_top1"):
            if getattr(self, name) is not None:
                out[name] = float(getattr(self, name))
        return out
