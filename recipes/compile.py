"""Recipe step `compile`: hand the prepared module to a backend (auto, eager, inductor, tensorrt)."""

from __future__ import annotations

import dataclasses

import torch

from torchopt.backends import BACKENDS, InductorConfig, TensorRTConfig, choose_backend, get_backend
from torchopt.config import check_choice, check_type
from torchopt.engine import check_profiles_run
from torchopt.profile.comparison import compare_latency
from torchopt.recipe import StepConfig, register_step

__all__ = ["CompileConfig"]

# On CPU, `auto` keeps a compiled backend only when the whole spread of its speedup over eager clears this
# margin (eager is simpler, starts instantly and needs no recompiles): 5 % is above the run-to-run noise of
# paired rounds on a quiet machine and below the gains worth a compile.
AUTO_MIN_SPEEDUP = 1.05
AUTO_ROUNDS, AUTO_ITERS, AUTO_WARMUP = 8, 3, 2


def _keep_compiled_on_cpu(ctx, backend_name: str, runner, why: str) -> bool:
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


def _apply_compile(config: CompileConfig, ctx) -> None:
    backend, why = choose_backend(config.backend, ctx.device)
    if config.backend == "auto" and ctx.quantized and backend.name != "tensorrt":
        # Without TensorRT, Q/DQ layers run as fake-quant simulation: compiling them gains no speed, takes
        # minutes and hits dynamo's recompile limit on ModelOpt's autograd functions.
        backend = get_backend("eager")
        why = f"auto: eager for the fake-quant model; only TensorRT runs Q/DQ as integer/FP8 kernels ({why})"
    ctx.set_backend(backend.name, why)
    check_profiles_run(ctx)
    runners = backend.build(ctx.model, config, ctx)
    timed_choice = config.backend == "auto" and ctx.device.type == "cpu" and backend.name != "eager"
    # On CPU, oneDNN's eager convolutions often match or beat compiled code: keep what measures faster.
    if timed_choice and not _keep_compiled_on_cpu(ctx, backend.name, runners[0], why):
        runners = [ctx.model for _ in ctx.profiles]
    ctx.runners = runners


@register_step("compile", _apply_compile)
@dataclasses.dataclass
class CompileConfig(StepConfig):
    """Compile the module for the recipe's input profiles.

    backend: "auto" (tensorrt if importable with CUDA, else inductor, else eager; the report says why;
        on CPU inductor is kept only when alternating timing rounds show it faster than eager by more than
        their spread and 5 %), or a backend name.
    cuda_graphs: None = auto (on for CUDA with Inductor: takes the launch gaps out at small batch; off for
        TensorRT, whose graphs re-record at every new input shape — set true to use them).
    inductor: torch.compile settings (see InductorConfig).
    tensorrt: Torch-TensorRT build settings (see TensorRTConfig).
    """

    backend: str = "auto"
    cuda_graphs: bool | None = None
    inductor: InductorConfig = dataclasses.field(default_factory=InductorConfig)
    tensorrt: TensorRTConfig = dataclasses.field(default_factory=TensorRTConfig)

    def __post_init__(self) -> None:
        check_choice("compile.backend", self.backend, ["auto", *sorted(BACKENDS)])
        if self.cuda_graphs is not None:
            check_type("compile.cuda_graphs", self.cuda_graphs, bool, "true, false or null (auto)")
        if isinstance(self.inductor, dict):
            self.inductor = InductorConfig.from_dict(self.inductor, where="compile.inductor")
        check_type("compile.inductor", self.inductor, InductorConfig)
        if isinstance(self.tensorrt, dict):
            self.tensorrt = TensorRTConfig.from_dict(self.tensorrt, where="compile.tensorrt")
        check_type("compile.tensorrt", self.tensorrt, TensorRTConfig)

    def use_cuda_graphs(self, device: torch.device) -> bool:
        if self.cuda_graphs is None:
            return device.type == "cuda"
        if self.cuda_graphs and device.type != "cuda":
            raise ValueError(f"compile.cuda_graphs=True needs a CUDA device, the recipe runs on {device}")
        return self.cuda_graphs
