"""Shared fixtures for the quantize tests: a small transformer block, the SQNR / accuracy limits, and one thread
per test. The trained digits CNN (`cnn`, `digits`, `acc`) comes from tests/conftest.py: the recipe step's tests
use it too.
"""

import pytest
import torch
import torch.nn.functional as F


class TinyBlock(torch.nn.Module):
    """A pre-norm transformer block with explicit q/k/v/o projections (all nn.Linear, so SmoothQuant applies)."""

    def __init__(self, dim=64, heads=4, hidden=128):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


@pytest.fixture
def block():
    torch.manual_seed(0)
    m = TinyBlock().eval()
    with torch.no_grad():
        # Outlier channels in the LayerNorm gain, as in trained LLMs: what SmoothQuant is for.
        m.norm1.weight[:4] = 20.0
    return m


@pytest.fixture
def block_data():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 16, 64, generator=g) for _ in range(4)]


# Limits for the quantized models against their float originals, in one place. Measured on CPU: digits CNN
# int8 max ~39 dB, entropy ~40 dB, fp8 ~27 dB; transformer block (outlier LayerNorm channels) int8 max ~23 dB,
# int8_smoothquant ~27 dB (alpha 1.0) / ~29 dB (alpha 0.5), int4_awq ~15 dB, fp8 ~17 dB. Floors sit a few dB
# below so that seeds and kernels (CPU vs CUDA) do not flake, and above a broken conversion. NVFP4 (4-bit
# floats, CUDA only) gets the loosest floor: measured 7.8 dB on an H200 (int8 23.1, fp8 17.0 there).
CNN_SQNR_FLOOR_DB = {"int8": 30.0, "fp8": 20.0}
BLOCK_SQNR_FLOOR_DB = {"int8": 18.0, "int8_smoothquant": 24.0, "int4_awq": 10.0, "fp8": 12.0, "nvfp4": 6.0}
MAX_ACCURACY_DROP = 0.01  # the "INT8 PTQ losing <= 1 point"
# ModelOpt's entropy search costs ~(2048 / stride) KL evaluations per activation quantizer in Python; stride 16
# keeps the tests fast (the amax grid is then 16/2048 of the histogram range).
FAST_ENTROPY = {"entropy_stride": 16}


@pytest.fixture
def limits():
    return {
        "cnn_sqnr_floor_db": CNN_SQNR_FLOOR_DB,
        "block_sqnr_floor_db": BLOCK_SQNR_FLOOR_DB,
        "max_accuracy_drop": MAX_ACCURACY_DROP,
        "fast_entropy": FAST_ENTROPY,
    }


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every quantize test runs single-threaded (see `one_thread`)."""
