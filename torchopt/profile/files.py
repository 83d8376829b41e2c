"""Output files of the profilers: checked output paths and JSON that stays valid (no NaN, paths as strings)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from torchopt.config import check_type

__all__ = ["check_output_dir", "check_output_file", "json_safe", "write_json"]


def check_output_dir(path: str | os.PathLike, name: str = "out_dir") -> Path:
    """Create `path` if needed and check that files can be written in it; ValueError naming `name` if not."""
    check_type(name, path, (str, os.PathLike), "a directory path")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{name} {os.fspath(path)!r} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{name} {os.fspath(path)!r} cannot be created: {exc}") from exc
    probe = p / f".torchopt-write-test-{os.getpid()}"
    try:  # os.access lies for root and on some network file systems: try for real
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{name} {os.fspath(path)!r} is not writable: {exc}") from exc
    return p


def check_output_file(path: str | os.PathLike, name: str = "path") -> Path:
    """Check that `path` can be written as a file (its directory is created if needed)."""
    check_type(name, path, (str, os.PathLike), "a file path")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name} {os.fspath(path)!r} is a directory, expected a file path")
    check_output_dir(p.parent if str(p.parent) else ".", f"the directory of {name}")
    return p


def json_safe(value: Any) -> Any:
    """JSON-safe copy: dataclasses via to_dict, non-finite floats as None, paths as strings."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return json_safe(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    return value


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` (dicts, lists, dataclasses, results with to_dict) as indented JSON."""
    p = check_output_file(path, "path")
    p.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return p
