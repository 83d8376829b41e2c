"""Recipe step `validate`: the accuracy guard and the before/after latency measurement.

Tolerances left at None take the defaults for the final precision (`DEFAULT_TOLERANCES`); `optimize`
raises `AccuracyError` with the figures when one is not met, and the user's module stays unchanged.
"""

from __future__ import annotations

import dataclasses

from torchopt.config import check_positive, check_type
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
    batches: how many example batches to compare (calibration batches first, then random profile examples).
    measure_latency / warmup / iters: latency before and after, at each profile's opt shape.
    """

    enabled: bool = True
    max_abs: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None
    batches: int = 3
    measure_latency: bool = True
    warmup: int = 3
    iters: int = 10

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
        check_positive("validate.batches", self.batches)
        check_type("validate.measure_latency", self.measure_latency, bool)
        # The latency timer (`torchopt.profile.LatencyConfig`) needs at least one warm-up call.
        check_positive("validate.warmup", self.warmup)
        check_positive("validate.iters", self.iters)

    def limits(self, precision: str) -> dict[str, float]:
        """The tolerances in force for a final precision ('float32', 'float16', 'bfloat16', 'quantized')."""
        out = dict(DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["quantized"]))
        for name in ("max_abs", "min_cosine", "min_sqnr_db", "min_top1"):
            if getattr(self, name) is not None:
                out[name] = float(getattr(self, name))
        return out
