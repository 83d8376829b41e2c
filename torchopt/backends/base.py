"""The backend interface: turn a prepared eager module into one callable per shape profile."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from torchopt.engine import OptimizedModule, StepContext
    from torchopt.recipes.compile import CompileConfig

__all__ = ["Backend", "BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run here (missing package, library or device); the message says why and how
    to install it. A RuntimeError, as before it had its own type."""


class Backend:
    """A compilation backend. Subclasses register themselves in `torchopt.backends.BACKENDS`."""

    name: ClassVar[str] = ""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when the backend can run on `device`, else a sentence saying what is missing."""
        return None

    def build(self, model: torch.nn.Module, config: CompileConfig, ctx: StepContext) -> list[Callable[..., Any]]:
        """One runner per profile in ``ctx.profiles``; each takes the inputs positionally."""
        raise NotImplementedError

    def save(self, optimized: OptimizedModule, path: Path) -> dict[str, Any] | None:
        """Write the compiled runners in the backend's own format under `path` and return what `load` needs
        (JSON-friendly, stored in meta.json); None when the backend has no own format (loading then runs
        the recipe's compile step again)."""
        return None

    def load(self, path: Path, meta: dict[str, Any], ctx: StepContext) -> list[Callable[..., Any]] | None:
        """Runners rebuilt from what `save` wrote (`meta` is its return value), one per profile."""
        return None
