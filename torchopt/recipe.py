"""`Recipe`: an ordered list of steps, each a config dataclass registered under a step name.

Step configs and their private handlers live in `torchopt.recipes` (one file per step); this module only
keeps the registry and the (de)serialization. A recipe dict / YAML file looks like::

    name: fp16-inductor
    description: cast to fp16 and compile with Inductor
    steps:
      - cast: {dtype: float16}
      - compile: {backend: inductor}
      - validate: {min_cosine: 0.999}
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchopt.config import ConfigBase, StepConfig, check_type, closest

if TYPE_CHECKING:
    from torchopt.engine import StepContext

__all__ = ["Recipe", "StepConfig", "get_handler", "register_step", "step_names"]


_STEPS: dict[str, type[StepConfig]] = {}
_HANDLERS: dict[type[StepConfig], Callable[[Any, StepContext], None]] = {}


def register_step(name: str, handler: Callable[[Any, StepContext], None]):
    """Class decorator: register a step config under `name` with its handler ``handler(config, ctx)``."""

    def wrap(cls: type[StepConfig]) -> type[StepConfig]:
        if name in _STEPS and _STEPS[name] is not cls:
            raise ValueError(f"recipe step {name!r} is already registered by {_STEPS[name].__name__}")
        cls.step = name
        _STEPS[name] = cls
        _HANDLERS[cls] = handler
        return cls

    return wrap


def step_names() -> list[str]:
    _load_builtin_steps()
    return sorted(_STEPS)


def get_handler(config: StepConfig) -> Callable[[Any, StepContext], None]:
    return _HANDLERS[type(config)]


def _load_builtin_steps() -> None:
    import torchopt.recipes  # noqa: F401, PLC0415  (registers the built-in steps)


@dataclasses.dataclass
class Recipe(ConfigBase):
    """An ordered list of optimization steps with a name and a description.

    Example::

        recipe = torchopt.Recipe([CastConfig(dtype="float16"), CompileConfig(backend="inductor")])
        recipe = torchopt.Recipe.from_yaml("my_recipe.yaml")
        recipe = torchopt.recipes.get("default")
    """

    steps: list[StepConfig] = dataclasses.field(default_factory=list)
    name: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        check_type("Recipe.steps", self.steps, (list, tuple), "a list of step configs")
        self.steps = list(self.steps)
        for i, s in enumerate(self.steps):
            if not isinstance(s, StepConfig):
                raise TypeError(f"Recipe.steps[{i}] must be a step config (e.g. CompileConfig), got {s!r}")
        check_type("Recipe.name", self.name, str)
        check_type("Recipe.description", self.description, str)
        kinds = [s.step for s in self.steps]
        for kind in ("compile", "validate"):
            if kinds.count(kind) > 1:
                raise ValueError(f"Recipe {self.name!r} has {kinds.count(kind)} {kind!r} steps; at most one is allowed")
        if "compile" in kinds:
            after = [k for k in kinds[kinds.index("compile") + 1 :] if k != "validate"]
            if after:
                raise ValueError(
                    f"Recipe {self.name!r}: steps {after} come after 'compile'; only 'validate' may follow it"
                )

    def step(self, kind: str) -> StepConfig | None:
        """The first step of the given kind, or None."""
        return next((s for s in self.steps if s.step == kind), None)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "steps": [{s.step: s.to_dict()} for s in self.steps],
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str | None = None) -> Recipe:
        _load_builtin_steps()
        where = where or "recipe"
        if isinstance(data, Recipe):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be a mapping with 'steps', got {type(data).__name__}")
        valid = ["name", "description", "steps"]
        for key in data:
            if key not in valid:
                raise ValueError(f"unknown key {key!r} in {where}{closest(str(key), valid)}; valid keys: {valid}")
        raw_steps = data.get("steps") or []
        check_type(f"{where}.steps", raw_steps, list, "a list of {step_name: {options}} mappings")
        steps = []
        for i, entry in enumerate(raw_steps):
            here = f"{where}.steps[{i}]"
            if isinstance(entry, str):
                entry = {entry: {}}
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"{here} must be a single {{step_name: {{options}}}} mapping, got {entry!r}")
            (kind, options), *_ = entry.items()
            if kind not in _STEPS:
                raise ValueError(
                    f"unknown step {kind!r} at {here}{closest(str(kind), _STEPS)}; valid steps: {sorted(_STEPS)}"
                )
            steps.append(_STEPS[kind].from_dict(options or {}, where=f"{here}.{kind}"))
        return cls(steps=steps, name=data.get("name", "custom"), description=data.get("description", ""))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Recipe:
        """Load a recipe from a YAML file; malformed YAML is a ValueError naming the file and line."""
        import yaml  # noqa: PLC0415

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"recipe file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ValueError(f"malformed YAML in recipe file {str(path)!r}{line}: {problem}") from None
        data = data or {}
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        return cls.from_dict(data, where=f"recipe file {path.name}")

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        import yaml  # noqa: PLC0415

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text
