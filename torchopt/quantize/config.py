"""`QuantizeConfig`: every option of `torchopt.quantize.quantize` and of the recipe step ``quantize``, once.

The recipe step registers this same class (``recipes/quantize.py``), so a YAML step and a Python call take the
same keys::

    quantize:
      format: int8            # int8 | int8_smoothquant | fp8 | int4_awq | nvfp4
      method: entropy         # auto | max | entropy | percentile | mse | smoothquant | awq
      keep:                   # layers left unquantized (glob on module names, or module_type)
        - {pattern: conv1, precision: fp16}
        - {pattern: "*head*", precision: fp32}
      max_batches: 32
      cache_dir: ~/.cache/torchopt/quant
      budget: {metric: sqnr_db, min: 20}   # optional: keep the fewest sensitive layers to meet it
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchopt.config import ConfigBase, StepConfig, check_choice, check_positive, check_range, check_type
from torchopt.quantize.formats import FORMATS, check_format, check_method
from torchopt.quantize.keep import KeepRule, check_precision

__all__ = ["BUDGET_METRICS", "Budget", "QuantizeConfig", "as_config"]

# Metrics of the quantized model against the float one (AccuracyMetrics fields) plus task accuracy; all are
# "higher is better".
BUDGET_METRICS = ("sqnr_db", "cosine", "top1_agreement", "accuracy")


@dataclasses.dataclass
class Budget(ConfigBase):
    """An accuracy budget for the automatic sensitivity search: keep the fewest layers so that metric >= min.

    metric: "sqnr_db", "cosine", "top1_agreement" (vs the float model) or "accuracy" (needs labels).
    min: the threshold the quantized model must reach (compared in float32, the metrics' precision: a metric
        equal to `min` once both are rounded to float32 meets it).
    precision: what the kept layers run in ("auto", "fp32", "fp16", "bf16").
    max_keep: give up (ValueError) rather than keep more layers than this (None: no limit).

    Example::

        Budget(metric="top1_agreement", min=0.99)
    """

    metric: str = "sqnr_db"
    min: float = 20.0
    precision: str = "auto"
    max_keep: int | None = None

    def __post_init__(self) -> None:
        check_choice("budget.metric", self.metric, list(BUDGET_METRICS))
        check_type("budget.min", self.min, (int, float))
        self.min = float(self.min)
        if self.metric in ("cosine", "top1_agreement", "accuracy") and not -1.0 <= self.min <= 1.0:
            raise ValueError(f"budget.min for {self.metric} is a fraction in [0, 1], got {self.min}")
        self.precision = check_precision(self.precision, "budget.precision")
        if self.max_keep is not None:
            check_positive("budget.max_keep", self.max_keep)


@dataclasses.dataclass
class QuantizeConfig(StepConfig):
    """How to quantize: format, calibration method, layers kept in higher precision, cache, budget.

    format: "int8" (W per-channel, A per-tensor: what TensorRT converts), "int8_smoothquant", "fp8" (E4M3),
        "int4_awq" (weight-only, block 128; not deployable through TensorRT 2.13), "nvfp4" (needs CUDA).
    method: "auto" (the format's default: max, smoothquant for int8_smoothquant, awq for int4_awq), "max",
        "entropy", "percentile", "mse", "smoothquant", "awq"; see `torchopt.quantize.FORMATS` for which apply.
    keep: `KeepRule`s, ``{pattern|module_type, precision, reason}`` mappings or plain module-name globs.
    max_batches: calibration batches to use (None: all).
    percentile: the percentile of |activation| used as amax by method "percentile".
    entropy_stride: step of ModelOpt's KL-divergence search over histogram bins (1 = exhaustive, ModelOpt's
        default; ~3 s per activation quantizer on one CPU core; 4 is ~4x faster and picks an amax within
        4/2048 of the histogram range).
    alpha: SmoothQuant migration strength in [0, 1] (None: ModelOpt's default).
    cache_dir: directory of the calibration cache (None: no cache); keyed by model, options and data.
    budget: optional `Budget`; quantize() then keeps the fewest layers needed to meet it.

    Example::

        QuantizeConfig(format="int8", method="entropy", keep=[KeepRule(pattern="*head*", precision="fp32")])
        QuantizeConfig.from_dict({"format": "fp8", "keep": ["conv1"]})
    """

    format: str = "int8"
    method: str = "auto"
    keep: list[KeepRule | str] = dataclasses.field(default_factory=list)
    max_batches: int | None = None
    percentile: float = 99.99
    entropy_stride: int = 1
    alpha: float | None = None
    cache_dir: str | None = None
    budget: Budget | None = None

    def __post_init__(self) -> None:
        check_type("quantize.format", self.format, str)
        check_format(self.format, "quantize.format")
        check_type("quantize.method", self.method, str)
        check_method(self.format, self.method, "quantize.method")
        check_type("quantize.keep", self.keep, (list, tuple), "a list of keep rules")
        self.keep = [KeepRule.coerce(r, f"quantize.keep[{i}]") for i, r in enumerate(self.keep)]
        for i, rule in enumerate(self.keep):
            rule.check_selects(f"quantize.keep[{i}]")
        if self.max_batches is not None:
            check_positive("quantize.max_batches", self.max_batches)
        check_range("quantize.percentile", self.percentile, low=0, high=100, low_open=True)
        self.percentile = float(self.percentile)
        check_positive("quantize.entropy_stride", self.entropy_stride)
        if self.alpha is not None:
            check_range("quantize.alpha", self.alpha, low=0, high=1)
            if not FORMATS[self.format].takes_alpha:
                takes = ", ".join(repr(f.name) for f in FORMATS.values() if f.takes_alpha)
                raise ValueError(f"quantize.alpha applies to format {takes} only, format is {self.format!r}")
        if self.cache_dir is not None:
            check_type("quantize.cache_dir", self.cache_dir, str, "a directory path")
        if isinstance(self.budget, dict):
            self.budget = Budget.from_dict(self.budget, where="quantize.budget")
        if self.budget is not None:
            check_type("quantize.budget", self.budget, Budget, "a Budget or a {metric, min} mapping")

    @property
    def resolved_method(self) -> str:
        """The method in force ('auto' resolved to the format's default)."""
        return check_method(self.format, self.method)

    @property
    def needs_cuda(self) -> bool:
        return FORMATS[self.format].needs_cuda

    def calib_batches(self) -> int | None:
        """The calibration batches the quantize step reads (None: all); the engine checks them up front."""
        return self.max_batches

    def replace(self, **changes: Any) -> QuantizeConfig:
        """A validated copy with some options changed."""
        return type(self).merge(self, where=type(self).__name__, **changes)


def as_config(config: QuantizeConfig | dict | str | None, options: dict[str, Any]) -> QuantizeConfig:
    """A QuantizeConfig from a config, a dict, a format name or None, with keyword options applied on top."""
    if isinstance(config, str):
        config = {"format": config}
    if isinstance(config, dict):
        config, options = None, {**config, **options}  # the dict's options, then the keywords on top
    elif config is not None and not isinstance(config, QuantizeConfig):
        raise TypeError(
            f"config must be a QuantizeConfig, a dict of options or a format name, got {type(config).__name__}"
        )
    return QuantizeConfig.merge(config, where="quantize config", **options)
