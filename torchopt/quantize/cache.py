"""Calibration cache: the calibrated state saved with ModelOpt's ``mto.save`` and restored with ``mto.restore``.

An entry is keyed by a hash of the model (class, architecture repr, every state-dict tensor), the options that
change the result (format, method, keep rules, percentile, ...), the calibration data fingerprint (every input
tensor calibration fed) and the ModelOpt version, so a rebuild with the same model, options and data skips
calibration and gives bit-identical outputs; anything else misses. Files: ``<key>.pth`` (ModelOpt checkpoint)
and ``<key>.json`` (what the key was made of, for people).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization
from torchopt.config import error_line
from torchopt.quantize.calibrate import model_device

__all__ = ["CalibrationCache", "cache_key", "model_fingerprint"]

# Options that do not change the calibrated state.
_NOT_IN_KEY = ("cache_dir", "budget")


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's class, architecture (its repr) and every state-dict tensor (name, shape, dtype, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_fp: str, options: dict[str, Any], calib_fp: str) -> tuple[str, dict[str, Any]]:
    """(key, what it is made of): the key is a hash of the model, the options, the data and ModelOpt's version."""
    parts = {
        "model": model_fp,
        "options": {k: v for k, v in options.items() if k not in _NOT_IN_KEY},
        "calib_data": calib_fp,
        "modelopt": _modelopt_version(),
        "torch": torch.__version__.split("+")[0],
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest(), parts


def _modelopt_version() -> str:
    try:
        return importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _mto() -> Any:
    """``modelopt.torch.opt`` (after the clear-error import of ModelOpt's quantization package)."""
    import_modelopt_quantization()
    import modelopt.torch.opt as mto  # noqa: PLC0415

    return mto


class CalibrationCache:
    """A directory of calibrated ModelOpt states.

    Example::

        cache = CalibrationCache("~/.cache/torchopt/quant")
        if cache.has(key):
            model = cache.restore(model, key)
        else:
            ...  # quantize and calibrate
            cache.save(model, key, parts)
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cache_dir {str(directory)!r} cannot be created: {exc}") from None
        if not os.access(self.directory, os.W_OK):
            raise ValueError(f"cache_dir {str(directory)!r} is not writable")

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pth"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def restore(self, model: torch.nn.Module, key: str) -> torch.nn.Module:
        """Restore the calibrated state onto the (unquantized) model; returns the module to use."""
        path = self.path(key)
        device = model_device(model)
        try:
            restored = _mto().restore(model, str(path))
        except Exception as exc:  # a truncated or foreign file: say which one, so it can be deleted
            raise RuntimeError(
                f"calibration cache entry {str(path)!r} cannot be restored ({error_line(exc)});"
                " delete it to recalibrate"
            ) from exc
        return restored.to(device)  # mto.restore loads tensors on the CPU

    def save(self, model: torch.nn.Module, key: str, parts: dict[str, Any]) -> Path:
        """Save atomically (write to a temporary file, then rename) so readers never see half a file."""
        path = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            _mto().save(model, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        meta = {**parts, "saved": time.strftime("%Y-%m-%d %H:%M:%S")}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
        return path
