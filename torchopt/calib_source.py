"""Calibration data named on the command line (`torchopt optimize ... --calib SOURCE`).

A SOURCE is one of:

- a folder of images (.jpg/.jpeg/.png/.bmp/.webp): read with PIL, converted to RGB (or L for one channel),
  resized to the input's opt height x width, scaled to [0, 1]; for one 4-D (N, C, H, W) float input;
- a ``.pt`` file (``torch.save`` of a tensor) or a ``.npy`` file: a tensor of samples, dim 0 the sample;
  for one input, each sample's shape within the input's range;
- ``module:callable`` or ``path/to/file.py:callable``: returns an iterable of batches, used as given (the
  same as ``calib_data=`` in `torchopt.optimize`, which validates it).

Files are cut into batches of the input's opt batch size (dim 0), the last one shorter. Nothing here
checks more than the files can hold: batch contents are checked by `torchopt.optimize` like any calib_data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from torchopt.inputs import InputSpec
from torchopt.models import call_target

__all__ = ["IMAGE_SUFFIXES", "load_calib_data"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_calib_data(source: str, specs: list[InputSpec]) -> Any:
    """Calibration batches from `source` (see the module docstring) for the model inputs `specs`.

    Example::

        batches = load_calib_data("calib.pt", [InputSpec("x", min=(1, 3, 64, 64), opt=(8, 3, 64, 64),
                                                          max=(32, 3, 64, 64))])   # list of (8, 3, 64, 64)
    """
    if ":" in source and not Path(source).exists():
        return call_target(source)
    path = Path(source)
    if not path.exists():
        raise ValueError(
            f"--calib {source!r} does not exist; expected a folder of images, a .pt/.npy file of samples or"
            " module:callable"
        )
    if path.is_dir():
        samples = _read_images(path, _single_spec(source, specs, "a folder of images"))
    elif path.suffix in (".pt", ".pth"):
        samples = _read_tensor_file(path, lambda: torch.load(path, map_location="cpu", weights_only=True))
    elif path.suffix == ".npy":
        samples = _read_tensor_file(path, lambda: _load_npy(path))
    else:
        raise ValueError(
            f"--calib {source!r} has the unsupported suffix {path.suffix!r}; expected a folder of images, a .pt"
            " or .npy file, or module:callable"
        )
    spec = _single_spec(source, specs, f"a {path.suffix} file")
    return _batches(_checked(source, samples, spec), spec.opt[0])


def _single_spec(source: str, specs: list[InputSpec], kind: str) -> InputSpec:
    if len(specs) != 1:
        names = [s.name for s in specs]
        raise ValueError(
            f"--calib {source!r}: {kind} feeds one input, the model has {len(specs)} ({names}); give a"
            " module:callable that returns the batches"
        )
    return specs[0]


def _load_npy(path: Path) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.load(path, allow_pickle=False))


def _read_tensor_file(path: Path, load) -> torch.Tensor:
    try:
        data = load()
    except Exception as exc:  # a corrupt or foreign file: torch and numpy raise many types
        raise ValueError(f"--calib {str(path)!r} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"--calib {str(path)!r} must hold one tensor of samples, got {type(data).__name__}")
    return data


def _read_images(folder: Path, spec: InputSpec) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--calib {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if spec.rank != 4 or spec.opt[1] not in (1, 3) or not spec.torch_dtype.is_floating_point:
        raise ValueError(
            f"--calib {str(folder)!r}: images feed a float (N, C, H, W) input with C = 1 or 3; input"
            f" {spec.name!r} is {spec.dtype} with opt shape {spec.opt}"
        )
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"--calib with a folder of images needs Pillow: `pip install pillow` ({exc})") from exc
    import numpy as np

    mode = "RGB" if spec.opt[1] == 3 else "L"
    height, width = spec.opt[2], spec.opt[3]
    images = []
    for file in files:
        try:
            with Image.open(file) as img:
                pixels = np.asarray(img.convert(mode).resize((width, height), Image.Resampling.BILINEAR))
        except OSError as exc:
            raise ValueError(f"--calib image {str(file)!r} cannot be read: {exc}") from exc
        images.append(torch.from_numpy(pixels.copy()).reshape(height, width, -1).permute(2, 0, 1))
    return torch.stack(images).to(spec.torch_dtype) / 255.0


def _checked(source: str, samples: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Samples whose shape (after dim 0) fits the spec's range, cast to the spec's float dtype."""
    got = tuple(samples.shape[1:])
    lo, hi = spec.min[1:], spec.max[1:]
    fits = samples.dim() == spec.rank and all(a <= s <= b for s, a, b in zip(got, lo, hi, strict=True))
    if not fits or samples.shape[0] == 0:
        expected = f"shape {lo}" if lo == hi else f"a shape within {lo}..{hi}"
        raise ValueError(
            f"--calib {source!r}: samples of shape {got} (tensor {tuple(samples.shape)}, dim 0 = samples) do not"
            f" fit input {spec.name!r}, which expects each sample to have {expected}"
        )
    if samples.dtype.is_floating_point != spec.torch_dtype.is_floating_point:
        raise TypeError(f"--calib {source!r}: samples are {samples.dtype}, input {spec.name!r} is {spec.dtype}")
    return samples.to(spec.torch_dtype)


def _batches(samples: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return list(torch.split(samples, batch))
