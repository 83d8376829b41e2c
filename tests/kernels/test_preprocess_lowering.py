"""Every specialization of the preprocessing kernel compiles for sm_90 (H100) down to a cubin, without a GPU.

Triton's interpreter runs the kernel's Python, so it misses errors that only the GPU compiler sees (layouts,
types of loop-carried values, unsupported casts); this lowers each (pixel format, resampling mode, output
dtype) the launcher can pick through the real NVIDIA backend. It runs in a subprocess without
TRITON_INTERPRET: a process that imported triton under the interpreter has interpreted copies of triton's own
@jit library functions (tl.zeros_like, ...), which the GPU code generator rejects.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torchopt.kernels

KERNEL_FILE = Path(torchopt.kernels.__file__).parent / "_preprocess_triton.py"
FORMATS = ["PACKED_RGB", "YUV420"]
INTERPS = ["COPY", "NEAREST", "BILINEAR", "ANTIALIAS"]
OUT_TYPES = ["fp32", "fp16", "bf16"]
# (format, interp, output pointer type, NCHW: stride_out_x == 1, which Triton specializes to a constant)
VARIANTS = [(f, i, t, True) for f in FORMATS for i in INTERPS for t in OUT_TYPES]
VARIANTS += [("PACKED_RGB", "BILINEAR", "fp16", False), ("YUV420", "BILINEAR", "fp32", False)]  # NHWC, out= views
# 3-byte pixels read as 64-bit words (the launcher never picks it with antialias)
VARIANTS += [("RGB24", i, t, True) for i in [*INTERPS[:3], "COPY8"] for t in OUT_TYPES]
VARIANTS += [("RGB24", "BILINEAR", "fp16", False), ("RGB24", "COPY8", "fp16", False)]
VARIANTS += [("BGR24", i, "fp16", True) for i in [*INTERPS[:3], "COPY8"]]  # BGR byte order (a constexpr)

_WORKER = r"""
import importlib.util, json, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print(json.dumps({"skip": f"triton {triton.__version__} has no ASTSource/GPUTarget: {exc}"})); sys.exit()
spec = importlib.util.spec_from_file_location("_preprocess_triton_sm90", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert not mod.INTERPRETED
fn, results = mod._preprocess_kernel, {}
for fmt, interp, out_type, nchw in json.loads(sys.argv[2]):
    # the launcher's tile for this variant
    by, bx, warps = mod.TILE_COPY8 if interp == "COPY8" else mod.TILE
    constexprs = {"FORMAT": getattr(mod, fmt), "INTERP": getattr(mod, interp), "BLOCK_Y": by, "BLOCK_X": bx}
    if nchw:
        constexprs["stride_out_x"] = 1
    ptrs = {"src_ptr": "*u8", "desc_ptr": "*i64", "descf_ptr": "*fp32", "out_ptr": "*" + out_type}
    big = ("stride_src_n", "stride_out_n")  # batch strides of large batches do not fit 32 bits
    signature = {n: "constexpr" if n in constexprs else ptrs.get(n, "i64" if n in big else "i32")
                 for n in fn.arg_names}
    key = f"{fmt}-{interp}-{out_type}-{'nchw' if nchw else 'strided'}"
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    except TypeError as exc:
        print(json.dumps({"skip": f"ASTSource differs in triton {triton.__version__}: {exc}"})); sys.exit()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        results[key] = {"cubin": len(k.asm["cubin"]), "approx_div": "div.full.f32" in k.asm["ptx"]}
    except Exception as exc:
        results[key] = {"error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(results))
"""


def _key(fmt, interp, out_type, nchw) -> str:
    return f"{fmt}-{interp}-{out_type}-{'nchw' if nchw else 'strided'}"


@pytest.fixture(scope="module")
def lowered() -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(KERNEL_FILE), json.dumps(VARIANTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: _key(*v))
def test_lowers_for_sm90(lowered, variant):
    res = lowered[_key(*variant)]
    assert "error" not in res, res.get("error")
    assert res["cubin"] > 0, "no cubin produced"
    assert not res["approx_div"], "an approximate fp32 division slipped in (precompute on the host or div_rn)"


def test_descriptor_fields_are_distinct_and_fill_the_row():
    layout = pytest.importorskip("torchopt.kernels._preprocess_layout")
    groups = {"NORM_SCALE": 3, "NORM_BIAS": 3, "NORM_PAD": 3, "YUV": 6}  # fields that span several slots
    codes = {"PACKED_RGB", "YUV420", "RGB24", "BGR24", "COPY", "NEAREST", "BILINEAR", "ANTIALIAS", "COPY8", "FIELDS"}
    names = [n for n in vars(layout) if n.isupper() and n not in codes]
    slots = [int(getattr(layout, n)) + k for n in names for k in range(groups.get(n, 1))]
    assert sorted(slots) == list(range(int(layout.FIELDS))), "descriptor fields overlap or leave gaps"


_GLOBALS_WORKER = r"""
import torchopt.kernels._preprocess_triton as K
K._preprocess_kernel.cache_key  # runs Triton's dependency finder
print(sorted(name for name, _ in K._preprocess_kernel.used_global_vals))
"""


def test_kernel_reads_no_per_launch_checked_globals():
    """Triton re-compares every module-level global a @jit function reads on each JITFunction.run (~1 us each
    on the host); the descriptor layout is read as attributes of `_preprocess_layout`, which it does not check."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _GLOBALS_WORKER], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
