"""Suite-wide setup: Triton's interpreter on machines without a GPU, and GPU/multi-GPU/TensorRT markers that skip
with a visible reason."""

import os

import pytest
import torch

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
