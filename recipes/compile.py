"""Recipe step `compile`: hand the prepared module to a backend (auto, or one of `torchopt.backends.BACKENDS`).

`CompileConfig` has the options every backend shares (`backend`, `cuda_graphs`) and one field per registered
backend that declares a config class, named after the backend (``compile: {inductor: {...}}``): a new backend
is one file in `torchopt/backends/` and its line in the registry, nothing here.
"""

from __future__ import annotations

import dataclasses

import torch

from torchopt.backends import BACKENDS, BuildLog, BuildSettings, choose_backend, get_backend
from torchopt.config import check_choice, check_type
from torchopt.profile.comparison import compare_latency
from torchopt.recipe import StepConfig, StepContext, register_step
from torchopt.recipes.lowp import AUTO_MIN_SPEEDUP, LOWP_CHOICES, apply_lowp, check_lowp_request

__all__ = ["CompileConfig"]

# On CPU, `auto` keeps a compiled backend only when the whole spread of its speedup over eager clears
# AUTO_MIN_SPEEDUP (the margin every timed choice of the step uses; see torchopt.recipes.lowp).
AUTO_ROUNDS, AUTO_ITERS, AUTO_WARMUP = 8, 3, 2


def _keep_compiled_on_cpu(ctx: StepContext, backend_name: str, runner, why: str) -> bool:
    """Time eager and the compiled runner in alternating rounds; keep the compiled one only if clearly faster.

    Records the figures in the step's details and the reason in the report either way.
    """
    with torch.no_grad():
        cmp = compare_latency(
            {"eager": ctx.model, backend_name: runner},
            *ctx.example_inputs(which="opt"),
            rounds=AUTO_ROUNDS,
            iters=AUTO_ITERS,
            warmup=AUTO_WARMUP,
        )
    speedup = cmp.speedups[backend_name]
    ctx.details["auto_latency"] = cmp.to_dict()
    figures = (
        f"{backend_name} {cmp.results[backend_name].p50_ms:.2f} ms vs eager {cmp.results['eager'].p50_ms:.2f} ms"
        f" p50, speedup {speedup} over {speedup.rounds} alternating rounds at the opt shape"
    )
    if speedup.low > AUTO_MIN_SPEEDUP:
        ctx.set_backend(backend_name, f"auto: {backend_name} measured faster than eager on CPU: {figures} ({why})")
        return True
    ctx.set_backend(
        "eager",
        f"auto: eager kept on CPU, {backend_name} not clearly faster (whole spread above"
        f" {AUTO_MIN_SPEEDUP:.2f}x needed): {figures} ({why.removeprefix('auto: ')})",
    )
    return False


def _report_build(ctx: StepContext, log: BuildLog) -> None:
    """A kept build's notes, details and any precision it changed go to the context's report."""
    ctx.report.notes.extend(log.notes)
    ctx.details.update(log.details)
    if log.precision is not None:
        ctx.report.precision, ctx.report.precision_reason = log.precision


def _apply_compile(config: CompileConfig, ctx: StepContext) -> None:
    backend, why = choose_backend(config.backend, ctx.device)
    ctx.set_backend(backend.name, why)
    ctx.check_profiles_run()
    simulated = ctx.quantized and backend.name != "tensorrt"  # Q/DQ layers would run as fake-quant
    if simulated and apply_lowp(config.lowp, ctx, backend, config.settings(backend.name)):
        return
    if simulated and config.backend == "auto":
        # Fake-quant compiled gains no speed, takes minutes and hits dynamo's recompile limit on ModelOpt's
        # autograd functions.
        backend = get_backend("eager")
        why = f"auto: eager for the fake-quant model; only TensorRT runs Q/DQ as integer/FP8 kernels ({why})"
        ctx.set_backend(backend.name, why)
    log = BuildLog(progress=ctx.progress)
    runners = backend.build(ctx.model, ctx.profiles, ctx.runtime, config.settings(backend.name), log)
    timed_choice = config.backend == "auto" and ctx.device.type == "cpu" and backend.name != "eager"
    # On CPU, oneDNN's eager convolutions often match or beat compiled code: keep what measures faster.
    if timed_choice and not _keep_compiled_on_cpu(ctx, backend.name, runners[0], why):
        runners = [ctx.model for _ in ctx.profiles]  # the discarded build's notes would describe what does not run
    else:
        _report_build(ctx, log)
    ctx.runners = runners


@dataclasses.dataclass
class _CompileOptions(StepConfig):
    """The options every backend shares; `CompileConfig` adds one field per backend config."""

    backend: str = "auto"
    cuda_graphs: bool | None = None
    lowp: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("compile.backend", self.backend, ["auto", *sorted(BACKENDS)])
        check_choice("compile.lowp", self.lowp, list(LOWP_CHOICES))
        if self.cuda_graphs is not None:
            check_type("compile.cuda_graphs", self.cuda_graphs, bool, "true, false or null (auto)")

    def settings(self, backend_name: str) -> BuildSettings:
        """What `backend_name` builds with: its own config (when it has one) and the shared options."""
        return BuildSettings(config=getattr(self, backend_name, None), cuda_graphs=self.cuda_graphs)

    def preflight(self, ctx: StepContext) -> None:
        """An explicitly requested backend must be available before any timing or calibration starts."""
        if self.backend != "auto":
            choose_backend(self.backend, ctx.device)
        check_lowp_request(self.lowp, ctx.device)


CompileConfig = register_step("compile", _apply_compile)(
    dataclasses.make_dataclass(
        "CompileConfig",
        [
            (name, backend.config_class, dataclasses.field(default_factory=backend.config_class))
            for name, backend in BACKENDS.items()
            if backend.config_class is not None
        ],
        bases=(_CompileOptions,),
        namespace={
            "__module__": __name__,
            "__doc__": """Compile the module for the recipe's input profiles.

    backend: "auto" (tensorrt if importable with CUDA, else inductor, else eager; the report says why;
        on CPU inductor is kept only when alternating timing rounds show it faster than eager by more than
        their spread and 5 %), or a backend name.
    cuda_graphs: None = auto (on for CUDA with Inductor: takes the launch gaps out at small batch; off for
        TensorRT, whose graphs re-record at every new input shape — set true to use them).
    lowp: how a quantized model runs without TensorRT: "auto" (real FP8/INT8 GEMMs where they measure faster
        than the fp16 build of the original model at every profile, else that fp16 build; fake-quant where the
        device has no such GEMMs), "off" (fake-quant simulation), or a mode of `torchopt.quantize.deployment`
        ("fp8", "fp8_rowwise", "int8", "int8_weight_only"); see `torchopt.recipes.lowp`.
    <backend name>: that backend's settings, e.g. inductor (see InductorConfig), tensorrt (see TensorRTConfig).
    """,
        },
    )
)
