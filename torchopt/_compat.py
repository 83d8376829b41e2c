"""Optional dependencies, imported lazily and probed once, each with the reason it is unavailable.

`import torchopt` must stay light and work without a GPU or TensorRT, so nothing here imports a heavy
package at module import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
from types import ModuleType

import torch

from torchopt.config import first_line
from torchopt.torchvision_compat import enable_cpu_torchvision

__all__ = [
    "cuda_available",
    "import_modelopt_quantization",
    "import_torchvision",
    "tensorrt_status",
    "triton_status",
]


def cuda_available() -> bool:
    return torch.cuda.is_available()


@functools.cache
def tensorrt_status() -> tuple[ModuleType | None, str]:
    """(torch_tensorrt module or None, reason it is unavailable or '')."""
    try:
        # torch_tensorrt prints its import failures to stdout before raising; the reason goes in our report.
        with contextlib.redirect_stdout(io.StringIO()):
            import torch_tensorrt  # noqa: PLC0415
    except ImportError as exc:
        return None, f"no torch_tensorrt ({exc}); install with `pip install torch-tensorrt` on a CUDA machine"
    except Exception as exc:  # torch_tensorrt raises a bare Exception when libnvinfer is missing
        return None, f"torch_tensorrt is installed but TensorRT is not loadable: {first_line(exc)}"
    return torch_tensorrt, ""


@functools.cache
def triton_status() -> tuple[bool, str]:
    """Whether Triton kernels can launch here, and why not."""
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as exc:
        return False, f"triton not installed ({exc})"
    return True, ""


def import_modelopt_quantization() -> ModuleType:
    """`modelopt.torch.quantization`, with a clear ImportError when ModelOpt is missing."""
    try:
        return importlib.import_module("modelopt.torch.quantization")
    except ImportError as exc:
        raise ImportError(
            f"quantization needs NVIDIA ModelOpt: `pip install nvidia-modelopt requests huggingface_hub` ({exc})"
        ) from exc


@functools.cache
def import_torchvision() -> ModuleType:
    """Import torchvision, also next to a CPU-only torch (see `torchopt.torchvision_compat`)."""
    try:
        return enable_cpu_torchvision()
    except ImportError as exc:
        raise ImportError(f"this feature needs torchvision: `pip install torchvision` ({exc})") from exc
