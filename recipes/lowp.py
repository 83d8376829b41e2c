"""The compile step's real low-precision execution (``compile: {lowp: ...}``) for quantized models without TensorRT.

Without TensorRT, ModelOpt's Q/DQ layers only simulate the format. `torchopt.quantize.deployment` builds a model whose
Linear GEMMs really run in FP8 / INT8; this module decides when to use it:

- ``lowp: off``: the quantized model stays the fake-quant simulation (the accuracy, not the speed);
- ``lowp: <mode>`` (fp8, fp8_rowwise, int8, int8_weight_only): that mode, refused up front where the device
  cannot run it;
- ``lowp: auto`` (the default): on a GPU that runs at least one of the format's modes, each is built with the
  step's backend next to the fp16 build of the original model and timed against it in alternating rounds at every
  profile's opt shape. A mode is kept only when its whole speedup spread clears `AUTO_MIN_SPEEDUP` at every
  profile (the fastest such mode by median); otherwise the fp16 build is kept, and the report says why, with the
  figures. On a device without one (CPU, older GPUs) the fake-quant model stays, with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from torchopt.backends import Backend, BuildLog, BuildSettings
from torchopt.profile.comparison import LatencyComparison, compare_latency
from torchopt.quantize.deployment import DEPLOY_ATTR, LOWP_MODES, deploy, lowp_unsupported, weight_bytes
from torchopt.quantize.formats import FORMATS
from torchopt.quantize.quant_summary import quant_record
from torchopt.recipe import StepContext
from torchopt.runtime import Runtime

__all__ = ["AUTO_MIN_SPEEDUP", "LOWP_CHOICES", "LowpChoice", "apply_lowp", "check_lowp_request", "choose_mode"]

LOWP_CHOICES = ("auto", "off", *LOWP_MODES)
# A timed choice of the compile step (a low-precision mode over the fp16 build; on CPU, a compiled backend over
# eager) needs the whole spread of its speedup above this margin: 5 % is above the run-to-run noise of paired
# rounds on a quiet machine and below the gains worth the accuracy, the compile and the recompiles it costs.
AUTO_MIN_SPEEDUP = 1.05
AUTO_ROUNDS, AUTO_ITERS, AUTO_WARMUP = 8, 5, 3
COMPUTE_DTYPE = torch.float16
BASELINE = "fp16"


@dataclasses.dataclass
class LowpChoice:
    """The auto decision: the mode kept (None: fp16) and the sentence that says why, with the figures."""

    mode: str | None
    reason: str


def check_lowp_request(lowp: str, device: torch.device) -> None:
    """An explicitly requested mode must run on `device` (checked before calibration starts)."""
    if lowp in LOWP_MODES:
        why = lowp_unsupported(lowp, device)
        if why:
            raise ValueError(f"compile.lowp {lowp!r} cannot run here: {why}; use lowp: auto or off")


def choose_mode(comparisons: list[LatencyComparison], margin: float = AUTO_MIN_SPEEDUP) -> LowpChoice:
    """The mode whose speedup over `BASELINE` has its whole spread above `margin` at every profile (the best
    geometric-mean median among them), or None with the figures that ruled each mode out."""
    modes = [name for name in comparisons[0].speedups]
    figures = {m: "; ".join(f"profile {p}: {c.speedups[m]}" for p, c in enumerate(comparisons)) for m in modes}
    clear = [m for m in modes if all(c.speedups[m].low > margin for c in comparisons)]
    if not clear:
        return LowpChoice(
            None,
            f"fp16 kept: no low-precision mode clears {margin:.2f}x over the fp16 build at every profile"
            f" ({' | '.join(f'{m} {f}' for m, f in figures.items())})",
        )
    best = max(clear, key=lambda m: math.prod(c.speedups[m].median for c in comparisons))
    return LowpChoice(best, f"{best} measured faster than the fp16 build: {figures[best]}")


def _runtime(ctx: StepContext) -> Runtime:
    return dataclasses.replace(ctx.runtime, dtype=COMPUTE_DTYPE, quantized=False, calib_fingerprint=None)


def _report_float_layers(ctx: StepContext, model: torch.nn.Module, *, kept: bool) -> None:
    """Details and a note: which layers run the mode and which quantized ones it leaves in float, grouped."""
    record = getattr(model, DEPLOY_ATTR)
    ctx.details["lowp_layers"] = record.lowp_layers
    ctx.details["lowp_float_layers"] = record.float_layers
    ctx.details["lowp_weight_bytes"] = record.weight_bytes
    if not record.float_layers:
        return
    reasons: dict[str, list[str]] = {}
    for name, why in record.float_layers.items():
        reasons.setdefault(why.split(":")[0], []).append(name)
    listed = "; ".join(f"{len(names)} x {why}" for why, names in reasons.items())
    share = f"{len(record.lowp_layers)} layers run in {record.mode}, {len(record.float_layers)} quantized layers"
    ctx.note(
        f"lowp {record.mode}: {share} run in {record.dtype} instead ({listed}; see details lowp_float_layers)"
        if kept
        else f"lowp {record.mode} (not kept): {share} would run in {record.dtype} ({listed})"
    )


def _use(ctx: StepContext, model: torch.nn.Module, runners: list, mode: str | None, why: str) -> None:
    """Hand the chosen model on: it holds no ModelOpt quantizer any more and computes in fp16."""
    ctx.model, ctx.runners, ctx.quantized, ctx.calib_fingerprint, ctx.lowp = model, runners, False, None, mode
    ctx.dtype = COMPUTE_DTYPE
    if mode is None:
        ctx.set_precision("float16", f"auto: {why}")
    else:
        ctx.set_precision(mode, f"real {mode} GEMMs ({LOWP_MODES[mode].gemm}), {why}")
        _report_float_layers(ctx, model, kept=True)


def _build(backend: Backend, model, ctx: StepContext, settings: BuildSettings, log: BuildLog) -> list:
    return backend.build(model, ctx.profiles, _runtime(ctx), settings, log)


def _measure(ctx: StepContext, baseline: list, candidates: dict[str, list]) -> list[LatencyComparison]:
    comparisons = []
    for p, profile in enumerate(ctx.profiles):
        fns = {BASELINE: baseline[p], **{m: runners[p] for m, runners in candidates.items()}}
        with torch.no_grad():
            comparisons.append(
                compare_latency(
                    fns,
                    *_runtime(ctx).examples(profile, "opt"),
                    rounds=AUTO_ROUNDS,
                    iters=AUTO_ITERS,
                    warmup=AUTO_WARMUP,
                )
            )
    return comparisons


def apply_lowp(lowp: str, ctx: StepContext, backend: Backend, settings: BuildSettings) -> bool:
    """Run the quantized model in real low precision as `lowp` says; True when it set ``ctx.runners``."""
    if lowp == "off":
        return False
    fmt = quant_record(ctx.model).format
    modes = FORMATS[fmt].lowp_modes
    if lowp != "auto":  # the device was checked by the step's preflight (check_lowp_request)
        if lowp not in modes:
            raise ValueError(
                f"compile.lowp {lowp!r} does not apply to a model quantized to {fmt!r}; it takes"
                f" {', '.join(modes) or 'no low-precision mode (fake-quant only)'}, auto or off"
            )
        log = BuildLog(progress=ctx.progress)
        model = deploy(ctx.model, lowp, dtype=COMPUTE_DTYPE)
        _use(ctx, model, _build(backend, model, ctx, settings, log), lowp, "requested by the recipe")
        ctx.report.notes.extend(log.notes)
        return True
    why_not = {m: lowp_unsupported(m, ctx.device) for m in modes}
    runnable = [m for m in modes if why_not[m] is None]
    if not runnable:
        ctx.note(
            f"compile.lowp auto: {fmt} model kept as fake-quant: "
            + ("; ".join(why_not.values()) or f"format {fmt!r} has no real low-precision execution in torchopt")
        )
        return False
    return _auto(ctx, backend, settings, runnable)


@dataclasses.dataclass
class _Candidate:
    """One mode built for timing: the deployed model, its runners and its build's notes."""

    model: torch.nn.Module
    runners: list
    log: BuildLog


def _candidates(
    ctx: StepContext, backend: Backend, settings: BuildSettings, modes: list[str]
) -> tuple[dict[str, _Candidate], dict[str, str]]:
    """Each mode deployed and built; the modes no layer of the model can run, with the reason."""
    built, undeployable = {}, {}
    for mode in modes:
        try:
            model = deploy(ctx.model, mode, dtype=COMPUTE_DTYPE)
        except ValueError as exc:  # no layer of the model can run the mode (e.g. only convolutions)
            undeployable[mode] = str(exc)
            continue
        log = BuildLog(progress=ctx.progress)
        built[mode] = _Candidate(model, _build(backend, model, ctx, settings, log), log)
    return built, undeployable


def _keep(ctx: StepContext, candidate: _Candidate, mode: str | None, why: str) -> None:
    _use(ctx, candidate.model, candidate.runners, mode, why)
    ctx.report.notes.extend(candidate.log.notes)
    ctx.details.update(candidate.log.details)
    ctx.note(f"compile.lowp auto: {why}")


def _auto(ctx: StepContext, backend: Backend, settings: BuildSettings, modes: list[str]) -> bool:
    ctx.log(f"lowp auto: building fp16 and {', '.join(modes)} with {backend.name} to time them")
    fp16 = copy.deepcopy(ctx.reference).to(ctx.device, COMPUTE_DTYPE).eval()
    log = BuildLog(progress=ctx.progress)
    baseline = _Candidate(fp16, _build(backend, fp16, ctx, settings, log), log)
    built, undeployable = _candidates(ctx, backend, settings, modes)
    if not built:
        why = f"fp16 kept: {'; '.join(undeployable.values())}"
        ctx.details["lowp_auto"] = {"choice": BASELINE, "reason": why, "undeployable": undeployable}
        _keep(ctx, baseline, None, why)
        return True
    comparisons = _measure(ctx, baseline.runners, {m: c.runners for m, c in built.items()})
    choice = choose_mode(comparisons)
    ctx.details["lowp_auto"] = {
        "choice": choice.mode or BASELINE,
        "reason": choice.reason,
        "weight_bytes": {BASELINE: weight_bytes(fp16), **{m: weight_bytes(c.model) for m, c in built.items()}},
        "undeployable": undeployable,
        "profiles": [c.to_dict() for c in comparisons],
    }
    if choice.mode is None:
        _keep(ctx, baseline, None, choice.reason)
        _report_float_layers(ctx, next(iter(built.values())).model, kept=False)  # e.g. a CNN's convolutions
    else:
        _keep(ctx, built[choice.mode], choice.mode, choice.reason)
    return True
