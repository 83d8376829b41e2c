"""`deploy(qmodel, mode)`: run a calibrated model's Linear layers in real FP8 / INT8 instead of simulating them.

`torchopt.quantize.quantize` leaves ModelOpt's fake-quant modules: every quantized layer rounds its inputs and
weights to the format's grid and computes in float, so the accuracy is the deployed one and the speed is not.
`deploy` builds the model that runs it: a copy of the model with ModelOpt's conversions undone, each quantized
Linear replaced by a `torchopt.quantize.lowp_linear` layer built from ModelOpt's calibrated amax values (FP8
weights stored as FP8, INT8 as INT8), everything else cast to the compute dtype (fp16). `LOWP_MODES`:

    fp8                E4M3 GEMMs with the calibrated per-tensor scales (torch._scaled_mm; CUDA sm_89+)
    fp8_rowwise        E4M3 GEMMs, per-channel weight and per-row dynamic activation scales (sm_90+)
    int8               W8A8 GEMMs into int32 with the calibrated scales (torch._int_mm; CUDA sm_80+)
    int8_weight_only   int8 weights dequantized at the GEMM, float activations (any CUDA GPU)
    int4_weight_only   int4_awq's block-scaled int4 weights through the tinygemm kernel (sm_80+)

Why torchopt writes these layers instead of using ModelOpt's ``mtq.compress``: in ModelOpt 0.47 a compressed
model holds its weights as ``QTensorWrapper``, which ``torch.export`` refuses ("self._dequantize is True and
self.fake_quant is False"), so it can be neither saved as a program nor packaged by AOTInductor; its GEMM
registry has an FP8 per-tensor GEMM (wrapped in an autograd Function around its own ``torch.compile``) and no
INT8 one. The calibration (the amax values) is ModelOpt's; the layers here are plain aten ops that export,
compile and fuse.

What stays in float (each with its reason in `DeployRecord.float_layers`): convolutions (PyTorch has no FP8
convolution; TensorRT runs them in FP8/INT8), Linear layers whose dims the GEMM cannot take (`LowpMode.multiple`),
layers whose fused parent bypasses their forward (nn.MultiheadAttention's out_proj), and what the quantize
step kept (kept layers keep their precision).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from torchopt.config import check_choice, check_type, dtype_name, first_few
from torchopt.quantize.checkpoint import float_copy
from torchopt.quantize.formats import FORMATS
from torchopt.quantize.keep import KEEP_PRECISIONS
from torchopt.quantize.lowp_linear import (
    Fp8Linear,
    Fp8RowwiseLinear,
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8WeightOnlyLinear,
    LowpLinear,
    int4_inner_k_tiles,
)
from torchopt.quantize.quant_summary import RECORD_ATTR, origin_type, quant_record

__all__ = ["DEPLOY_ATTR", "LOWP_MODES", "DeployRecord", "LowpMode", "deploy", "lowp_unsupported", "weight_bytes"]

DEPLOY_ATTR = "torchopt_lowp"  # the DeployRecord on a deployed model


@dataclasses.dataclass(frozen=True)
class LowpMode:
    """One real low-precision execution mode: the layer it builds and what the GPU and the layer shapes need."""

    name: str
    build: Callable[[torch.nn.Module], LowpLinear]  # from a calibrated ModelOpt QuantLinear
    min_sm: tuple[int, int]
    multiple: int  # in_features and out_features must be multiples of this (the GEMM's alignment rule)
    gemm: str
    needs_input_amax: bool = True
    shape_rule: Callable[[torch.nn.Module], str | None] | None = None  # a further rule on the layer, its reason


def _pre_scale(q: torch.nn.Module) -> torch.Tensor | None:
    return getattr(q.input_quantizer, "pre_quant_scale", None)


def _int4_block(q: torch.nn.Module) -> int:
    """The input-dim block of ModelOpt's block quantizer (``block_sizes: {-1: 128}``)."""
    return int((q.weight_quantizer.block_sizes or {}).get(-1, 0))


def _int4_rule(q: torch.nn.Module) -> str | None:
    block, k = _int4_block(q), q.in_features
    if not block or k % block:
        return f"in_features {k} is not a whole number of int4 blocks ({block or 'no block size'})"
    if int4_inner_k_tiles(k) is None:
        return f"in_features {k} is not a multiple of 32 (the int4 kernel's tiling)"
    return None


LOWP_MODES: dict[str, LowpMode] = {
    m.name: m
    for m in (
        LowpMode(
            "fp8",
            lambda q: Fp8Linear(
                q.weight, q.bias, q.weight_quantizer.amax, q.input_quantizer.amax, pre_scale=_pre_scale(q)
            ),
            min_sm=(8, 9),
            multiple=16,
            gemm="torch._scaled_mm, per-tensor scales",
        ),
        LowpMode(
            "fp8_rowwise",
            lambda q: Fp8RowwiseLinear(q.weight, q.bias, pre_scale=_pre_scale(q)),
            min_sm=(9, 0),
            multiple=16,
            gemm="torch._scaled_mm, row-wise scales",
            needs_input_amax=False,
        ),
        LowpMode(
            "int8",
            lambda q: Int8Linear(
                q.weight,
                q.bias,
                q.weight_quantizer.amax,
                q.input_quantizer.amax,
                pre_scale=_pre_scale(q),
                narrow_range=bool(getattr(q.input_quantizer, "narrow_range", False)),
            ),
            min_sm=(8, 0),
            multiple=8,
            gemm="torch._int_mm",
        ),
        LowpMode(
            "int8_weight_only",
            lambda q: Int8WeightOnlyLinear(q.weight, q.bias, q.weight_quantizer.amax, pre_scale=_pre_scale(q)),
            min_sm=(7, 0),
            multiple=1,
            gemm="torch.mm on int8 weights dequantized at load",
            needs_input_amax=False,
        ),
        LowpMode(
            "int4_weight_only",
            lambda q: Int4WeightOnlyLinear(
                q.weight, q.bias, q.weight_quantizer.amax, _int4_block(q), pre_scale=_pre_scale(q)
            ),
            min_sm=(8, 0),
            multiple=8,
            gemm="torch._weight_int4pack_mm (tinygemm), bfloat16 activations",
            needs_input_amax=False,
            shape_rule=_int4_rule,
        ),
    )
}


@dataclasses.dataclass
class DeployRecord:
    """What `deploy` did (kept on the deployed model as ``model.torchopt_lowp``)."""

    mode: str
    format: str
    dtype: str  # the compute dtype of everything outside the low-precision GEMMs
    lowp_layers: list[str]
    float_layers: dict[str, str]  # module name -> why it runs in float
    weight_bytes: int  # parameters and buffers of the deployed model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lowp_unsupported(mode: str, device: torch.device | str) -> str | None:
    """None when `mode` runs on `device`, else a sentence saying why not."""
    check_choice("mode", mode, list(LOWP_MODES))
    device = torch.device(device)
    spec = LOWP_MODES[mode]
    need = f"compute capability {spec.min_sm[0]}.{spec.min_sm[1]}+"
    if device.type != "cuda":
        return (
            f"real {mode} execution needs a CUDA GPU with {spec.gemm} ({need}); on {device.type} the quantized"
            " model runs as ModelOpt's fake-quant simulation (the deployed accuracy, not the speed)"
        )
    if not torch.cuda.is_available():
        return f"real {mode} execution needs CUDA, and torch.cuda.is_available() is False"
    sm = torch.cuda.get_device_capability(device)
    if sm < spec.min_sm:
        return f"{mode} needs {need}; {torch.cuda.get_device_name(device)} is sm_{sm[0]}{sm[1]}"
    return None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (weights, scales, biases)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """ModelOpt modules whose weight quantizer is on (the layers calibration quantized)."""
    found = {}
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False):
            found[name] = module
    return found


def _why_float(name: str, module: torch.nn.Module, spec: LowpMode, bypassed: dict[str, str]) -> str | None:
    """Why the quantized layer `name` cannot run in `spec`'s GEMM (None: it can)."""
    if name in bypassed:
        return f"its parent reads the weight directly ({bypassed[name]})"
    if not isinstance(module, torch.nn.Linear):
        return (
            f"{origin_type(module)}: PyTorch has no FP8/INT8 kernel for it outside Linear GEMMs"
            " (TensorRT runs convolutions in FP8/INT8)"
        )
    k, n = module.in_features, module.out_features
    if k % spec.multiple or n % spec.multiple:
        return f"in/out features {k}x{n} are not multiples of {spec.multiple} ({spec.gemm} needs them)"
    if spec.shape_rule is not None and (why := spec.shape_rule(module)):
        return why
    if spec.needs_input_amax:
        iq = module.input_quantizer
        if not getattr(iq, "is_enabled", False) or iq.amax is None:
            return "its input is not quantized (no calibrated activation scale)"
    return None


def _cast_outside(model: torch.nn.Module, dtype: torch.dtype, keep: dict[str, torch.dtype]) -> None:
    """Cast floating parameters and buffers to `dtype`, except under the kept modules pinned to a precision."""
    for name, module in model.named_modules():
        pinned = [p for p in keep if name == p or name.startswith(p + ".") or p == ""]
        target = keep[max(pinned, key=len)] if pinned else dtype
        for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is not None and t.is_floating_point() and t.dtype != target:
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.to(target)
                else:
                    setattr(module, key, t.to(target))


def _set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _grouped_reasons(float_layers: dict[str, str]) -> str:
    """Layer -> reason as one line per distinct reason, naming a few layers each (a ResNet has 53 convolutions
    with the same reason)."""
    by_reason: dict[str, list[str]] = {}
    for name, why in float_layers.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"{first_few(names)}: {why}" for why, names in by_reason.items())


def deploy(qmodel: torch.nn.Module, mode: str, *, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """A copy of `qmodel` (calibrated by `torchopt.quantize.quantize`) whose quantized Linear layers run `mode`.

    Args:
        qmodel: the quantized model; left unchanged.
        mode: one of the format's modes (`FORMATS[fmt].lowp_modes`, described in `LOWP_MODES`).
        dtype: the compute dtype of everything outside the low-precision GEMMs (float16 or bfloat16).

    The deployed model carries a `DeployRecord` (``model.torchopt_lowp``). It runs where ``torch._scaled_mm`` /
    ``torch._int_mm`` exist for its tensors' device; `lowp_unsupported` says whether a GPU runs them natively.
    """
    check_type("qmodel", qmodel, torch.nn.Module)
    record = quant_record(qmodel)
    if record is None:
        raise ValueError(
            f"deploy needs a model quantized by torchopt.quantize.quantize, got a {type(qmodel).__name__} without"
            f" its record (model.{RECORD_ATTR})"
        )
    modes = FORMATS[record.format].lowp_modes
    if not modes:
        raise ValueError(f"format {record.format!r} has no real low-precision execution in torchopt (only fake-quant)")
    check_choice(f"mode (for format {record.format!r})", mode, list(modes))
    check_choice("dtype", dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype, ["float16", "bfloat16"])
    spec = LOWP_MODES[mode]
    layers, float_layers = {}, {}
    for name, module in _quantized_layers(qmodel).items():
        why = _why_float(name, module, spec, record.bypassed)
        if why is None:
            layers[name] = spec.build(module)
        else:
            float_layers[name] = why
    if not layers:
        raise ValueError(f"no layer of this model can run {mode}: {_grouped_reasons(float_layers)}")
    model = float_copy(qmodel)
    pinned = {n: KEEP_PRECISIONS[k["precision"]] for n, k in record.kept.items() if KEEP_PRECISIONS[k["precision"]]}
    _cast_outside(model, dtype, pinned)
    device = next(qmodel.parameters()).device
    for name, layer in layers.items():
        if layer.bias is not None:
            layer.bias = layer.bias.to(dtype)
        layer = layer.to(device)
        if name:
            _set_submodule(model, name, layer)
        else:  # the model is one quantized Linear
            model = layer
    deployed = DeployRecord(mode, record.format, dtype_name(dtype), list(layers), float_layers, weight_bytes(model))
    vars(model).pop(RECORD_ATTR, None)  # no ModelOpt quantizer is left for the quantize record to describe
    setattr(model, DEPLOY_ATTR, deployed)
    return model.eval()
