"""`Recipe`: an ordered list of steps, each a config dataclass registered under a step name.

Step configs and their private handlers live in `torchopt.recipes` (one file per step); this module keeps the
registry, the `StepContext` the handlers share and the (de)serialization, and knows no step by name. A recipe
dict / YAML file looks like::

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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchopt.accuracy import flatten_outputs
from torchopt.config import DTYPES, ConfigBase, StepConfig, check_type, closest, error_line
from torchopt.inputs import InputSpec, StructuredInputs
from torchopt.report import OptimizeReport
from torchopt.runtime import Dispatch, Runtime

__all__ = ["Recipe", "StepConfig", "StepContext", "get_handler", "register_step", "step_names"]


@dataclasses.dataclass
class StepContext:
    """State shared by the steps of one `optimize` call, with a typed field for each hand-off between steps.

    Handlers change `model` (a private copy; a step may replace it) and the fields below; the engine builds
    the optimized module from what the context holds after the last step.
    """

    model: torch.nn.Module
    reference: torch.nn.Module  # the untouched copy every check compares against
    profiles: list[list[InputSpec]]
    device: torch.device
    report: OptimizeReport
    calib_data: Any = None  # what the quantize step calibrates on (checked up front by the engine)
    calib_inputs: list[list[torch.Tensor]] = dataclasses.field(default_factory=list)  # checked batches, flat
    progress: bool = True
    dtype: torch.dtype = torch.float32
    quantized: bool = False
    calib_fingerprint: str | None = None  # set by quantize; keys the TensorRT engine cache
    lowp: str | None = None  # set by compile when the quantized layers run real low-precision GEMMs (the mode)
    cast_outputs: bool = True
    runners: list[Callable[..., Any]] | None = None  # set by compile: one per profile
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # the current step's report entries

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def log(self, text: str) -> None:
        if self.progress:
            print(f"[torchopt] {text}", file=sys.stderr, flush=True)

    def set_precision(self, name: str, why: str) -> None:
        self.report.precision, self.report.precision_reason = name, why
        if name in DTYPES:
            self.dtype = DTYPES[name]

    def set_backend(self, name: str, why: str) -> None:
        self.report.backend, self.report.backend_reason = name, why

    @property
    def runtime(self) -> Runtime:
        return Runtime(
            device=self.device,
            dtype=self.dtype,
            quantized=self.quantized,
            cast_outputs=self.cast_outputs,
            calib_fingerprint=self.calib_fingerprint,
            lowp=self.lowp,
        )

    def example_inputs(self, profile_index: int = 0, which: str = "opt", seed: int = 0) -> list[torch.Tensor]:
        """Seeded random inputs at a profile point, adapted to the prepared module."""
        return self.runtime.examples(self.profiles[profile_index], which, seed)

    def dispatch(self) -> Dispatch:
        """The optimized call as the user will make it: the compiled runners (the prepared model before
        `compile`) behind the profile checks and casts."""
        return Dispatch(self.runners or [self.model for _ in self.profiles], self.profiles, self.runtime)

    def check_profiles_run(self) -> None:
        """Run the prepared module once at each profile's min shapes, so that a profile that does not fit the
        model (wrong rank, wrong static dim) fails with torchopt's message instead of inside a compiler, and a
        forward that returns no tensor (nothing to compile or compare) is refused."""
        for p, profile in enumerate(self.profiles):
            args = self.example_inputs(profile_index=p, which="min")
            try:
                with torch.no_grad():
                    out = self.model(*args)
            except Exception as exc:  # any failure of the user's forward on these shapes
                shapes = {s.name: tuple(a.shape) for s, a in zip(profile, args, strict=True)}
                raise ValueError(
                    f"the model fails on profile {p}'s min shapes {shapes} ({error_line(exc)});"
                    f" check that each InputSpec has the rank and static dims {type(self.model).__name__}.forward"
                    " expects"
                ) from exc
            if not flatten_outputs(out):
                model = self.model.model if isinstance(self.model, StructuredInputs) else self.model
                returned = "None" if out is None else f"a {type(out).__name__} holding no tensor"
                raise ValueError(
                    f"{type(model).__name__}.forward returned {returned} on profile {p}'s min shapes; torchopt"
                    " compiles and checks models that return a tensor, or a tuple/list/dict of tensors (does"
                    " forward miss a `return`?)"
                )


Handler = Callable[[Any, StepContext], None]
_STEPS: dict[str, type[StepConfig]] = {}
_HANDLERS: dict[type[StepConfig], Handler] = {}
_IMPLICIT: list[type[StepConfig]] = []  # steps that run with their defaults when a recipe omits them


def register_step(name: str, handler: Handler, *, implicit: bool = False):
    """Class decorator: register a step config under `name` with its handler ``handler(config, ctx)``.

    An `implicit` step runs last, with its default options, in every recipe that does not list it.
    """

    def wrap(cls: type[StepConfig]) -> type[StepConfig]:
        if name in _STEPS and _STEPS[name] is not cls:
            raise ValueError(f"recipe step {name!r} is already registered by {_STEPS[name].__name__}")
        cls.step = name
        _STEPS[name] = cls
        _HANDLERS[cls] = handler
        if implicit:
            _IMPLICIT.append(cls)
        return cls

    return wrap


def step_names() -> list[str]:
    return sorted(_STEPS)


def get_handler(config: StepConfig) -> Handler:
    return _HANDLERS[type(config)]


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

    def plan(self) -> list[StepConfig]:
        """The steps that run: the recipe's own, then each implicit step it omits, with its defaults."""
        listed = {type(s) for s in self.steps}
        return [*self.steps, *(cls() for cls in _IMPLICIT if cls not in listed)]

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
        import yaml  # noqa: PLC0415  (third-party, only when a YAML file is read)

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
