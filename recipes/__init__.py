"""Recipe steps (one file each: config dataclass + private handler) and the built-in named recipes.

Built-in recipes are YAML files in `recipes/builtin/`; `available()` lists them and `get(name)` loads one.
"""

from __future__ import annotations

from pathlib import Path

from torchopt.config import check_type, closest
from torchopt.recipe import Recipe
from torchopt.recipes.auto_batch import AutoBatchConfig
from torchopt.recipes.cast import CastConfig
from torchopt.recipes.compile import CompileConfig
from torchopt.recipes.quantize import QuantizeConfig
from torchopt.recipes.validate import ValidateConfig

__all__ = ["AutoBatchConfig", "CastConfig", "CompileConfig", "QuantizeConfig", "ValidateConfig", "available", "get"]

_BUILTIN_DIR = Path(__file__).parent / "builtin"


def available() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in _BUILTIN_DIR.glob("*.yaml"))


def get(name: str) -> Recipe:
    """A built-in recipe by name (see `available()`).

    Example::

        recipe = torchopt.recipes.get("default")
    """
    check_type("recipe name", name, str)
    names = available()
    if name not in names:
        raise ValueError(f"unknown recipe {name!r}{closest(name, names)}; available recipes: {', '.join(names)}")
    return Recipe.from_yaml(_BUILTIN_DIR / f"{name}.yaml")
