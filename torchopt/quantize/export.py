"""`torch.export` of a ModelOpt-quantized model, the graph Torch-TensorRT converts (CUDA only).

Inside ModelOpt's ``export_torch_mode()`` the quantizers emit ModelOpt's custom ops
(``torch.ops.tensorrt.quantize_op`` for INT8 / FP8, ``torch.ops.tensorrt.dynamic_block_quantize_op`` for NVFP4),
which Torch-TensorRT 2.13 lowers to TensorRT Q/DQ layers. On CPU the export fails on a data-dependent guard in
ModelOpt's fake-quant path, so this refuses CPU models up front. The TensorRT backend calls `export_quantized`
and then `torch_tensorrt.dynamo.compile(..., min_block_size=1)`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization
from torchopt.quantize.calibrate import model_device
from torchopt.quantize.formats import deployment_warning
from torchopt.quantize.quant_summary import detect_format

__all__ = ["QUANT_OP_NAMESPACE", "DeploymentWarning", "export_quantized", "quant_ops", "warn_deployment"]

QUANT_OP_NAMESPACE = "tensorrt"  # ModelOpt registers tensorrt::quantize_op / tensorrt::dynamic_block_quantize_op


class DeploymentWarning(UserWarning):
    """The quantized format will not run (well) through TensorRT on this GPU."""


def warn_deployment(fmt: str, capability: tuple[int, int] | None) -> str | None:
    """Warn (DeploymentWarning) when `fmt` cannot be deployed with TensorRT on a GPU of `capability`.

    Example::

        warn_deployment("fp8", torch.cuda.get_device_capability())   # warns on an A100 (sm_80)
    """
    message = deployment_warning(fmt, capability)
    if message:
        warnings.warn(message, DeploymentWarning, stacklevel=2)
    return message


def quant_ops(program: Any) -> dict[str, int]:
    """Counts of ModelOpt quantize ops in an ExportedProgram / GraphModule / Graph, by op name."""
    if isinstance(program, (torch.export.ExportedProgram, torch.fx.GraphModule)):
        graph = program.graph
    elif isinstance(program, torch.fx.Graph):
        graph = program
    else:
        raise TypeError(f"program must be an ExportedProgram, a GraphModule or a Graph, got {type(program).__name__}")
    counts: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(f"{QUANT_OP_NAMESPACE}."):
            counts[str(node.target)] += 1
    return dict(counts)


def export_quantized(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of a quantized model under ModelOpt's ``export_torch_mode()`` (CUDA only).

    Warns (`DeploymentWarning`) when the model's format cannot be deployed through TensorRT on this GPU
    (FP8 below sm_89, NVFP4 below sm_100, INT4-AWQ anywhere).

    Example::

        program = export_quantized(qmodel.cuda(), (x.cuda(),))
        print(quant_ops(program))   # {'tensorrt.quantize_op.default': 42}
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    device = model_device(model)
    tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
    if device.type != "cuda" or any(t.device.type != "cuda" for t in tensors):
        where = sorted({str(device), *(str(t.device) for t in tensors)})
        raise ValueError(
            f"export_quantized needs the model and the example inputs on CUDA (found {where}): ModelOpt's"
            " quantized graph only exports on CUDA (on CPU torch.export stops at a data-dependent guard)"
        )
    fmt = detect_format(model)
    if fmt is None:
        raise ValueError("model has no ModelOpt quantizer: quantize it first (torchopt.quantize.quantize)")
    if not fmt.startswith("unknown"):
        warn_deployment(fmt, torch.cuda.get_device_capability(device))
    mtq = import_modelopt_quantization()
    with mtq.utils.export_torch_mode(), torch.no_grad():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
