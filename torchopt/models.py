"""Models named on the command line: ``module:callable``, ``path/to/file.py:callable`` or a torchvision name.

torchvision models are built with random weights (``weights=None``): nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

import torch

from torchopt._compat import import_torchvision
from torchopt.config import check_type, closest
from torchopt.inputs import InputSpec

__all__ = [
    "DEMO_MODEL",
    "ModelLoadError",
    "call_target",
    "demo_inputs",
    "import_target",
    "load_model",
    "torchvision_names",
]

# The `torchopt demo` default: a real architecture with random weights.
DEMO_MODEL = "resnet50"


def torchvision_names() -> list[str]:
    return sorted(import_torchvision().models.list_models(module=import_torchvision().models))


class ModelLoadError(Exception):
    """A model (or data) file or module raised while it was imported or built: the message names the file, the
    line and the original error, which is kept as ``__cause__``."""


def _where(exc: BaseException, path: Path | None) -> str:
    """``file:line`` of the deepest traceback frame in `path` (or the deepest frame at all)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        frames = [f for f in frames if Path(f.filename).resolve() == path.resolve()] or frames
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _load_error(what: str, exc: BaseException, path: Path | None) -> ModelLoadError:
    detail = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    return ModelLoadError(f"{what} raised {type(exc).__name__} at {_where(exc, path)}: {detail}")


def import_target(module_part: str):
    """Import ``path/to/file.py`` or a dotted module name (the part of a ``module:callable`` spec before the
    colon). A missing file or module is a ValueError; an error raised while importing it, a `ModelLoadError`
    naming the file and line."""
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise ValueError(f"model file {module_part!r} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            if sys.modules.get(path.stem) is module:  # no half-imported module left behind
                del sys.modules[path.stem]
            raise _load_error(f"importing {module_part}", exc, path) from exc
        return module
    try:
        return importlib.import_module(module_part)
    except ImportError as exc:
        raise ValueError(f"model module {module_part!r} cannot be imported: {exc}") from None
    except Exception as exc:
        raise _load_error(f"importing {module_part}", exc, None) from exc


def call_target(spec: str):
    """The object a ``module:callable`` spec names, called when it is callable (an ``nn.Module`` is returned as
    is); errors raised by the call are a `ModelLoadError`."""
    module_part, _, attr = spec.rpartition(":")
    target = import_target(module_part)
    if not hasattr(target, attr):
        names = [n for n in dir(target) if not n.startswith("_")]
        raise ValueError(f"{module_part!r} has no attribute {attr!r}{closest(attr, names)}")
    obj = getattr(target, attr)
    if isinstance(obj, torch.nn.Module) or not callable(obj):
        return obj
    try:
        return obj()
    except Exception as exc:
        path = Path(module_part) if module_part.endswith(".py") else None
        raise _load_error(f"calling {spec}", exc, path) from exc


def load_model(spec: str) -> torch.nn.Module:
    """Build a model from a spec string (in eval mode).

    Example::

        load_model("resnet50")                    # torchvision architecture, random weights
        load_model("my_pkg.models:build_model")   # a callable returning an nn.Module (or an nn.Module)
        load_model("train.py:Net")                # a class or factory in a Python file
    """
    check_type("model", spec, str)
    if ":" in spec:
        model = call_target(spec)
    else:
        names = torchvision_names()
        if spec not in names:
            raise ValueError(
                f"model {spec!r} is neither 'module:callable' nor a torchvision model name{closest(spec, names)}"
            )
        model = import_torchvision().models.get_model(spec, weights=None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model {spec!r} must give a torch.nn.Module, got {type(model).__name__}")
    return model.eval()


def demo_inputs(batch: tuple[int, int, int] = (1, 8, 32), resolution: int = 224) -> list[InputSpec]:
    """Image-classifier inputs with a dynamic batch dim: min/opt/max = `batch`."""
    lo, opt, hi = batch
    shape = (3, resolution, resolution)
    return [InputSpec("x", min=(lo, *shape), opt=(opt, *shape), max=(hi, *shape))]
