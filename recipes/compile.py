"""Recipe step `compile`: hand the prepared module to a backend (auto, eager, inductor, tensorrt)."""

from __future__ import annotations

import dataclasses

import torch

from torchopt.backends import BACKENDS, InductorConfig, TensorRTConfig, choose_backend, get_backend
from torchopt.config import check_choice, check_type
from torchopt.engine import check_profiles_run, measure_latency
from torchopt.recipe import StepConfig, register_step

__all__ = ["CompileConfig"]


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
    if config.backend == "auto" and ctx.device.type == "cpu" and backend.name != "eager":
        # On CPU, oneDNN's eager convolutions often match or beat compiled code: keep what measures faster.
        args = ctx.example_inputs(which="opt")
        eager_ms, compiled_ms = (
            measure_latency(fn, args, warmup=2, iters=5, max_iters=10).p50_ms for fn in (ctx.model, runners[0])
        )
        ctx.details["auto_latency_ms"] = {"eager": eager_ms, backend.name: compiled_ms}
        if compiled_ms > 0.95 * eager_ms:
            ctx.set_backend(
                "eager",
                f"auto: {backend.name} measured {compiled_ms:.2f} ms vs eager {eager_ms:.2f} ms at the opt shape"
                f" on CPU, not 5% faster; eager kept ({why.removeprefix('auto: ')})",
            )
            runners = [ctx.model for _ in ctx.profiles]
    ctx.runners = runners


@register_step("compile", _apply_compile)
@dataclasses.dataclass
class CompileConfig(StepConfig):
    """Compile the module for the recipe's input profiles.

    backend: "auto" (tensorrt if importable with CUDA, else inductor, else eager; the report says why),
        or a backend name.
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
