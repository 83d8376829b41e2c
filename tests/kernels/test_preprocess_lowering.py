"""Every specialization of the preprocessing kernel compiles for sm_90 (H100) down to a cubin, without a GPU.

Triton's interpreter runs the kernel's Python, so it misses errors that only the GPU compiler sees (layouts,
types of loop-carried values, unsupported casts); this lowers each (pixel format, resampling mode, output
dtype) the launcher can pick through the real NVIDIA backend.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import torchopt.kernels

KERNEL_FILE = Path(torchopt.kernels.__file__).parent / "_preprocess_triton.py"
OUT_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@pytest.fixture(scope="module")
def gpu_module():
    """A copy of the kernel module decorated for the GPU even when TRITON_INTERPRET=1 is set."""
    pytest.importorskip("triton")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # triton.jit reads it when decorating
        spec = importlib.util.spec_from_file_location("_preprocess_triton_sm90", KERNEL_FILE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    assert not mod.INTERPRETED
    return mod


def _compile(mod, fmt: int, interp: int, out_type: str, nchw: bool):
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"this triton ({triton.__version__}) has no ASTSource/GPUTarget API: {exc}")
    fn = mod._preprocess_kernel
    constexprs = {"FORMAT": fmt, "INTERP": interp, "BLOCK_Y": mod.BLOCK_Y, "BLOCK_X": mod.BLOCK_X}
    if nchw:
        constexprs["stride_out_x"] = 1  # Triton specializes an int argument equal to 1 (contiguous NCHW rows)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = {"src_ptr": "*u8", "desc_ptr": "*i64", "descf_ptr": "*fp32"}.get(name, out_type)
        else:  # batch strides of large batches do not fit 32 bits
            signature[name] = "i64" if name in ("stride_src_n", "stride_out_n") else "i32"
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError as exc:
        pytest.skip(f"ASTSource signature differs in triton {triton.__version__}: {exc}")
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": mod.NUM_WARPS})


@pytest.mark.parametrize("dtype", list(OUT_TYPES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("interp", ["COPY", "NEAREST", "BILINEAR", "ANTIALIAS"])
@pytest.mark.parametrize("fmt", ["PACKED_RGB", "YUV420"])
def test_lowers_for_sm90(gpu_module, fmt, interp, dtype):
    kernel = _compile(gpu_module, getattr(gpu_module, fmt), getattr(gpu_module, interp), OUT_TYPES[dtype], True)
    assert kernel.asm["cubin"], "no cubin produced"
    ptx = kernel.asm["ptx"]
    assert "div.full.f32" not in ptx, "an approximate fp32 division slipped in (precompute on the host or div_rn)"


def test_lowers_with_generic_output_strides(gpu_module):
    """NHWC / caller-provided `out` views: stride_out_x is a runtime value."""
    kernel = _compile(gpu_module, gpu_module.PACKED_RGB, gpu_module.BILINEAR, "*fp16", False)
    assert kernel.asm["cubin"]
