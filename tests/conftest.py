"""Suite-wide setup: Triton's interpreter on machines without a GPU, and GPU/TensorRT markers that skip
with a visible reason."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: the kernels then run on CPU tensors in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    from torchopt._compat import tensorrt_status

    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); run on the H100")
    trt, why = tensorrt_status()
    no_trt = pytest.mark.skip(reason=f"needs Torch-TensorRT with CUDA: {why or 'no CUDA device'}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "tensorrt" in item.keywords and (trt is None or not torch.cuda.is_available()):
            item.add_marker(no_trt)


@pytest.fixture
def seed():
    """A fresh seed per test, reported on failure."""
    torch.manual_seed(1234)
    return 1234
