"""Measured hardware ceilings the benchmarks report their percentages against (shared by the bench scripts)."""

from __future__ import annotations

import torch


def matmul_tflops(device: torch.device) -> float | None:
    """The measured fp16 tensor-core ceiling: an 8192³ matrix product through cuBLAS (median of do_bench);
    None without a GPU."""
    if device.type != "cuda":
        return None
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.half)
    b = torch.randn(n, n, device=device, dtype=torch.half)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * n**3 / (ms * 1e-3) / 1e12
