"""The Inductor backend: `torch.compile` with each profile's dynamic dims marked, warmed up per profile.

Dynamo specializes sizes 0 and 1 and some kernels add their own size guards (the CPU convolution splits batch
at 16, for example), so one profile can need more than one graph. All of them are compiled during `optimize`
by warming up at the profile points `inputs.WHICH` (min, min+1, opt, max-1, max); the number of graphs is
recorded, and later calls inside the profile reuse them.
"""

from __future__ import annotations

import dataclasses
import shutil

import torch

from torchopt._compat import triton_status
from torchopt.backends.base import Backend, BuildSettings
from torchopt.config import ConfigBase, check_choice, check_type
from torchopt.inputs import WHICH

__all__ = ["InductorBackend", "InductorConfig", "use_cuda_graphs"]

MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclasses.dataclass
class InductorConfig(ConfigBase):
    """torch.compile settings.

    mode: torch.compile mode; "auto" is "default" (fast to build); "max-autotune*" tunes GEMM/conv kernels
    for minutes. CUDA graphs are controlled by CompileConfig.cuda_graphs, not by the mode.
    fullgraph: fail instead of falling back to eager at graph breaks.
    mha_fast_path: keep the fused eval fast path of nn.MultiheadAttention / nn.TransformerEncoderLayer. Dynamo
        cannot compile it with dynamic shapes (the model then runs eager); False runs calls on the standard path,
        which compiles. Measured on an H100 (BERT-base-sized encoder, fp16, one profile 1x16 .. 64x512): b1
        2.47 -> 0.49 ms, but 29x200 2.6 -> 4.3 ms and 64x512 14.2 -> 20.6 ms, hence off by default.
    """

    mode: str = "auto"
    fullgraph: bool = False
    mha_fast_path: bool = True

    def __post_init__(self) -> None:
        check_choice("inductor.mode", self.mode, ["auto", *MODES])
        check_type("inductor.fullgraph", self.fullgraph, bool)
        check_type("inductor.mha_fast_path", self.mha_fast_path, bool)


def use_cuda_graphs(settings: BuildSettings, device: torch.device) -> bool:
    """Whether to capture CUDA graphs: the recipe's choice, else on for CUDA; refused on another device."""
    if settings.cuda_graphs is None:
        return device.type == "cuda"
    if settings.cuda_graphs and device.type != "cuda":
        raise ValueError(f"compile.cuda_graphs=True needs a CUDA device, the recipe runs on {device}")
    return settings.cuda_graphs


def _graph_count() -> int:
    from torch._dynamo.utils import counters  # noqa: PLC0415

    return int(counters["stats"]["unique_graphs"])


def _has_mha_fast_path(model: torch.nn.Module) -> bool:
    kinds = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer)
    return isinstance(model, torch.nn.Module) and any(isinstance(m, kinds) for m in model.modules())


class _WithoutMHAFastPath(torch.nn.Module):
    """Calls `compiled` with ``torch.backends.mha`` fast path disabled, restoring the caller's setting after."""

    def __init__(self, compiled: torch.nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.compiled(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)


class InductorBackend(Backend):
    name = "inductor"
    config_class = InductorConfig

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return "Inductor on CPU needs a C++ compiler (g++/clang++), none found on PATH"
        if device.type == "cuda":
            ok, why = triton_status()
            if not ok:
                return f"Inductor on CUDA needs Triton: {why}"
        return None

    def build(self, model, profiles, runtime, settings, log):
        cfg = settings.config or InductorConfig()
        mode = cfg.mode
        if mode == "auto":
            mode = "default"
        if use_cuda_graphs(settings, runtime.device):
            mode = "reduce-overhead" if mode == "default" else "max-autotune" if mode.startswith("max") else mode
        log.note(f"torch.compile(mode={mode!r}, fullgraph={cfg.fullgraph})")
        compiled = torch.compile(model, mode=mode, fullgraph=cfg.fullgraph)
        has_mha_fast_path = _has_mha_fast_path(model)
        if not cfg.mha_fast_path and has_mha_fast_path:
            # In eval under no_grad, nn.TransformerEncoderLayer / MultiheadAttention take a fused fast path
            # (aten._transformer_encoder_layer_fwd, _native_multi_head_attention) that dynamo cannot trace with
            # dynamic shapes: a BERT-sized encoder built 0 graphs and ran eager. The standard path compiles.
            log.note("MHA fast path off during calls (inductor.mha_fast_path=False)")
            compiled = _WithoutMHAFastPath(compiled)
        elif has_mha_fast_path and any(spec.dynamic_dims for profile in profiles for spec in profile):
            log.note(
                "the model's MultiheadAttention/TransformerEncoderLayer fast path cannot be compiled with dynamic"
                " shapes and may run eager; inductor.mha_fast_path=False compiles the standard path instead"
            )
        before = _graph_count()
        for p, profile in enumerate(profiles):
            log.log(f"compiling profile {p} with Inductor")
            # First call: the opt shape with its dynamic dims marked (those the spec says can stay symbolic).
            first = runtime.examples(profile, "opt")
            for spec, t in zip(profile, first, strict=True):
                for d in spec.symbolic_dims("opt"):
                    torch._dynamo.mark_dynamic(t, d)
            with torch.no_grad():
                compiled(*first)
                for which in WHICH:
                    compiled(*runtime.examples(profile, which))
        graphs = log.details["graphs"] = _graph_count() - before
        limit = torch._dynamo.config.recompile_limit if hasattr(torch._dynamo.config, "recompile_limit") else 8
        if graphs >= limit:
            # Past dynamo's per-function limit, further shapes silently run eager: say so instead.
            log.note(
                f"Inductor built {graphs} graphs for {len(profiles)} profiles, at dynamo's recompile limit"
                f" ({limit}); shapes needing another graph would run eager. Use fewer profiles or raise"
                " torch._dynamo.config.recompile_limit."
            )
        return [compiled for _ in profiles]
