"""Compilation backends and the `auto` choice: tensorrt, then inductor, then eager, with the reason."""

from __future__ import annotations

import torch

from torchopt.backends.base import Backend, BackendUnavailableError, BuildLog, BuildSettings
from torchopt.backends.eager import EagerBackend
from torchopt.backends.inductor import InductorBackend, InductorConfig
from torchopt.backends.tensorrt import TensorRTBackend, TensorRTConfig
from torchopt.config import check_choice

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "BuildLog",
    "BuildSettings",
    "InductorConfig",
    "TensorRTConfig",
    "choose_backend",
    "get_backend",
]

BACKENDS: dict[str, Backend] = {b.name: b for b in (EagerBackend(), InductorBackend(), TensorRTBackend())}
# Best first; a backend missing from BACKENDS (e.g. tensorrt before it is registered) is skipped.
AUTO_ORDER = ["tensorrt", "inductor", "eager"]


def get_backend(name: str) -> Backend:
    check_choice("backend", name, sorted(BACKENDS))
    return BACKENDS[name]


def choose_backend(name: str, device: torch.device) -> tuple[Backend, str]:
    """Resolve `name` ('auto' or a backend name) for `device`: (backend, why it was chosen)."""
    if name != "auto":
        backend = get_backend(name)
        why = backend.unavailable_reason(device)
        if why:
            raise BackendUnavailableError(f"backend {name!r} was requested but is unavailable on {device}: {why}")
        return backend, f"{name} requested by the recipe"
    skipped = []
    for cand in AUTO_ORDER:
        backend = BACKENDS.get(cand)
        if backend is None:
            continue
        why = backend.unavailable_reason(device)
        if why is None:
            reason = f"auto: {cand} is the best available on {device.type}"
            return backend, reason + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{cand} unavailable: {why}")
    raise BackendUnavailableError(f"no backend is available on {device}: {'; '.join(skipped)}")
