"""The recipe engine: `optimize(model, recipe, inputs=...)` → `OptimizedModule`.

The user's module is never modified: the engine works on a deep copy, runs the recipe's steps on it in order
(each step's handler lives next to its config in `torchopt.recipes`), compiles one runner per input profile,
checks accuracy against the original, and measures the latency of both, together, once both exist.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from torchopt.accuracy import AccuracyMetrics, compare_outputs, flatten_outputs, is_classifier_output
from torchopt.config import check_type
from torchopt.environment import environment
from torchopt.inputs import (
    InputSpec,
    StructuredInputs,
    bind_call,
    check_signature,
    input_tree,
    is_structured,
    normalize_profiles,
    select_profile,
)
from torchopt.profile.comparison import compare_latency
from torchopt.quantize.calibrate import CalibData
from torchopt.recipe import Recipe, get_handler
from torchopt.report import OptimizeReport, StepRecord

__all__ = [
    "AccuracyError",
    "OptimizedModule",
    "StepContext",
    "check_profiles_run",
    "load",
    "measure_latency",
    "optimize",
    "resolve_recipe",
]


class AccuracyError(RuntimeError):
    """The optimized module misses the recipe's accuracy tolerances; `.report` holds the figures."""

    def __init__(self, message: str, report: OptimizeReport):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass
class StepContext:
    """State shared by the steps of one `optimize` call. Handlers mutate `model` (a private copy)."""

    model: torch.nn.Module
    profiles: list[list[InputSpec]]
    device: torch.device
    calib_data: Any
    report: OptimizeReport
    progress: bool = True
    dtype: torch.dtype = torch.float32
    quantized: bool = False
    cast_outputs: bool = True
    runners: list[Callable[..., Any]] | None = None
    validate_config: Any = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # the current step's report entries
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)  # what steps hand to later steps

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def log(self, text: str) -> None:
        if self.progress:
            print(f"[torchopt] {text}", file=sys.stderr, flush=True)

    def set_precision(self, name: str, why: str) -> None:
        from torchopt.recipes.cast import PRECISIONS  # noqa: PLC0415

        self.report.precision, self.report.precision_reason = name, why
        if name in PRECISIONS:
            self.dtype = PRECISIONS[name]

    def set_backend(self, name: str, why: str) -> None:
        self.report.backend, self.report.backend_reason = name, why

    def adapt(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs as the prepared module expects them: on its device, floats in its compute dtype."""
        return [a.to(self.device, self.dtype) if a.is_floating_point() else a.to(self.device) for a in args]

    def example_inputs(self, profile_index: int = 0, which: str = "opt", seed: int = 0) -> list[torch.Tensor]:
        """Seeded random inputs at a profile point, adapted to the prepared module."""
        specs = self.profiles[profile_index]
        return self.adapt([s.example(which, seed=seed + i) for i, s in enumerate(specs)])


def check_profiles_run(ctx) -> None:
    """Run the prepared module once at each profile's min shapes, so that a profile that does not fit the
    model (wrong rank, wrong static dim) fails with torchopt's message instead of inside a compiler, and a
    forward that returns no tensor (nothing to compile or compare) is refused."""
    for p, profile in enumerate(ctx.profiles):
        args = ctx.example_inputs(profile_index=p, which="min")
        try:
            with torch.no_grad():
                out = ctx.model(*args)
        except Exception as exc:  # any failure of the user's forward on these shapes
            shapes = {s.name: tuple(a.shape) for s, a in zip(profile, args, strict=True)}
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ValueError(
                f"the model fails on profile {p}'s min shapes {shapes} ({type(exc).__name__}: {first});"
                f" check that each InputSpec has the rank and static dims {type(ctx.model).__name__}.forward"
                " expects"
            ) from exc
        if not flatten_outputs(out):
            name = type(ctx.model.model if isinstance(ctx.model, StructuredInputs) else ctx.model).__name__
            returned = "None" if out is None else f"a {type(out).__name__} holding no tensor"
            raise ValueError(
                f"{name}.forward returned {returned} on profile {p}'s min shapes; torchopt compiles and checks"
                " models that return a tensor, or a tuple/list/dict of tensors (does forward miss a `return`?)"
            )


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
        from torchopt import recipes  # noqa: PLC0415

        return recipes.get(text)
    raise TypeError(
        f"recipe must be a Recipe, a built-in recipe name, a YAML path or a dict, got {type(recipe).__name__}"
    )


def _resolve_device(device: Any, model: torch.nn.Module) -> torch.device:
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    check_type("device", device, (str, torch.device), "a torch.device or a device string")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a valid device string ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return dev


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
        for spec, value in zip(profiles[0], inputs, strict=True):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"input {spec.name!r} must be a torch.Tensor, got {type(value).__name__}")
        chosen = select_profile(profiles, inputs)
        for spec, value in zip(profiles[chosen], inputs, strict=True):
            if value.is_floating_point() != spec.torch_dtype.is_floating_point:
                raise TypeError(f"input {spec.name!r} has dtype {value.dtype}, the spec expects {spec.dtype}")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"calib_data batch {index}: {exc}") from None
    return inputs


def _batches(calib: list[list[torch.Tensor]], profiles: list[list[InputSpec]], n: int) -> Iterable[list[torch.Tensor]]:
    """Validation batches: the (checked) calibration batches first, then random examples at the profile points."""
    yield from calib[:n]
    count = min(n, len(calib))
    points = ["opt", "max", "min"]
    for i, (p, which) in enumerate(itertools.product(range(len(profiles)), points)):
        if count >= n:
            return
        yield [s.example(which, seed=1000 + 17 * i + j) for j, s in enumerate(profiles[p])]
        count += 1


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
        ctx: StepContext,
    ):
        super().__init__()
        self.module = module
        self._runners = runners
        self.profiles = profiles
        self.recipe = recipe
        self.report = report
        self._device = ctx.device
        self._dtype = ctx.dtype
        self._quantized = ctx.quantized
        self._cast_outputs = ctx.cast_outputs and ctx.dtype != torch.float32
        self.training = False  # nn.Module.__init__ set True; the inner module is in eval mode already

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
        profile0 = self.profiles[0]
        for spec, value in zip(profile0, inputs, strict=True):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"input {spec.name!r} must be a torch.Tensor, got {type(value).__name__}")
            if value.device.type != self._device.type:
                raise ValueError(
                    f"input {spec.name!r} is on {value.device}, the optimized module runs on {self._device};"
                    f" move it with .to({str(self._device)!r})"
                )
        index = select_profile(self.profiles, inputs)
        for spec, value in zip(self.profiles[index], inputs, strict=True):
            if value.is_floating_point() != spec.torch_dtype.is_floating_point:
                raise TypeError(f"input {spec.name!r} has dtype {value.dtype}, the spec expects {spec.dtype}")
        inputs = [a.to(self._dtype) if a.is_floating_point() else a for a in inputs]
        # Runners were compiled under no_grad; calling them with grad enabled would change dynamo's global
        # state guard and recompile. The optimized module is for inference.
        with torch.no_grad():
            out = self._runners[index](*inputs)
        return _cast_floats(out, torch.float32) if self._cast_outputs else out

    def save(self, path: str | os.PathLike) -> Path:
        """Save the prepared module, the recipe and the profiles; `torchopt.load(path)` rebuilds it."""
        from torchopt import saving  # noqa: PLC0415

        return saving.save(self, path)


def _cast_floats(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(_cast_floats(o, dtype) for o in out)
    if isinstance(out, dict):
        return {k: _cast_floats(v, dtype) for k, v in out.items()}
    return out


def measure_latency(fn: Callable[..., Any], args: list[torch.Tensor], *, warmup: int, iters: int, max_iters: int):
    """`torchopt.profile.latency` of ``fn(*args)`` under no_grad, with the batch size from the first input.

    `max_iters` bounds the stability rule's extra sampling, which on a noisy CPU could otherwise run on.
    """
    from torchopt.profile import latency  # noqa: PLC0415

    with torch.no_grad():
        return latency(fn, *args, warmup=warmup, iters=iters, max_iters=max_iters, batch_size=args[0].shape[0])


def _measure_speedup(reference, optimized, args: list[torch.Tensor], cfg: Any, report: OptimizeReport) -> None:
    """Time the original and the optimized module together, in alternating rounds under the same conditions
    (same process, threads and load), and record both latencies and the speedup with its spread."""
    with torch.no_grad():
        cmp = compare_latency(
            {"original": reference, "optimized": optimized},
            *args,
            rounds=cfg.rounds,
            iters=cfg.iters,
            warmup=cfg.warmup,
            batch_size=args[0].shape[0] if args[0].dim() > 0 else None,
        )
    report.latency_before = cmp.results["original"].to_dict(samples=False)
    report.latency_after = cmp.results["optimized"].to_dict(samples=False)
    report.latency_speedup = cmp.speedups["optimized"].to_dict()


def _check_accuracy(reference, optimized, ctx: StepContext, cfg: Any) -> None:
    report = ctx.report
    metrics = []
    task = cfg.task
    with torch.no_grad():
        for batch in _batches(ctx.extras.get("calib_inputs", []), ctx.profiles, cfg.batches):
            ref_args = [a.to(ctx.device) for a in batch]
            ref_out = reference(*ref_args)
            if task == "auto":  # decided once, on the first batch, for all
                task = "classify" if is_classifier_output(ref_out, reference) else "embed"
            metrics.append(compare_outputs(ref_out, optimized.call_flat(*ref_args), task=task))
    merged = AccuracyMetrics.merge(metrics)
    precision = "quantized" if ctx.quantized else report.precision
    limits = cfg.limits(precision)
    report.accuracy, report.tolerances = {**merged.to_dict(), "task": task}, limits
    if cfg.task == "auto" and task == "embed" and "min_top1" in limits:
        report.notes.append(
            "validate.min_top1 not checked: the output is not a classifier's [batch, classes] logits (the model"
            " does not end in a Linear head); set validate.task: classify to check it"
        )
    failures = []
    if "max_abs" in limits and merged.max_abs > limits["max_abs"]:
        failures.append(f"max |Δ| {merged.max_abs:.4g} > {limits['max_abs']}")
    if merged.cosine < limits["min_cosine"]:
        failures.append(f"cosine {merged.cosine:.6f} < {limits['min_cosine']}")
    if merged.sqnr_db < limits["min_sqnr_db"]:
        failures.append(f"SQNR {merged.sqnr_db:.2f} dB < {limits['min_sqnr_db']} dB")
    if "min_top1" in limits and merged.top1_agreement is not None and merged.top1_agreement < limits["min_top1"]:
        failures.append(f"top-1 agreement {merged.top1_agreement:.4f} < {limits['min_top1']}")
    report.accuracy_passed = not failures
    if failures:
        raise AccuracyError(
            f"recipe {report.recipe!r} ({report.backend}, {report.precision}) misses its accuracy tolerances on"
            f" {merged.samples} samples: {'; '.join(failures)}. The original module is unchanged; loosen the"
            " recipe's `validate` step or keep sensitive layers in higher precision.",
            report,
        )


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
    dev = _resolve_device(device, model)
    check_type("progress", progress, bool)

    report = OptimizeReport(recipe=recipe.name, device=str(dev), environment=environment())
    report.profiles = [[s.to_dict() for s in p] for p in profiles]
    if model.training:
        report.notes.append("the model was in training mode; the optimized copy runs in eval mode")
    reference = copy.deepcopy(model).eval().to(dev)
    work = copy.deepcopy(model).eval().to(dev)
    if is_structured(profiles[0]):  # dict/list arguments: the steps and backends see flat tensor inputs
        reference, work = StructuredInputs(reference, profiles[0]), StructuredInputs(work, profiles[0])
    for p in work.parameters():
        p.requires_grad_(False)
    ctx = StepContext(
        model=work, profiles=profiles, device=dev, calib_data=calib_data, report=report, progress=progress
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    # Fail fast, before any timing or calibration: the profiles must run the model, and an explicitly
    # requested backend must be available.
    check_profiles_run(ctx)
    compile_cfg = recipe.step("compile")
    if compile_cfg is not None and compile_cfg.backend != "auto":
        from torchopt.backends import choose_backend  # noqa: PLC0415

        choose_backend(compile_cfg.backend, dev)
    validate_cfg = recipe.step("validate")
    if validate_cfg is None:
        from torchopt.recipes.validate import ValidateConfig  # noqa: PLC0415

        validate_cfg = ValidateConfig()
    quantize_cfg = recipe.step("quantize")
    limit = validate_cfg.batches if quantize_cfg is None else quantize_cfg.max_batches
    ctx.calib_data, ctx.extras["calib_inputs"] = _check_calib_data(
        calib_data, model, profiles, limit and max(limit, validate_cfg.batches), validate_cfg.batches
    )

    for i, step in enumerate(recipe.steps):
        ctx.log(f"step {i + 1}/{len(recipe.steps)}: {step.step}")
        ctx.details = {}
        t0 = time.perf_counter()
        get_handler(step)(step, ctx)
        report.steps.append(StepRecord(step.step, time.perf_counter() - t0, dict(ctx.details)))
    # Steps may replace the module (e.g. quantization returns a converted one): use what the context holds.
    runners = ctx.runners or [ctx.model for _ in profiles]
    optimized = OptimizedModule(ctx.model, runners, profiles, recipe, report, ctx)

    if validate_cfg.enabled:
        ctx.log("checking accuracy against the original module")
        _check_accuracy(reference, optimized, ctx, validate_cfg)
    # Without TensorRT, Q/DQ layers run as fake-quant: the latency says nothing about deployed int8/fp8 speed.
    report.fake_quant = ctx.quantized and report.backend != "tensorrt"
    if validate_cfg.measure_latency:
        ctx.log("measuring latency: original and optimized modules in alternating rounds")
        args = [s.example("opt", seed=i).to(dev) for i, s in enumerate(profiles[0])]
        _measure_speedup(reference, optimized.call_flat, args, validate_cfg, report)
    if dev.type == "cuda":
        report.peak_memory_bytes = int(torch.cuda.max_memory_allocated(dev))
    report.optimize_seconds = time.perf_counter() - t_start
    return optimized


def load(path: str | os.PathLike, *, device: torch.device | str | None = None) -> OptimizedModule:
    """Load what `OptimizedModule.save` wrote, rebuilding the compiled runners.

    Example::

        fast.save("resnet.torchopt")
        fast = torchopt.load("resnet.torchopt")
    """
    from torchopt import saving  # noqa: PLC0415

    return saving.load(path, device=device)
