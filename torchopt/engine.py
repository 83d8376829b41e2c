"""The recipe engine: `optimize(model, recipe, inputs=...)` → `OptimizedModule`.

The user's module is never modified: the engine works on a deep copy, runs the recipe's steps on it in order
(each step's handler lives next to its config in `torchopt.recipes`), compiles one runner per input profile,
checks accuracy against the original, and measures the latency of both, together, once both exist.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchopt import recipes, saving
from torchopt.accuracy import AccuracyError
from torchopt.config import check_type, resolve_device
from torchopt.environment import environment
from torchopt.inputs import (
    InputSpec,
    StructuredInputs,
    bind_call,
    check_call,
    check_signature,
    input_tree,
    is_structured,
    normalize_profiles,
)
from torchopt.quantize.calibrate import CalibData
from torchopt.recipe import Recipe, StepConfig, StepContext, get_handler
from torchopt.report import OptimizeReport, StepRecord
from torchopt.runtime import Dispatch, Runtime

__all__ = ["AccuracyError", "OptimizedModule", "load", "optimize", "resolve_recipe"]


def resolve_recipe(recipe: Recipe | str | os.PathLike | dict) -> Recipe:
    """A Recipe from a Recipe, a built-in name, a YAML path or a dict."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        text = os.fspath(recipe)
        if text.endswith((".yaml", ".yml")) or os.sep in text:
            return Recipe.from_yaml(text)
        return recipes.get(text)
    raise TypeError(
        f"recipe must be a Recipe, a built-in recipe name, a YAML path or a dict, got {type(recipe).__name__}"
    )


def _check_calib_data(
    calib_data: Any, model: torch.nn.Module, profiles: list[list[InputSpec]], limit: int | None, keep: int
) -> tuple[Any, list[list[torch.Tensor]]]:
    """Check `calib_data` before any step runs: its type, that it has batches, and that each of the first
    `limit` batches (None: all) fits the profiles. Returns the data the steps read (a generator read into a
    list; for dict/list inputs, each batch as its flat tensors) and the first `keep` batches as input lists.
    """
    if calib_data is None:
        return None, []
    data = CalibData(calib_data, max_batches=limit, num_inputs=len(input_tree(profiles[0])), name="calib_data")
    structured = is_structured(profiles[0])
    if data.is_callable:
        if structured:
            raise ValueError(
                "calib_data as a callable fn(model) is not supported when inputs sit inside dict or list"
                " arguments (dotted InputSpec names); pass the batches instead (a list or a DataLoader)"
            )
        return calib_data, []
    batches = []
    for i, batch in enumerate(data.batches()):
        inputs = _calib_inputs(data, batch, i, model, profiles)
        if structured or i < keep:
            batches.append(inputs)
    if not batches:
        raise ValueError(
            "calib_data is empty: it yielded no batch (an exhausted generator or an empty list?); pass input"
            " batches (a list, a DataLoader) or leave calib_data out"
        )
    return ([tuple(b) for b in batches] if structured else data.data), batches[:keep]


def _calib_inputs(
    data: CalibData, batch: Any, index: int, model: torch.nn.Module, profiles: list[list[InputSpec]]
) -> list[torch.Tensor]:
    """One calibration batch as the profile's input tensors; a clear error naming the batch when it does not fit."""
    roots = list(input_tree(profiles[0]))
    if len(roots) == 1 and isinstance(batch, Mapping) and isinstance(input_tree(profiles[0])[roots[0]], dict):
        args, kwargs = ((batch,), {}) if roots[0] not in batch else ((), dict(batch))  # the one dict argument
    else:
        args, kwargs = data.call_of(batch, index, model)
    kwargs = {k: v for k, v in kwargs.items() if k in roots}  # labels and other keys the inputs do not name
    try:
        inputs = bind_call(profiles[0], tuple(args), kwargs)
        check_call(profiles, inputs)  # any device: the data is moved to the model's
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"calib_data batch {index}: {exc}") from None
    return inputs


class OptimizedModule(torch.nn.Module):
    """The optimized model: a callable `nn.Module` with `.report`, `.recipe`, `.profiles` and `.save()`.

    Calls are checked against the input profiles before any backend sees them, dispatched to the runner of
    the matching profile, and floating inputs are cast to the compute precision (outputs back to float32
    when the recipe's cast step says so).

    It is an inference module: it reports eval mode (`.training` is False), `.eval()` / `.train(False)` are
    no-ops and `.train(True)` raises, so the prepared model inside never switches to training behaviour
    (BatchNorm batch statistics, dropout) and inference never updates its state.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        runners: list[Callable[..., Any]],
        profiles: list[list[InputSpec]],
        recipe: Recipe,
        report: OptimizeReport,
        runtime: Runtime,
    ):
        super().__init__()
        self.module = module
        self.profiles = profiles
        self.recipe = recipe
        self.report = report
        self.runtime = runtime
        self._dispatch = Dispatch(runners, profiles, runtime)
        self.training = False  # nn.Module.__init__ set True; the inner module is in eval mode already

    @property
    def runners(self) -> list[Callable[..., Any]]:
        """The compiled callables, one per profile (what a backend saves in its own format)."""
        return self._dispatch.runners

    def train(self, mode: bool = True) -> OptimizedModule:
        """`.train(False)` (what `.eval()` calls) is a no-op; `.train(True)` raises: this is inference only."""
        check_type("mode", mode, bool)
        if mode:
            raise RuntimeError(
                f"OptimizedModule (recipe {self.recipe.name!r}) is an inference module and cannot be put in"
                " training mode: its model was prepared for inference (compiled, cast or quantized). Train"
                " the original model and run torchopt.optimize again."
            )
        return self

    def extra_repr(self) -> str:
        return f"recipe={self.recipe.name!r}, backend={self.report.backend!r}, precision={self.report.precision!r}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.call_flat(*bind_call(self.profiles[0], args, kwargs))

    def call_flat(self, *inputs: Any) -> Any:
        """Run the profile's input tensors given flat, in the profile's order (dict/list arguments flattened)."""
        return self._dispatch(*inputs)

    def save(self, path: str | os.PathLike, format: str = "directory") -> Path:
        """Save the prepared module, the recipe and the profiles as a directory; `torchopt.load(path)` rebuilds it.

        format: what to add for deployment (`torchopt.saving.SAVE_FORMATS`): "directory" nothing; "aoti" an
            AOTInductor package (`aoti.pt2`, loadable from C++ without Python); "tensorrt" one serialized TensorRT
            engine per profile (needs Torch-TensorRT and CUDA). `torchopt.load` checks inputs against the
            profiles; a bare `torch._inductor.aoti_load_package` or C++ `AOTIModelPackageLoader` does not check the
            export's dim bounds (batch 65 runs on a package exported for at most 64).
        """
        return saving.save(self, path, format=format)


def optimize(
    model: torch.nn.Module,
    recipe: Recipe | str | os.PathLike | dict = "default",
    *,
    inputs: Any,
    calib_data: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> OptimizedModule:
    """Apply a recipe to a copy of `model` and return the optimized, validated module.

    Args:
        model: the trained module (left unchanged).
        recipe: a `Recipe`, a built-in name (`torchopt.recipes.available()`), a YAML path or a dict.
        inputs: the forward's inputs as `InputSpec`s (one profile), or a list of profiles.
        calib_data: batches for calibration and validation (an iterable of tensors/tuples/dicts).
        device: where to optimize and run; default CUDA when available, else CPU.
        progress: print progress of long steps to stderr.

    Example::

        spec = torchopt.InputSpec("x", min=(1, 3, 224, 224), opt=(8, 3, 224, 224), max=(32, 3, 224, 224))
        fast = torchopt.optimize(model, "default", inputs=[spec])
        print(fast.report)
        y = fast(x)
    """
    t_start = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    recipe = resolve_recipe(recipe)
    profiles = normalize_profiles(inputs)
    check_signature(model, profiles[0])
    dev = resolve_device("device", device)
    check_type("progress", progress, bool)

    report = OptimizeReport(recipe=recipe.name, device=str(dev), environment=environment(dev))
    report.profiles = [[s.to_dict() for s in p] for p in profiles]
    if model.training:
        report.notes.append("the model was in training mode; the optimized copy runs in eval mode")
    reference = copy.deepcopy(model).eval().to(dev)
    work = copy.deepcopy(model).eval().to(dev)
    if is_structured(profiles[0]):  # dict/list arguments: the steps and backends see flat tensor inputs
        reference, work = StructuredInputs(reference, profiles[0]), StructuredInputs(work, profiles[0])
    for p in work.parameters():
        p.requires_grad_(False)
    ctx = StepContext(model=work, reference=reference, profiles=profiles, device=dev, report=report, progress=progress)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    # Fail fast, before any timing or calibration: the profiles must run the model, every step must be able
    # to run here, and the calibration batches the steps will read must fit the profiles.
    plan = recipe.plan()
    ctx.check_profiles_run()
    for step in plan:
        step.preflight(ctx)
    ctx.calib_data, ctx.calib_inputs = _check_calib_data(calib_data, model, profiles, *_calib_reads(plan))

    for i, step in enumerate(plan):
        ctx.log(f"step {i + 1}/{len(plan)}: {step.step}")
        ctx.details = {}
        t0 = time.perf_counter()
        get_handler(step)(step, ctx)
        report.steps.append(StepRecord(step.step, time.perf_counter() - t0, dict(ctx.details)))
    # Steps may replace the module (e.g. quantization returns a converted one): use what the context holds.
    runners = ctx.runners or [ctx.model for _ in profiles]
    if dev.type == "cuda":
        report.peak_memory_bytes = int(torch.cuda.max_memory_allocated(dev))
    report.optimize_seconds = time.perf_counter() - t_start
    return OptimizedModule(ctx.model, runners, profiles, recipe, report, ctx.runtime)


def _calib_reads(plan: list[StepConfig]) -> tuple[int | None, int]:
    """How many calibration batches to check up front (None: all) and how many to keep as checked inputs
    (the most any step that reads a bounded number needs)."""
    counts = [step.calib_batches() for step in plan]
    bounded = [c for c in counts if c is not None]
    keep = max(bounded, default=0)
    return (None if None in counts else keep), keep


def load(path: str | os.PathLike, *, device: torch.device | str | None = None) -> OptimizedModule:
    """Load what `OptimizedModule.save` wrote, rebuilding the compiled runners.

    Example::

        fast.save("resnet.torchopt")
        fast = torchopt.load("resnet.torchopt")
    """
    loaded = saving.load(path, device=device)
    return OptimizedModule(loaded.module, loaded.runners, loaded.profiles, loaded.recipe, loaded.report, loaded.runtime)
