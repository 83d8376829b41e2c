"""Recipe step `cast`: precision (fp32/fp16/bf16) and memory format (channels_last) of the module."""

from __future__ import annotations

import dataclasses

import torch

from torchopt.config import DTYPES, FLOAT_DTYPES, check_type, parse_dtype
from torchopt.recipe import StepConfig, register_step

__all__ = ["CastConfig"]


def _apply_cast(config: CastConfig, ctx) -> None:
    dtype = config.dtype
    if dtype == "auto":
        if ctx.device.type == "cuda":
            dtype, why = "float16", "auto: float16 on CUDA (tensor cores, half the memory traffic)"
        else:
            dtype, why = "float32", "auto: float32 on CPU (half precision is emulated or slow on most CPUs)"
    else:
        why = f"{dtype} requested by the recipe"
        if dtype != "float32" and ctx.device.type == "cpu":
            why += " (note: half precision on CPU is often slower than float32)"
    ctx.set_precision(dtype, why)
    if dtype != "float32":
        ctx.model.to(DTYPES[dtype])
    has_conv = any(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in ctx.model.modules())
    four_d = any(s.rank == 4 for s in ctx.profiles[0])
    use_cl = config.channels_last if config.channels_last is not None else (has_conv and four_d)
    if use_cl:
        ctx.model.to(memory_format=torch.channels_last)
        ctx.note(
            "channels_last memory format"
            + (" (auto: 2-D convolutions on 4-D inputs)" if config.channels_last is None else "")
        )
    ctx.cast_outputs = config.cast_outputs


@register_step("cast", _apply_cast)
@dataclasses.dataclass
class CastConfig(StepConfig):
    """Cast the module's parameters and buffers.

    dtype: "auto" (float16 on CUDA, float32 on CPU), "float32", "float16" or "bfloat16"; floating inputs
        are cast to it at call time.
    channels_last: None = auto (on when the model has 2-D convolutions and a 4-D input).
    cast_outputs: return floating outputs in float32, as the original model does.
    """

    dtype: str = "auto"
    channels_last: bool | None = None
    cast_outputs: bool = True

    def __post_init__(self) -> None:
        check_type("cast.dtype", self.dtype, str)
        self.dtype = parse_dtype("cast.dtype", self.dtype, ["auto", *FLOAT_DTYPES])
        if self.channels_last is not None:
            check_type("cast.channels_last", self.channels_last, bool, "true, false or null (auto)")
        check_type("cast.cast_outputs", self.cast_outputs, bool)
