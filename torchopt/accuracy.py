"""Accuracy metrics between a reference output and an optimized one: max/mean abs error, cosine, SQNR, top-1.

Outputs may be tensors or nested tuples/lists/dicts of tensors; metrics are computed per tensor leaf and the
worst leaf is reported. SQNR = 10·log10(‖ref‖² / ‖ref − out‖²) in dB (∞ when identical).

Top-1 agreement (argmax of the optimized output equals the reference's) means something only for a
classifier's logits; over an embedding's dimensions it is noise. It is computed for ``task="classify"``, never
for ``task="embed"``, and for ``task="auto"`` when the first output is ``[batch, classes]`` (classes > 1) and —
when the model is given — the model's last module is an ``nn.Linear`` with ``classes`` outputs (a classifier
head). Models that end in a Linear projection to an embedding pass this rule: say ``task="embed"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

__all__ = ["TASKS", "AccuracyError", "AccuracyMetrics", "compare_outputs", "flatten_outputs", "is_classifier_output"]

TASKS = ("auto", "classify", "embed")


class AccuracyError(RuntimeError):
    """The optimized module misses the recipe's accuracy tolerances; `.report` holds the figures."""

    def __init__(self, message: str, report: Any):
        super().__init__(message)
        self.report = report


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensor leaves of a (nested) output in a stable order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    if hasattr(out, "to_tuple"):  # HF ModelOutput
        return flatten_outputs(out.to_tuple())
    return []


@dataclasses.dataclass
class AccuracyMetrics:
    """Worst-leaf agreement of an optimized output with the reference (all floats, JSON-friendly)."""

    max_abs: float
    mean_abs: float
    cosine: float
    sqnr_db: float
    top1_agreement: float | None = None  # for [N, C] classifier logits only
    samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def merge(items: list[AccuracyMetrics]) -> AccuracyMetrics:
        """Combine metrics over several batches: worst of each, top-1 averaged by sample count."""
        if not items:
            raise ValueError("merge needs at least one AccuracyMetrics")
        tops = [(m.top1_agreement, m.samples) for m in items if m.top1_agreement is not None]
        top1 = sum(t * n for t, n in tops) / max(1, sum(n for _, n in tops)) if tops else None
        return AccuracyMetrics(
            max_abs=max(m.max_abs for m in items),
            mean_abs=max(m.mean_abs for m in items),
            cosine=min(m.cosine for m in items),
            sqnr_db=min(m.sqnr_db for m in items),
            top1_agreement=top1,
            samples=sum(m.samples for m in items),
        )


def _leaf_metrics(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float, float]:
    r = ref.detach().double().flatten().cpu()
    o = out.detach().double().flatten().cpu()
    if r.numel() == 0:
        return 0.0, 0.0, 1.0, math.inf
    if not torch.isfinite(o).all():
        return math.inf, math.inf, -1.0, -math.inf
    diff = r - o
    noise = float(diff.pow(2).sum())
    signal = float(r.pow(2).sum())
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    denom = float(r.norm() * o.norm())
    cos = 1.0 if denom == 0 and noise == 0 else (float(r @ o) / denom if denom > 0 else 0.0)
    return float(diff.abs().max()), float(diff.abs().mean()), cos, sqnr


def _is_logits_shape(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] > 1 and t.dtype.is_floating_point


def _last_module(model: torch.nn.Module) -> torch.nn.Module:
    *_, last = model.modules()
    return last


def is_classifier_output(output: Any, model: torch.nn.Module | None = None) -> bool:
    """The ``task="auto"`` rule: the first output is ``[batch, classes]`` float logits and (when `model` is
    given) the model's last module is an ``nn.Linear`` with ``classes`` outputs."""
    leaves = flatten_outputs(output)
    if not leaves or not _is_logits_shape(leaves[0]):
        return False
    if model is None:
        return True
    head = _last_module(model)
    return isinstance(head, torch.nn.Linear) and head.out_features == leaves[0].shape[1]


def compare_outputs(ref: Any, out: Any, *, task: str = "auto", model: torch.nn.Module | None = None) -> AccuracyMetrics:
    """Compare two model outputs of the same structure.

    `task` decides whether top-1 agreement is computed (see the module docstring); `model` (the reference
    model) lets ``task="auto"`` look for a classifier head.

    Example::

        m = compare_outputs(model(x), optimized(x))
        print(m.sqnr_db, m.cosine)
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    refs, outs = flatten_outputs(ref), flatten_outputs(out)
    if len(refs) != len(outs) or not refs:
        raise ValueError(f"outputs differ in structure: reference has {len(refs)} tensors, optimized {len(outs)}")
    per = []
    for i, (r, o) in enumerate(zip(refs, outs, strict=True)):
        if r.shape != o.shape:
            raise ValueError(f"output {i} shape differs: reference {tuple(r.shape)}, optimized {tuple(o.shape)}")
        per.append(_leaf_metrics(r, o))
    r0, o0 = refs[0], outs[0]
    if task == "classify" and not _is_logits_shape(r0):
        raise ValueError(
            f"task='classify' needs [batch, classes] float logits as the first output, got shape"
            f" {tuple(r0.shape)} ({r0.dtype}); use task='embed' for other outputs"
        )
    classify = task == "classify" or (task == "auto" and is_classifier_output(r0, model))
    top1 = float((r0.argmax(1) == o0.argmax(1)).float().mean()) if classify else None
    return AccuracyMetrics(
        max_abs=max(p[0] for p in per),
        mean_abs=max(p[1] for p in per),
        cosine=min(p[2] for p in per),
        sqnr_db=min(p[3] for p in per),
        top1_agreement=top1,
        samples=int(r0.shape[0]) if r0.dim() > 0 else 1,
    )
