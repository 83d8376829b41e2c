"""Shared fixtures for the quantize tests: a small CNN trained on scikit-learn's handwritten digits (real data,
shipped with the package), and a small transformer block.

The CNN is trained once per session (seeded, ~2-4 s on 2 cores) and handed out as deep copies.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

N_TRAIN = 1200  # of 1797 digits; the rest (597) is the test set
BATCH = 64


class DigitsCNN(torch.nn.Module):
    """Two convolutions and two linear layers on 1x8x8 digits; ~14k parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = torch.nn.Linear(32 * 2 * 2, 64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc1(x.flatten(1))))


class Digits:
    """The digits split into train / test, standardized like any image pipeline (mean 0, std 1)."""

    def __init__(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d.target, dtype=torch.int64)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        x, y = x[perm], y[perm]
        mean, std = x[:N_TRAIN].mean(), x[:N_TRAIN].std()
        x = (x - mean) / std
        self.x_train, self.y_train = x[:N_TRAIN], y[:N_TRAIN]
        self.x_test, self.y_test = x[N_TRAIN:], y[N_TRAIN:]

    def calib(self, n_batches=8):
        """Calibration batches from the training split."""
        return [self.x_train[i : i + BATCH] for i in range(0, n_batches * BATCH, BATCH)]

    def test_batches(self):
        return [self.x_test[i : i + 200] for i in range(0, len(self.x_test), 200)]


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="session")
def digits():
    return Digits()


@pytest.fixture(scope="session")
def _trained_cnn(digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_thread; restored right after training
    try:
        return _train(digits)
    finally:
        torch.set_num_threads(threads)


def _train(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        order = torch.randperm(N_TRAIN, generator=gen)
        for i in range(0, N_TRAIN, BATCH):
            idx = order[i : i + BATCH]
            loss = F.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def cnn(_trained_cnn):
    """A fresh copy of the trained digits CNN (tests may quantize it in place)."""
    return copy.deepcopy(_trained_cnn)


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


@pytest.fixture
def acc():
    return accuracy


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each quantize test single-threaded, then restore the thread count.

    The models here are tiny: intra-op threads only add overhead, and on a shared 2-core runner they
    oversubscribe the cores (measured: 2 threads under load made the CNN's training 8x slower, 35 s vs 4 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
