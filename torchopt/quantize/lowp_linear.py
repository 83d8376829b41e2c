"""Linear layers that run their GEMM in low precision: what `torchopt.quantize.deployment` puts in place of ModelOpt's
calibrated fake-quant ``QuantLinear``.

Each layer is plain torch (buffers and aten ops), so it exports (`torch.export`, AOTInductor), compiles (the
quantize before each GEMM is a pointwise op Inductor fuses into the op that produced the activation, and the
rescale after it into the GEMM's epilogue or the next op) and saves with its weights in the low-precision dtype.

    Fp8Linear               E4M3 weights and activations, per-tensor scales from calibration (what ModelOpt's
                            ``fp8`` calibrates and TensorRT runs): ``torch._scaled_mm``
    Fp8RowwiseLinear        E4M3 weights scaled per output channel, activations scaled per row at run time
                            (no calibrated scale; absorbs outlier tokens): ``torch._scaled_mm`` row-wise
    Int8Linear              W8A8: int8 weights per output channel, int8 activations per tensor (ModelOpt's
                            ``int8`` / ``int8_smoothquant``): ``torch._int_mm`` into int32, rescaled in float
    Int8WeightOnlyLinear    int8 weights per output channel, activations in float: halves weight traffic for
                            memory-bound small-batch calls
    Int4WeightOnlyLinear    int4 weights in blocks along the input dim (ModelOpt's ``int4_awq``), activations in
                            bfloat16: ``torch._weight_int4pack_mm`` (the tinygemm kernel), a quarter of fp16's bytes

`quant_fp8` / `quant_int8` are the quantize each layer applies before its GEMM; the tests compare every layer
with the float GEMM of its codes and with ModelOpt's fake-quant module it replaces.

A ``.half()`` / ``.to(dtype)`` on these layers would convert the FP8 weights and float32 scales as well (FP8 is a
floating dtype to torch): move them with ``.to(device)`` only; `deploy` casts the rest of the model itself.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_MAX",
    "INT8_MAX",
    "Fp8Linear",
    "Fp8RowwiseLinear",
    "Int4WeightOnlyLinear",
    "Int8Linear",
    "Int8WeightOnlyLinear",
    "LowpLinear",
]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
INT8_MAX = 127.0
INT4_MAX = 7.0
# torch._int_mm on CUDA takes more than 16 rows; smaller calls are padded up to this many.
INT_MM_MIN_ROWS = 17
# The output dtypes whose bias `torch._scaled_mm` adds itself on CUDA.
EPILOGUE_BIAS_DTYPES = (torch.float16, torch.bfloat16)
# The smallest positive scale: an all-zero row or channel would otherwise divide by zero.
_TINY = torch.finfo(torch.float32).tiny


def _scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    return (amax.detach().float() / qmax).clamp_min(_TINY)


class LowpLinear(torch.nn.Module):
    """The shared part: shape bookkeeping, the optional input pre-scale (SmoothQuant) and the bias."""

    mode: str = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, pre_scale: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("pre_scale", None if pre_scale is None else pre_scale.detach().float().flatten())

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """x as [rows, in_features], with SmoothQuant's per-channel input scale applied."""
        x2 = x.reshape(-1, self.in_features)
        return x2 if self.pre_scale is None else x2 * self.pre_scale.to(x2.dtype)

    def _unflat(self, out: torch.Tensor, x: torch.Tensor, *, add_bias: bool = True) -> torch.Tensor:
        if add_bias and self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def weight_bytes(self) -> int:
        """Bytes of the weight and its scales (what the layer holds besides its bias)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n not in ("bias", "pre_scale"))


class Fp8Linear(LowpLinear):
    """y = x W^T + b with x and W in E4M3 under calibrated per-tensor scales (``torch._scaled_mm``).

    With a 16-bit output the bias is added in the GEMM's epilogue: added afterwards it costs a pass over the output,
    and where the output is reshaped into attention heads that pass is a kernel of its own, one per q/k/v
    projection. CUDA takes no bias with a float32 output.
    ``fast_accum`` selects Hopper's FP8 fast accumulation (`use_fast_accum`), which skips the periodic promotion of
    the tensor cores' partial sums to full float32: faster, slightly less exact; bench_lowp times both.
    """

    mode = "fp8"
    fast_accum = False

    def __init__(self, weight, bias, weight_amax, input_amax, pre_scale=None):
        super().__init__(weight.shape[1], weight.shape[0], bias, pre_scale)
        w_scale = _scale(weight_amax.reshape(()), FP8_MAX)
        self.register_buffer("weight", (weight.detach().float() / w_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("input_scale", _scale(input_amax.reshape(()), FP8_MAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = quant_fp8(self._flat(x), self.input_scale)
        in_epilogue = self.bias is not None and x.dtype in EPILOGUE_BIAS_DTYPES
        out = torch._scaled_mm(
            xq,
            self.weight.t(),
            self.input_scale,
            self.weight_scale,
            bias=self.bias.to(x.dtype) if in_epilogue else None,
            out_dtype=x.dtype,
            use_fast_accum=self.fast_accum,
        )
        return self._unflat(out, x, add_bias=not in_epilogue)


class Fp8RowwiseLinear(LowpLinear):
    """E4M3 GEMM with a scale per weight row (output channel) and per activation row, the latter at run time."""

    mode = "fp8_rowwise"
    out_dtype = torch.bfloat16  # row-wise _scaled_mm writes bfloat16 on CUDA

    def __init__(self, weight, bias, pre_scale=None):
        super().__init__(weight.shape[1], weight.shape[0], bias, pre_scale)
        w_scale = _scale(weight.detach().abs().amax(dim=1, keepdim=True), FP8_MAX)  # [out, 1]
        self.register_buffer("weight", (weight.detach().float() / w_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.register_buffer("weight_scale", w_scale.reshape(1, -1).contiguous())  # [1, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._flat(x)
        x_scale = _scale(x2.abs().amax(dim=1, keepdim=True), FP8_MAX)  # [rows, 1]
        xq = quant_fp8(x2, x_scale)
        out = torch._scaled_mm(xq, self.weight.t(), x_scale, self.weight_scale, out_dtype=self.out_dtype)
        return self._unflat(out.to(x.dtype), x)


class Int8Linear(LowpLinear):
    """W8A8: ``torch._int_mm`` of int8 activations (per-tensor scale) and int8 weights (per output channel)."""

    mode = "int8"

    def __init__(self, weight, bias, weight_amax, input_amax, pre_scale=None, narrow_range=False):
        super().__init__(weight.shape[1], weight.shape[0], bias, pre_scale)
        w_scale = _scale(weight_amax.reshape(-1, 1), INT8_MAX)  # [out, 1]
        self.register_buffer("weight", quant_int8(weight.detach().float(), w_scale, narrow_range=True))
        self.register_buffer("weight_scale", w_scale.reshape(-1))
        self.register_buffer("input_scale", _scale(input_amax.reshape(()), INT8_MAX))
        self.narrow_range = narrow_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._flat(x)
        rows = x2.shape[0]
        xq = quant_int8(x2, self.input_scale, narrow_range=self.narrow_range)
        # Always INT_MM_MIN_ROWS rows of padding, never a branch on the row count: an `if` would split a dynamic
        # batch dim in two (torch.export refuses it, dynamo compiles twice) and torch.sym_max breaks dynamo's graph
        # on torch 2.11. Under Inductor the padding is written by the quantize kernel itself.
        xq = torch.nn.functional.pad(xq, (0, 0, 0, INT_MM_MIN_ROWS))
        acc = torch._int_mm(xq, self.weight.t())[:rows]
        out = (acc.float() * (self.input_scale * self.weight_scale)).to(x.dtype)
        return self._unflat(out, x)


class Int8WeightOnlyLinear(LowpLinear):
    """int8 weights per output channel, dequantized inside the GEMM's operand load; activations stay float."""

    mode = "int8_weight_only"

    def __init__(self, weight, bias, weight_amax, pre_scale=None):
        super().__init__(weight.shape[1], weight.shape[0], bias, pre_scale)
        w_scale = _scale(weight_amax.reshape(-1, 1), INT8_MAX)
        self.register_buffer("weight", quant_int8(weight.detach().float(), w_scale, narrow_range=True))
        self.register_buffer("weight_scale", w_scale.reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._flat(x)
        out = torch.mm(x2, self.weight.t().to(x2.dtype)) * self.weight_scale.to(x2.dtype)
        return self._unflat(out, x)


class Int4WeightOnlyLinear(LowpLinear):
    """int4 weights (symmetric, one scale per `block` inputs of each output channel) through the tinygemm kernel.

    The kernel's packed layout differs between CUDA (``_convert_weight_to_int4pack``) and the CPU (``..._for_cpu``):
    the layer is packed for the device `weight` is on and runs there only (`deploy` builds it in place).
    """

    mode = "int4_weight_only"
    compute_dtype = torch.bfloat16  # what the CUDA kernel takes

    def __init__(self, weight, bias, block_amax, block: int, pre_scale=None):
        super().__init__(weight.shape[1], weight.shape[0], bias, pre_scale)
        n, k = weight.shape
        scale = _scale(block_amax.reshape(n, k // block), INT4_MAX)  # [out, blocks]
        codes = quant_int4(weight.detach().float(), scale, block)  # [out, in], 0..15
        self.block = block
        self.on_cuda = weight.is_cuda
        self.register_buffer("weight", _pack_int4(codes, k))
        zeros = torch.zeros_like(scale)
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zeros.t()], -1).to(self.compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._flat(x).to(self.compute_dtype)
        mm = torch.ops.aten._weight_int4pack_mm if self.on_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        out = mm(x2, self.weight, self.block, self.scales_and_zeros)
        return self._unflat(out.to(x.dtype), x)


def int4_inner_k_tiles(in_features: int) -> int | None:
    """The tinygemm tiling for `in_features` (it needs a multiple of 16 x tiles), None when none fits."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def _pack_int4(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    if codes.is_cuda:  # two codes a byte, the even column in the high nibble, then the kernel's tiling
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(pairs, int4_inner_k_tiles(in_features))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


def quant_int4(weight: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Unsigned int4 codes (int32, 0..15) of ``round(w / scale) + 8`` per block, ModelOpt's symmetric [-8, 7]."""
    n, k = weight.shape
    q = torch.round(weight.reshape(n, k // block, block) / scale[..., None]).clamp(-INT4_MAX - 1, INT4_MAX)
    return (q + INT4_MAX + 1).reshape(n, k).to(torch.int32)


def quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of ``x / scale``, saturated at ±448 (the cast alone would give NaN above it)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quant_int8(x: torch.Tensor, scale: torch.Tensor, *, narrow_range: bool) -> torch.Tensor:
    """int8 codes of ``round(x / scale)``, clamped to [-127, 127] (narrow) or [-128, 127], as ModelOpt rounds."""
    low = -INT8_MAX if narrow_range else -INT8_MAX - 1
    return torch.round(x.float() / scale).clamp(low, INT8_MAX).to(torch.int8)
