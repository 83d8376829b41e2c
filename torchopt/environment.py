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


def environment() -> dict[str, Any]:
    """Device, versions and date of this run (recorded with every report and benchmark)."""
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
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env
