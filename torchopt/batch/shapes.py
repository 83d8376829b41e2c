"""Turn batch-size results into a dynamic-shape profile: ``opt`` = the optimal size, ``max`` = the max fit."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torchopt.batch._calls import check_batch_limit
from torchopt.inputs import InputSpec

__all__ = ["batch_profile"]


def _size(name: str, value: Any) -> int:
    size = getattr(value, "size", value)  # a MaxBatchResult / OptimalBatchResult or an int
    check_batch_limit(name, size)
    return size


def batch_profile(
    specs: InputSpec | Sequence[InputSpec], max_fit: Any, optimal: Any = None, *, min_batch: int | None = None
) -> list[InputSpec]:
    """The specs with their batch dim (dim 0) set to ``min/opt/max = min_batch / optimal / max_fit``.

    `max_fit` and `optimal` are sizes or the results of `find_max_batch` / `find_optimal_batch`; optimal
    None keeps each spec's opt (clamped to the new range). `min_batch` None keeps each spec's min (clamped).
    Other dims and `dim_names` are kept. An opt equal to min on a dynamic dim is moved to min + 1, because
    export and TensorRT specialize size-1 (and opt == min) dims.

    Example::

        mx = torchopt.batch.find_max_batch(model, specs)
        best = torchopt.batch.find_optimal_batch(model, specs, latency_budget_ms=20, max_batch=mx.size)
        specs = torchopt.batch.batch_profile(specs, mx, best)   # then torchopt.optimize(model, inputs=specs)
    """
    spec_list = [specs] if isinstance(specs, InputSpec) else list(specs)
    if not spec_list or not all(isinstance(s, InputSpec) for s in spec_list):
        raise TypeError(f"specs must be an InputSpec or a non-empty list of them, got {specs!r}")
    hi = _size("max_fit", max_fit)
    opt = None if optimal is None else _size("optimal", optimal)
    if min_batch is not None:
        check_batch_limit("min_batch", min_batch)
        if min_batch > hi:
            raise ValueError(f"min_batch ({min_batch}) must be <= the max fit ({hi})")
    if opt is not None and opt > hi:
        raise ValueError(f"the optimal batch ({opt}) must be <= the max fit ({hi})")
    out = []
    for spec in spec_list:
        lo = min(spec.min[0], hi) if min_batch is None else min_batch
        mid = min(max(spec.opt[0] if opt is None else opt, lo), hi)
        if mid == lo < hi:
            mid = lo + 1
        names = dict(spec.dim_names or {})
        if lo == hi:
            names.pop(0, None)  # a static dim cannot carry a symbol name
        out.append(
            dataclasses.replace(
                spec,
                shape=None,
                min=(lo, *spec.min[1:]),
                opt=(mid, *spec.opt[1:]),
                max=(hi, *spec.max[1:]),
                dim_names=names or None,
            )
        )
    return out
