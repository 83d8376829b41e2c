"""Compare calibration methods and formats on the same model and data: a table and a figure.

Each (format, method) pair quantizes a fresh copy of the float model with the same calibration data and is
scored on the evaluation batches against the float model (SQNR, cosine, top-1 agreement; task accuracy when
labels are given). Pairs where the method does not apply to the format are listed as "n/a" with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchopt.config import check_choice, check_type
from torchopt.quantize._tables import markdown_table, text_table
from torchopt.quantize.api import quantize
from torchopt.quantize.calibrate import CalibData
from torchopt.quantize.config import QuantizeConfig, as_config
from torchopt.quantize.evaluate import EvalSet
from torchopt.quantize.formats import FORMATS, METHODS

__all__ = ["Comparison", "compare"]

_COLUMNS = [
    "format",
    "method",
    "status",
    "sqnr_db",
    "cosine",
    "top1_agreement",
    "accuracy",
    "accuracy_drop",
    "calib_seconds",
    "note",
]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


@dataclasses.dataclass
class Comparison:
    """Rows of (format, method) → metrics against the float model, and the float model's accuracy."""

    rows: list[dict[str, Any]]
    float_accuracy: float | None = None

    @property
    def table(self) -> list[dict[str, Any]]:
        return self.rows

    def ok_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "ok"]

    def best(self, metric: str = "sqnr_db") -> dict[str, Any]:
        """The row with the highest `metric` (all metrics here are higher-is-better)."""
        rows = [r for r in self.ok_rows() if r.get(metric) is not None]
        if not rows:
            raise ValueError(f"no row has metric {metric!r}; columns: {_COLUMNS}")
        return max(rows, key=lambda r: r[metric])

    def to_dict(self) -> dict[str, Any]:
        return {"float_accuracy": self.float_accuracy, "rows": self.rows}

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        cols = [c for c in _COLUMNS if any(r.get(c) is not None for r in self.rows)]
        return cols, [[_fmt(r.get(c)) for c in cols] for r in self.rows]

    def to_markdown(self) -> str:
        text = markdown_table(*self._cells())
        if self.float_accuracy is not None:
            text += f"\n\nfloat model accuracy: {self.float_accuracy:.4f}"
        return text

    def __str__(self) -> str:
        text = text_table(*self._cells())
        if self.float_accuracy is not None:
            text += f"\nfloat model accuracy: {self.float_accuracy:.4f}"
        return text

    def plot(self, path: str | os.PathLike | None = None):
        """A matplotlib Figure: SQNR, cosine and top-1 agreement (and accuracy) per format/method."""
        from matplotlib.figure import Figure  # noqa: PLC0415  (matplotlib only when a figure is asked for)

        rows = self.ok_rows()
        panels = [("sqnr_db", "SQNR vs float (dB)"), ("cosine", "cosine vs float")]
        if any(r.get("top1_agreement") is not None for r in rows):
            panels.append(("top1_agreement", "top-1 agreement"))
        if self.float_accuracy is not None:
            panels.append(("accuracy", "task accuracy"))
        fig = Figure(figsize=(3.2 * len(panels), 3.4), constrained_layout=True)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        labels = [f"{r['format']}\n{r['method']}" for r in rows]
        for ax, (key, title) in zip(axes, panels, strict=True):
            vals = [min(r.get(key) or 0.0, 150.0) for r in rows]  # ∞ dB (identical outputs) drawn at 150
            ax.bar(range(len(rows)), vals, color="#47a")
            ax.set_xticks(range(len(rows)), labels, fontsize=8)
            ax.set_title(title)
            if key in ("cosine", "top1_agreement", "accuracy") and vals:
                lo = min(vals)
                ax.set_ylim(max(0.0, lo - (1 - lo) * 0.5 - 1e-3), 1.0 + 1e-4)
            if key == "accuracy":
                ax.axhline(self.float_accuracy, color="#c33", lw=1, ls="--", label="float")
                ax.legend(fontsize=8)
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        fig.suptitle("quantization: calibration methods and formats vs the float model")
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig


def _names(value: Any, what: str, choices: Sequence[str]) -> list[str]:
    if isinstance(value, str):
        value = [value]
    check_type(what, value, (list, tuple), f"a list of {what}")
    if not value:
        raise ValueError(f"{what} must not be empty; choose from {list(choices)}")
    for i, v in enumerate(value):
        check_type(f"{what}[{i}]", v, str)
        check_choice(f"{what}[{i}]", v, list(choices))
    return list(dict.fromkeys(value))


def compare(
    model: torch.nn.Module,
    calib_data: Any,
    eval_data: Any = None,
    *,
    formats: Sequence[str] = ("int8",),
    methods: Sequence[str] = ("max", "entropy", "percentile"),
    labels: Any = None,
    config: QuantizeConfig | dict | None = None,
    progress: bool = True,
    num_inputs: int | None = None,
) -> Comparison:
    """Quantize copies of `model` with every format × method and score them against the float model.

    Args:
        model: the float model (not modified).
        calib_data: calibration batches (see `CalibData`).
        eval_data: evaluation batches (default: the calibration batches — optimistic; prefer held-out data).
        formats / methods: the grid; pairs that do not apply are listed as "n/a".
        labels: class ids of the evaluation samples in order, for task accuracy.
        config: base options (keep rules, percentile, entropy_stride, max_batches, ...).

    Example::

        table = torchopt.quantize.compare(model, calib, test_x, methods=["max", "entropy"], labels=test_y)
        print(table); table.plot("compare.png")
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    formats = _names(formats, "formats", list(FORMATS))
    methods = _names(methods, "methods", list(METHODS))
    base = as_config(config, {})
    calib = CalibData(calib_data, max_batches=base.max_batches, num_inputs=num_inputs)
    evals = EvalSet(model, calib if eval_data is None else eval_data, labels=labels, num_inputs=num_inputs)
    pairs = [(f, m) for f in formats for m in methods]
    if not any(m in FORMATS[f].methods for f, m in pairs):
        raise ValueError(
            f"no method of {methods} applies to formats {formats}; methods per format: "
            + "; ".join(f"{f}: {', '.join(FORMATS[f].methods)}" for f in formats)
        )
    rows = []
    for fmt, method in pairs:
        row: dict[str, Any] = {"format": fmt, "method": method}
        if method not in FORMATS[fmt].methods:
            rows.append({**row, "status": "n/a", "note": f"{method} does not apply to {fmt}"})
            continue
        t0 = time.perf_counter()
        # alpha (SmoothQuant's strength) is only valid for the formats that take it
        cfg = base.replace(format=fmt, method=method, alpha=base.alpha if FORMATS[fmt].takes_alpha else None)
        qmodel = quantize(copy.deepcopy(model), cfg, calib, progress=progress)
        seconds = time.perf_counter() - t0
        rows.append({**row, "status": "ok", **evals.metrics(qmodel), "calib_seconds": seconds, "note": ""})
    return Comparison(rows, evals.float_accuracy)
