"""Models named on the command line: ``module:callable``, ``path/to/file.py:callable`` or a torchvision name.

torchvision models are built with random weights (``weights=None``): nothing is downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from torchopt._compat import import_torchvision
from torchopt.config import check_type, closest
from torchopt.inputs import InputSpec

__all__ = ["DEMO_MODEL", "demo_inputs", "load_model", "torchvision_names"]

# The `torchopt demo` default: a real architecture with random weights.
DEMO_MODEL = "resnet50"


def torchvision_names() -> list[str]:
    return sorted(import_torchvision().models.list_models(module=import_torchvision().models))


def _import_target(module_part: str):
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise ValueError(f"model file {module_part!r} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(module_part)
    except ImportError as exc:
        raise ValueError(f"model module {module_part!r} cannot be imported: {exc}") from None


def load_model(spec: str) -> torch.nn.Module:
    """Build a model from a spec string (in eval mode).

    Example::

        load_model("resnet50")                    # torchvision architecture, random weights
        load_model("my_pkg.models:build_model")   # a callable returning an nn.Module (or an nn.Module)
        load_model("train.py:Net")                # a class or factory in a Python file
    """
    check_type("model", spec, str)
    if ":" in spec:
        module_part, _, attr = spec.rpartition(":")
        target = _import_target(module_part)
        if not hasattr(target, attr):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise ValueError(f"{module_part!r} has no attribute {attr!r}{closest(attr, names)}")
        obj = getattr(target, attr)
        model = obj if isinstance(obj, torch.nn.Module) else obj() if callable(obj) else obj
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
