"""Agreement of a quantized model with its float original on fixed evaluation batches (shared by compare,
sensitivity and the benchmark): SQNR / cosine / top-1 agreement from `torchopt.accuracy`, task accuracy when
labels are given."""

from __future__ import annotations

import math
from typing import Any

import torch

from torchopt.accuracy import AccuracyMetrics, compare_outputs, flatten_outputs
from torchopt.quantize.calibrate import CalibData, _eval_no_grad

__all__ = ["EvalSet"]


def _first_logits(out: Any, where: str) -> torch.Tensor:
    leaves = flatten_outputs(out)
    if not leaves or leaves[0].dim() != 2:
        shape = tuple(leaves[0].shape) if leaves else None
        raise ValueError(f"{where}: labels need [N, num_classes] logits as the first output, got shape {shape}")
    return leaves[0]


class EvalSet:
    """Evaluation batches with the float model's outputs computed once.

    Args:
        model: the float reference model.
        data: evaluation batches (anything `CalibData` takes except a callable).
        labels: optional class labels, concatenated in batch order (a tensor of N ints).
        num_inputs: leading items of tuple batches that are inputs (see `CalibData`).

    Example::

        ev = EvalSet(model, test_batches, labels=y_test)
        print(ev.float_accuracy, ev.metrics(quantized_model))
    """

    def __init__(self, model: torch.nn.Module, data: Any, *, labels: Any = None, num_inputs: int | None = None):
        source = data if isinstance(data, CalibData) else CalibData(data, num_inputs=num_inputs, name="eval_data")
        if source.is_callable:
            raise TypeError("eval_data must be batches (a DataLoader, a list of tensors/tuples/dicts), not a callable")
        self.calls = list(source.calls(model))
        with _eval_no_grad(model):
            self.reference = [model(*a, **k) for a, k in self.calls]
        self.labels = None
        self.float_accuracy: float | None = None
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                labels = torch.as_tensor(labels)
            if labels.dtype.is_floating_point or labels.dim() != 1:
                raise TypeError(
                    f"labels must be a 1-D integer tensor of class ids, got {labels.dtype} {tuple(labels.shape)}"
                )
            n = sum(_first_logits(r, "eval_data").shape[0] for r in self.reference)
            if labels.numel() != n:
                raise ValueError(f"labels has {labels.numel()} entries but eval_data has {n} samples")
            self.labels = labels.cpu()
            self.float_accuracy = self._accuracy(self.reference)

    def _accuracy(self, outputs: list[Any]) -> float:
        preds = torch.cat([_first_logits(o, "model output").argmax(1).cpu() for o in outputs])
        return float((preds == self.labels).float().mean())

    def outputs(self, model: torch.nn.Module) -> list[Any]:
        with _eval_no_grad(model):
            return [model(*a, **k) for a, k in self.calls]

    def metrics(self, model: torch.nn.Module) -> dict[str, Any]:
        """AccuracyMetrics fields vs the float model (worst batch), plus accuracy/accuracy_drop with labels."""
        outs = self.outputs(model)
        merged = AccuracyMetrics.merge([compare_outputs(r, o) for r, o in zip(self.reference, outs, strict=True)])
        row = merged.to_dict()
        if self.labels is not None:
            row["accuracy"] = self._accuracy(outs)
            row["accuracy_drop"] = self.float_accuracy - row["accuracy"]
        return row

    def metric(self, model: torch.nn.Module, name: str) -> float:
        value = self.metrics(model).get(name)
        if value is None:
            if name == "accuracy":
                raise ValueError("metric 'accuracy' needs labels: pass labels=... (class ids in eval_data order)")
            raise ValueError(f"metric {name!r} is not available for this model's outputs (top-1 needs [N, C] logits)")
        return float(value) if not math.isnan(value) else -math.inf
