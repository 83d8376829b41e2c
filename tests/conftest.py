"""Suite-wide setup: Triton's interpreter on machines without a GPU, GPU/multi-GPU/TensorRT markers that skip
with a visible reason, and a small CNN trained on scikit-learn's handwritten digits (real data, shipped with the
package) for the quantize module's tests and the recipe step's (tests/quantize/, tests/recipes/test_quantize.py).

The CNN is trained once per session (seeded, ~2-4 s on 2 cores) and handed out as deep copies.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Must be set before triton is first imported: the kernels then run on CPU tensors in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from torchopt._compat import tensorrt_status

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); run on the H200")
    trt, why = tensorrt_status()
    no_trt = pytest.mark.skip(reason=f"needs Torch-TensorRT with CUDA: {why or 'no CUDA device'}")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    few_gpus = pytest.mark.skip(reason=f"needs >= 2 CUDA GPUs ({n_gpus} here); run on the nvidia-h200-x2 kind")
    for item in items:
        if "multi_gpu" in item.keywords and n_gpus < 2:
            item.add_marker(few_gpus)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "tensorrt" in item.keywords and (trt is None or not torch.cuda.is_available()):
            item.add_marker(no_trt)


@pytest.fixture
def seed():
    """A fresh seed per test, reported on failure."""
    torch.manual_seed(1234)
    return 1234


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
    torch.set_num_threads(1)  # see one_thread; restored right after training
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


@pytest.fixture
def acc():
    return accuracy


@pytest.fixture
def one_thread():
    """Run the test single-threaded, then restore the thread count (autouse for every quantize test).

    The models here are tiny: intra-op threads only add overhead, and on a shared 2-core runner they
    oversubscribe the cores (measured: 2 threads under load made the CNN's training 8x slower, 35 s vs 4 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
