"""`torch.export` of a prepared module over its input profiles: the one place that turns profiles into
export arguments (example inputs and `Dim`s).

Saving and the TensorRT backend export through here. Q/DQ models need ModelOpt's export mode: the caller passes
`torchopt.quantize.export_quantized` as `export_fn` (this module sits below `quantize` and cannot import it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.export import Dim

from torchopt.inputs import InputSpec, StructuredInputs

__all__ = ["export_args", "export_dynamic_shapes", "export_program"]


def export_dynamic_shapes(profiles: list[list[InputSpec]]) -> dict[str, dict[int, object]]:
    """`torch.export` dynamic_shapes covering every profile (one Dim per named dim, union of the ranges)."""
    ranges: dict[str, tuple[int, int]] = {}
    for prof in profiles:
        for s in prof:
            for d in s.dynamic_dims:
                name = s.dim_name(d)
                lo, hi = ranges.get(name, (s.min[d], s.max[d]))
                ranges[name] = (min(lo, s.min[d]), max(hi, s.max[d]))
    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in ranges.items()}
    return {s.name: {d: dims[s.dim_name(d)] for d in s.dynamic_dims} for s in profiles[0]}


def export_args(profiles: list[list[InputSpec]], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Examples at each input's export point (`InputSpec.export_shape`: opt, dynamic dims >= 2)."""
    args = []
    for s in profiles[0]:
        shape = s.export_shape
        t = torch.rand(shape) if s.torch_dtype.is_floating_point else torch.randint(0, 2, shape)
        t = t.to(device=device, dtype=dtype if s.torch_dtype.is_floating_point else s.torch_dtype)
        args.append(t)
    return tuple(args)


def export_program(
    module: torch.nn.Module,
    profiles: list[list[InputSpec]],
    device: torch.device,
    dtype: torch.dtype,
    *,
    export_fn: Callable[..., torch.export.ExportedProgram] | None = None,
) -> torch.export.ExportedProgram:
    """`torch.export` of a prepared module over `profiles`' dynamic dims (examples from `export_args`).

    `export_fn(module, args, dynamic_shapes=...)` replaces `torch.export.export` (Q/DQ models pass
    `torchopt.quantize.export_quantized`).
    """
    args = export_args(profiles, device, dtype)
    # Positional, as the runners are called: the specs' names need not be the forward's argument names (a
    # single input binds by position; dict/list inputs come flat through `StructuredInputs.forward(*leaves)`).
    by_name = export_dynamic_shapes(profiles)
    dynamic: Any = tuple(by_name[s.name] for s in profiles[0])
    if isinstance(module, StructuredInputs):
        dynamic = (dynamic,)  # one *leaves argument
    with torch.no_grad():
        return (export_fn or torch.export.export)(module, args, dynamic_shapes=dynamic)
