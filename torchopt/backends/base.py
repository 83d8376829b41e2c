"""The backend interface: turn a prepared eager module into one callable per shape profile.

A backend builds from ``(model, profiles, runtime, settings, log)``: the prepared module, its input profiles, the
`Runtime` record (device, compute dtype, quantized), the backend's own config (`config_class`, None when it has
none) with the shared compile options, and a `BuildLog` that collects what the build wants in the report. It
knows nothing of recipes or the engine.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from torchopt.config import ConfigBase
from torchopt.inputs import InputSpec
from torchopt.runtime import Runtime

__all__ = ["Backend", "BackendUnavailableError", "BuildLog", "BuildSettings"]


class BackendUnavailableError(RuntimeError):
    """A backend was asked for where it cannot run (a missing package or device); the message says what is
    missing and how to install it."""


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """What the compile step asks of a backend: its own config and the options every backend shares.

    config: an instance of the backend's `config_class` (None for a backend without options).
    cuda_graphs: None = the backend's default, else on/off as the recipe says.
    """

    config: ConfigBase | None = None
    cuda_graphs: bool | None = None


@dataclasses.dataclass
class BuildLog:
    """What a build reports: notes for the report, the step's details, a precision it changed, progress."""

    progress: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    precision: tuple[str, str] | None = None  # (name, why) when the build lowers precision itself

    def note(self, text: str) -> None:
        self.notes.append(text)

    def log(self, text: str) -> None:
        if self.progress:
            print(f"[torchopt] {text}", file=sys.stderr, flush=True)


class Backend:
    """A compilation backend. Subclasses register themselves in `torchopt.backends.BACKENDS`.

    `config_class` is the backend's own options (a ConfigBase); the compile step offers it under the backend's
    name (``compile: {inductor: {...}}``).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[ConfigBase] | None] = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on `device`, else a sentence saying what is missing."""
        return None

    def build(
        self,
        model: torch.nn.Module,
        profiles: list[list[InputSpec]],
        runtime: Runtime,
        settings: BuildSettings,
        log: BuildLog,
    ) -> list[Callable[..., Any]]:
        """One runner per profile; each takes the inputs positionally."""
        raise NotImplementedError

    def save(self, runners: list[Callable[..., Any]], path: Path) -> dict[str, Any] | None:
        """Write the compiled runners in the backend's own format under `path` and return what `load` needs
        (JSON-friendly, stored in meta.json); None when the backend has no own format (loading then builds
        again with the saved settings)."""
        return None

    def load(
        self, path: Path, meta: dict[str, Any], profiles: list[list[InputSpec]], runtime: Runtime, log: BuildLog
    ) -> list[Callable[..., Any]] | None:
        """Runners rebuilt from what `save` wrote (`meta` is its return value), one per profile."""
        return None
