"""`environment()`: the machine, library versions and date of a run, recorded with every report and benchmark.

Only torch, platform and the standard library are imported: the Triton version is read from the installed
package's metadata, so that recording it never imports triton.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Any

import torch

__all__ = ["environment"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str | int | None = None) -> dict[str, Any]:
    """Device, versions and date of this run (recorded with every report and benchmark).

    The GPU described is `device` when it is a CUDA device (e.g. ``"cuda:1"`` or ``1``), else the current one;
    ``gpu_count`` is how many CUDA devices this process sees (after ``CUDA_VISIBLE_DEVICES``).
    """
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchopt": _version("torchopt-infer"),
        "cuda": torch.version.cuda,
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(_cuda_index(device))
        env["gpu_index"] = _cuda_index(device)
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


def _cuda_index(device: torch.device | str | int | None) -> int:
    """The CUDA index `device` names; the current device for None, a CPU device or a bare "cuda"."""
    if device is None:
        return torch.cuda.current_device()
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda" or dev.index is None:
        return torch.cuda.current_device()
    return dev.index
