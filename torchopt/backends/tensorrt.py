"""The TensorRT backend: `torch.export` per input profile, then `torch_tensorrt.dynamo.compile` (2.13 API).

Flow for each profile: InputSpec → `torch_tensorrt.Input(min_shape, opt_shape, max_shape, dtype, name,
shared_dims)` with the known pitfalls fixed first (`input_kwargs`); `torch.export` of the prepared module with
the profile's dynamic dims (under ModelOpt's `export_torch_mode()` for Q/DQ models, so quantizers become
`tensorrt::quantize_op` nodes); `torch_tensorrt.dynamo.compile(program, arg_inputs=..., **kwargs)` with the
keyword arguments from `build_compile_kwargs` — the one place a `TensorRTConfig` turns into Torch-TensorRT
settings, checked against the real 2.13 signatures by tests/backends/test_tensorrt_contract.py (2.13 ignores
unknown keywords silently and removed `enabled_precisions` / `use_explicit_typing`: networks are strongly
typed, so fp16/bf16 come from the cast step or from Torch-TensorRT's autocast).

One compiled module per profile; `OptimizedModule` checks shapes and picks the profile before any engine sees
the input, so an out-of-profile call fails with the same message as on every other backend instead of
TensorRT's "Error while setting the input shape". `torch_tensorrt` is imported only inside `build`/`save`/
`load`: importing it without TensorRT raises a bare Exception.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fnmatch
import hashlib
import importlib
import importlib.util
import operator
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from torchopt._compat import tensorrt_status
from torchopt.backends.base import Backend, BackendUnavailableError, BuildLog
from torchopt.backends.inductor import use_cuda_graphs
from torchopt.config import ConfigBase, check_choice, check_positive, check_type, closest
from torchopt.export import export_program
from torchopt.inputs import InputSpec
from torchopt.quantize.export import export_quantized
from torchopt.quantize.formats import FORMATS, deployment_warning, trt_formats
from torchopt.quantize.keep import KeepRule, resolve_keep
from torchopt.quantize.quant_summary import detect_format
from torchopt.runtime import Runtime

__all__ = [
    "AUTOCAST_DTYPES",
    "TensorRTBackend",
    "TensorRTConfig",
    "build_compile_kwargs",
    "build_serialized_engines",
    "engine_cache_subdir",
    "explain_export_error",
    "export_profile",
    "input_kwargs",
    "keep_pattern_regex",
    "partition_report",
    "resolve_torch_ops",
    "save_kwargs",
    "serialized_engine_kwargs",
]

AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_AUTOCAST_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}
# TensorRT's builder accepts optimization levels 0..5 (3 is its default; higher searches longer).
MAX_OPTIMIZATION_LEVEL = 5
MIN_TORCH_TENSORRT = (2, 13)  # the API build_compile_kwargs / input_kwargs are checked against
INSTALL_HINT = (
    "install Torch-TensorRT with its TensorRT libraries on a CUDA machine: `pip install torch-tensorrt` (the"
    " version matching your torch, e.g. torch-tensorrt==2.13.* for torch 2.13), or `pip install"
    " torchopt-infer[tensorrt]`"
)


def resolve_torch_ops(names: Sequence[str]) -> list[str]:
    """Qualified names (``torch.ops.aten._softmax.default``) of ATen ops, as Torch-TensorRT's partitioner
    compares them. Accepts ``aten._softmax.default``, ``aten::_softmax.default``, ``torch.ops.…`` and
    overload packets (``aten._softmax`` → every overload). Unknown ops raise ValueError."""
    out: list[str] = []
    for raw in names:
        check_type("tensorrt.torch_executed_ops[]", raw, str)
        text = raw.strip().removeprefix("torch.ops.").replace("::", ".")
        parts = text.split(".")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(
                f"tensorrt.torch_executed_ops: {raw!r} is not an op name like 'aten._softmax.default' or"
                " 'aten._softmax' (all overloads)"
            )
        namespace, op_name = parts[0], parts[1]
        try:
            packet = getattr(getattr(torch.ops, namespace), op_name)
        except (AttributeError, RuntimeError):
            raise ValueError(
                f"tensorrt.torch_executed_ops: no op {namespace}.{op_name} is registered (from {raw!r})"
            ) from None
        overloads = packet.overloads()
        if len(parts) == 3:
            if parts[2] not in overloads:
                raise ValueError(
                    f"tensorrt.torch_executed_ops: {namespace}.{op_name} has no overload {parts[2]!r}"
                    f"{closest(parts[2], overloads)}; overloads: {overloads}"
                )
            overloads = [parts[2]]
        out.extend(f"torch.ops.{namespace}.{op_name}.{o}" for o in overloads)
    return sorted(set(out))


def keep_pattern_regex(pattern: str) -> str:
    """The regex for Torch-TensorRT's `autocast_excluded_nodes` that keeps a module (and its children) in
    float32, from the glob syntax of the quantize step's `keep` patterns (fnmatch on dotted module names).

    Torch-TensorRT 2.13 matches each regex with `re.match` against the innermost `nn_module_stack` path of a
    node, i.e. the qualified module name (``layer1.0.conv1``), so the glob is anchored at both ends and a
    matching module's submodules (``head`` → ``head.0``) match too.
    """
    check_type("tensorrt.autocast_keep[]", pattern, str)
    inner = re.sub(r"\\[Zz]$", "", fnmatch.translate(pattern))  # '(?s:...)\\Z' (\\z from Python 3.14)
    return rf"{inner}(?:\..*)?\Z"


def _check_keep_patterns(model: torch.nn.Module, patterns: Sequence[str]) -> None:
    """A pattern that keeps nothing is an error naming it and nearby module names (the quantize step's check)."""
    try:
        resolve_keep(model, [KeepRule(pattern=p) for p in patterns])
    except ValueError as exc:
        raise ValueError(f"tensorrt.autocast_keep: {exc}") from None


def engine_cache_subdir(root: str | os.PathLike, calib_fingerprint: str | None) -> Path:
    """Engine cache directory for one calibration: Torch-TensorRT hashes the graph's structure without the
    weights, so two calibrations of one model would share engines whose Q/DQ scales differ; keying the
    directory by the calibration fingerprint keeps them apart."""
    if calib_fingerprint is None:
        return Path(root) / "uncalibrated"
    digest = hashlib.sha256(str(calib_fingerprint).encode()).hexdigest()[:16]
    return Path(root) / f"calib-{digest}"


def _check_writable_dir(name: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{name} {str(path)!r} cannot be created as a directory: {exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {str(path)!r} is not writable; choose a directory you can write to")


@dataclasses.dataclass
class TensorRTConfig(ConfigBase):
    """Torch-TensorRT build settings (each maps to one `torch_tensorrt.dynamo.compile` keyword).

    optimization_level: 0–5, builder effort (None = TensorRT's default, 3).
    workspace_size: bytes of scratch memory the builder may use per layer (None = TensorRT's default).
    timing_cache_path: file reused across builds to skip kernel timing (None = next to the engine cache when
        engine_cache_dir is set, else Torch-TensorRT's default in the temp dir).
    engine_cache_dir: cache built engines here and reuse them on rebuilds (builds refittable engines,
        `immutable_weights=False`); one subdirectory per calibration fingerprint.
    engine_cache_size: bytes the engine cache may use (None = Torch-TensorRT's default, 5 GB).
    require_full_compilation: fail unless the whole graph runs in TensorRT.
    torch_executed_ops: ATen ops pinned to PyTorch, e.g. ["aten._softmax.default"] (names as in the
        partition report).
    min_block_size: fewest consecutive convertible ops worth a TensorRT block (None = 1 for Q/DQ models, so
        every quantized layer is converted, else Torch-TensorRT's default, 5).
    dryrun: partition only: build no engine, report the partition; the partitioned graph runs in PyTorch.
    autocast: "float16" / "bfloat16": let Torch-TensorRT lower a float32 model's layers (use with cast dtype
        float32); None = the network runs in the precision the cast step gave the model.
    autocast_keep: module-name globs kept in float32 under autocast (the quantize step's `keep` syntax).
    use_fp32_acc: accumulate matmuls in float32 in a float16 model.
    truncate_double: run float64 weights/inputs as float32 (TensorRT has no float64).
    offload_module_to_cpu: move the PyTorch weights to CPU during the engine build (frees GPU memory for
        the builder); they are moved back afterwards since the optimized module keeps them.
    lazy_engine_init: set engines up after all are built (helps large models with graph breaks).
    """

    optimization_level: int | None = None
    workspace_size: int | None = None
    timing_cache_path: str | None = None
    engine_cache_dir: str | None = None
    engine_cache_size: int | None = None
    require_full_compilation: bool = False
    torch_executed_ops: list[str] = dataclasses.field(default_factory=list)
    min_block_size: int | None = None
    dryrun: bool = False
    autocast: str | None = None
    autocast_keep: list[str] = dataclasses.field(default_factory=list)
    use_fp32_acc: bool = False
    truncate_double: bool = False
    offload_module_to_cpu: bool = False
    lazy_engine_init: bool = False

    def __post_init__(self) -> None:
        if self.optimization_level is not None:
            check_positive("tensorrt.optimization_level", self.optimization_level, allow_zero=True)
            if self.optimization_level > MAX_OPTIMIZATION_LEVEL:
                raise ValueError(
                    f"tensorrt.optimization_level must be in [0, {MAX_OPTIMIZATION_LEVEL}],"
                    f" got {self.optimization_level}"
                )
        for name in ("workspace_size", "engine_cache_size", "min_block_size"):
            if getattr(self, name) is not None:
                check_positive(f"tensorrt.{name}", getattr(self, name))
        for name in ("timing_cache_path", "engine_cache_dir"):
            value = getattr(self, name)
            if value is not None:
                check_type(f"tensorrt.{name}", value, (str, os.PathLike), "a path string or null")
                if not os.fspath(value).strip():
                    raise ValueError(f"tensorrt.{name} must be a non-empty path or null, got {value!r}")
                setattr(self, name, os.fspath(value))
        if self.engine_cache_size is not None and self.engine_cache_dir is None:
            raise ValueError("tensorrt.engine_cache_size is set but tensorrt.engine_cache_dir is not")
        for name in (
            "require_full_compilation",
            "dryrun",
            "use_fp32_acc",
            "truncate_double",
            "offload_module_to_cpu",
            "lazy_engine_init",
        ):
            check_type(f"tensorrt.{name}", getattr(self, name), bool)
        check_type("tensorrt.torch_executed_ops", self.torch_executed_ops, (list, tuple), "a list of op names")
        self.torch_executed_ops = list(self.torch_executed_ops)
        resolve_torch_ops(self.torch_executed_ops)  # unknown ops fail here, not at build time
        if self.require_full_compilation and self.torch_executed_ops:
            raise ValueError(
                "tensorrt.require_full_compilation cannot be combined with tensorrt.torch_executed_ops"
                f" {self.torch_executed_ops}: pinned ops run in PyTorch"
            )
        if self.autocast is not None:
            check_type("tensorrt.autocast", self.autocast, str, "'float16', 'bfloat16' or null")
            self.autocast = _AUTOCAST_ALIASES.get(self.autocast, self.autocast)
            check_choice("tensorrt.autocast", self.autocast, [*AUTOCAST_DTYPES, None])
        check_type("tensorrt.autocast_keep", self.autocast_keep, (list, tuple), "a list of module-name globs")
        self.autocast_keep = list(self.autocast_keep)
        for p in self.autocast_keep:
            keep_pattern_regex(p)
        if self.autocast_keep and self.autocast is None:
            raise ValueError(
                f"tensorrt.autocast_keep {self.autocast_keep} needs tensorrt.autocast ('float16' or 'bfloat16')"
            )


def build_compile_kwargs(
    config: TensorRTConfig,
    *,
    device: torch.device,
    quantized: bool = False,
    calib_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Exactly the keyword arguments `TensorRTBackend` passes to `torch_tensorrt.dynamo.compile` (besides
    `arg_inputs`). Pure: no import of torch_tensorrt, no file-system access.

    Example::

        build_compile_kwargs(TensorRTConfig(optimization_level=5), device=torch.device("cuda", 0))
        # {'device': device(type='cuda', index=0), 'require_full_compilation': False,
        #  'truncate_double': False, 'dryrun': False, 'optimization_level': 5}
    """
    check_type("config", config, TensorRTConfig)
    kw: dict[str, Any] = {
        "device": device,
        "require_full_compilation": config.require_full_compilation,
        "truncate_double": config.truncate_double,
        "dryrun": config.dryrun,
    }
    if config.min_block_size is not None:
        kw["min_block_size"] = config.min_block_size
    elif quantized:
        kw["min_block_size"] = 1  # a Q/DQ pair alone is a block: leaving one in PyTorch loses the INT8/FP8 layer
    if config.optimization_level is not None:
        kw["optimization_level"] = config.optimization_level
    if config.workspace_size is not None:
        kw["workspace_size"] = config.workspace_size
    if config.torch_executed_ops:
        kw["torch_executed_ops"] = set(resolve_torch_ops(config.torch_executed_ops))
    timing_cache = config.timing_cache_path
    if config.engine_cache_dir is not None:
        kw["cache_built_engines"] = True
        kw["reuse_cached_engines"] = True
        kw["engine_cache_dir"] = str(engine_cache_subdir(config.engine_cache_dir, calib_fingerprint))
        # Torch-TensorRT's engine cache refits cached engines with the current weights: needs refittable ones.
        kw["immutable_weights"] = False
        if config.engine_cache_size is not None:
            kw["engine_cache_size"] = config.engine_cache_size
        if timing_cache is None:
            timing_cache = str(Path(config.engine_cache_dir) / "timing_cache.bin")
    if timing_cache is not None:
        kw["timing_cache_path"] = str(timing_cache)
    if config.autocast is not None:
        kw["enable_autocast"] = True
        kw["autocast_low_precision_type"] = AUTOCAST_DTYPES[config.autocast]
        # A sorted list, not a set: the settings are hashed into the engine-cache key via str().
        kw["autocast_excluded_nodes"] = sorted(keep_pattern_regex(p) for p in config.autocast_keep)
    if config.use_fp32_acc:
        kw["use_fp32_acc"] = True
    if config.offload_module_to_cpu:
        kw["offload_module_to_cpu"] = True
    if config.lazy_engine_init:
        kw["lazy_engine_init"] = True
    return kw


# What `convert_exported_program_to_serialized_trt_engine` cannot honour: it converts the whole graph into one
# engine (no partitioning, so no ops left to PyTorch and no dry run) and takes no autocast keywords (2.13 would
# swallow them in **kwargs and build a float32 engine).
_SERIALIZED_ENGINE_REFUSED = {
    "autocast": "it takes no autocast keywords; cast the model with the cast step (dtype float16/bfloat16) instead",
    "torch_executed_ops": "it converts the whole graph into one engine, so no op can stay in PyTorch",
    "dryrun": "a dry run builds no engine",
}


def serialized_engine_kwargs(
    config: TensorRTConfig,
    *,
    device: torch.device,
    quantized: bool = False,
    calib_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Exactly the keyword arguments (besides `arg_inputs`) passed to
    `torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine`: `build_compile_kwargs`'s, after
    refusing (ValueError) the settings that function cannot honour. Pure, like `build_compile_kwargs`."""
    check_type("config", config, TensorRTConfig)
    for name, why in _SERIALIZED_ENGINE_REFUSED.items():
        value = getattr(config, name)
        if value:
            raise ValueError(
                f"tensorrt.{name}={value!r} cannot be used for a serialized TensorRT engine (save format"
                f" 'tensorrt'): {why}"
            )
    return build_compile_kwargs(config, device=device, quantized=quantized, calib_fingerprint=calib_fingerprint)


def input_kwargs(spec: InputSpec, dtype: torch.dtype) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments of `torch_tensorrt.Input` for one input, and the adjustments made (as sentences).

    Every input is named (unnamed dynamic Inputs share one export Dim), every dynamic dim is listed in
    `shared_dims` under its `InputSpec.dim_name` (the same name on several inputs ties those dims, as in
    `torchopt.export.export_dynamic_shapes`), and the opt shape is the spec's export point
    (`InputSpec.export_shape`): export and TensorRT's save re-trace at opt, and a dynamic axis of size 1
    specializes, so an opt of 1 there becomes 2. The spec's own validation (1 <= min <= opt <= max, frozen
    after) covers what TensorRT needs besides: no empty dims, opt inside the range.
    """
    check_type("spec", spec, InputSpec)
    if not spec.is_dynamic:
        return {"shape": tuple(spec.min), "dtype": dtype, "name": spec.name}, []
    opt = spec.export_shape
    notes = [
        f"input {spec.name!r} dim {d}: opt 1 on a dynamic axis makes torch.export specialize it to 1;"
        " TensorRT tunes for 2 instead"
        for d in spec.dynamic_dims
        if opt[d] != spec.opt[d]
    ]
    kw = {
        "min_shape": tuple(spec.min),
        "opt_shape": opt,
        "max_shape": tuple(spec.max),
        "dtype": dtype,
        "name": spec.name,
        "shared_dims": {d: spec.dim_name(d) for d in spec.dynamic_dims},
    }
    return kw, notes


def save_kwargs(inputs: list[Any]) -> dict[str, Any]:
    """Keyword arguments of `torch_tensorrt.save`: the exported-program format keeps the dynamic dims only
    when it gets the `Input`s."""
    return {"output_format": "exported_program", "arg_inputs": inputs, "retrace": True}


# ---------------------------------------------------------------------------------------------------------
# torch.export


_MARKED_CONSTANT = re.compile(r"specialized it to be a constant \((\d+)\)")


def explain_export_error(exc: BaseException, profile: list[InputSpec], index: int = 0) -> Exception:
    """Turn torch.export's error about a profile's dynamic dims into plain words naming input and dim.

    Returns a ValueError when the error names one of the profile's dims (the profile asks for a dynamic dim
    the model cannot vary over that range), else a RuntimeError carrying torch.export's first lines.
    """
    text = str(exc)
    dims: dict[str, list[tuple[str, int, int, int]]] = collections.defaultdict(list)
    for s in profile:
        for d in s.dynamic_dims:
            dims[s.dim_name(d)].append((s.name, d, s.min[d], s.max[d]))
    lines = text.splitlines()
    fixes = []
    if "Suggested fixes:" in lines:
        start = lines.index("Suggested fixes:") + 1
        fixes = [ln.strip() for ln in lines[start:] if ln.startswith("  ") and ln.strip()]
    problems = []
    for line in lines:
        if not line.lstrip().startswith("- "):
            continue
        named = [n for n in dims if re.search(rf"\b{re.escape(n)}\b", line)]
        for name in named:
            where = " and ".join(f"input {i!r} dim {d}" for i, d, _, _ in dims[name])
            lo, hi = dims[name][0][2], dims[name][0][3]
            const = _MARKED_CONSTANT.search(line)
            fix = next((f for f in fixes if re.match(rf"{re.escape(name)}\s*=", f)), None)
            if const:
                problems.append(
                    f"{where} is declared dynamic over [{lo}, {hi}] but the model only works with size"
                    f" {const.group(1)}: make it static in the InputSpec (min = opt = max = {const.group(1)})"
                    " or change the model"
                )
            else:
                detail = line.strip()[2:].strip()
                problems.append(
                    f"{where} is declared dynamic over [{lo}, {hi}] but the model does not accept that whole"
                    f" range ({detail})" + (f"; torch.export suggests {fix}" if fix else "")
                )
    if problems:
        return ValueError(f"torch.export cannot keep profile {index}'s dynamic dims: " + "; ".join(problems))
    head = " ".join(text.strip().splitlines()[:3])[:500]
    return RuntimeError(
        f"torch.export failed on profile {index} ({type(exc).__name__}: {head}); TensorRT compiles an"
        " exported program, so the model must be exportable with these dynamic dims"
    )


def export_profile(
    model: torch.nn.Module,
    profile: list[InputSpec],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    quantized: bool = False,
    index: int = 0,
) -> torch.export.ExportedProgram:
    """`torch.export` of `model` with one profile's dynamic dims: the program TensorRT compiles.

    Floating example inputs are in `dtype` (the prepared module's input dtype, also for Q/DQ models).
    Q/DQ models go through `torchopt.quantize.export.export_quantized` (ModelOpt's `export_torch_mode()`, so
    quantizers become `tensorrt::quantize_op` nodes; CUDA only, and it warns when the format cannot be
    deployed on this GPU). Errors about the dynamic dims are explained by `explain_export_error`.

    Example::

        ep = export_profile(model, [InputSpec("x", min=(1, 3, 224, 224), max=(32, 3, 224, 224))],
                            device=torch.device("cuda"), dtype=torch.float16)
    """
    try:
        return export_program(model, [profile], device, dtype, export_fn=export_quantized if quantized else None)
    except Exception as exc:  # torch.export raises UserError, RuntimeError, GuardOnDataDependent...
        err = explain_export_error(exc, profile, index)
        if not isinstance(err, ValueError) and isinstance(exc, (ValueError, TypeError)):
            raise  # already a clear error (e.g. export_quantized refusing a CPU model)
        raise err from exc


# ---------------------------------------------------------------------------------------------------------
# Q/DQ formats and the partition report


def _check_quantized(model: torch.nn.Module, capability: tuple[int, int]) -> tuple[str | None, str | None]:
    """(format, deployment note) of a Q/DQ model about to be compiled; formats Torch-TensorRT 2.13 has no
    converter for (INT4-AWQ) raise ValueError here rather than fail inside the engine build."""
    fmt = detect_format(model)
    if fmt is None or fmt not in FORMATS:
        return fmt, None
    if FORMATS[fmt].trt_min_sm is None:
        raise ValueError(
            f"the model is quantized to {fmt!r}, which Torch-TensorRT 2.13 cannot convert (it converts"
            f" {', '.join(trt_formats())} Q/DQ); compile it with backend 'inductor' or quantize to one of those"
        )
    return fmt, deployment_warning(fmt, capability)


def _node_name(node: torch.fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    try:
        from torch.fx.node import _get_qualified_name

        return _get_qualified_name(node.target).removeprefix("torch.ops.")
    except Exception:  # a target without a qualified name
        return str(node.target)


def _torch_ops(graph: torch.fx.Graph) -> list[str]:
    """Ops that run in PyTorch, without getitem and shape arithmetic on SymInts."""
    out = []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target is operator.getitem:
            continue
        if isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
            continue
        out.append(_node_name(node))
    return out


def partition_report(module: torch.nn.Module) -> dict[str, Any]:
    """How Torch-TensorRT partitioned a compiled (or dry-run) module: TensorRT blocks (`_run_on_acc*`
    children), PyTorch blocks (`_run_on_gpu*`), and the ops that run in PyTorch with their counts."""
    trt_blocks, torch_blocks, trt_ops = 0, 0, 0
    fallback: collections.Counter[str] = collections.Counter()
    for name, child in module.named_children():
        if name.startswith("_run_on_acc"):
            trt_blocks += 1
            if isinstance(child, torch.fx.GraphModule):  # dry run: the block is still a graph
                trt_ops += len(_torch_ops(child.graph))
        elif isinstance(child, torch.fx.GraphModule):
            torch_blocks += 1
            fallback.update(_torch_ops(child.graph))
    if isinstance(module, torch.fx.GraphModule):
        fallback.update(_torch_ops(module.graph))  # the global partitioner leaves PyTorch ops inline
    report = {
        "tensorrt_blocks": trt_blocks,
        "pytorch_blocks": torch_blocks,
        "fallback_ops": dict(sorted(fallback.items())),
        "fully_in_tensorrt": trt_blocks > 0 and not fallback,
    }
    if trt_ops:
        report["tensorrt_ops"] = trt_ops
    return report


# ---------------------------------------------------------------------------------------------------------
# the backend


class _TensorRTRunner:
    """One profile's compiled module. With CUDA graphs, Torch-TensorRT's `enable_cudagraphs` context is
    entered once and kept for the runner's lifetime (entering it per call would re-wrap and re-warm the
    module); it sets Torch-TensorRT's process-wide CUDA-graph mode."""

    def __init__(
        self,
        module: torch.nn.Module,
        inputs: list[dict[str, Any]],
        *,
        cuda_graphs: bool,
        dryrun: bool = False,
    ):
        self.module = module
        self.inputs = inputs
        self.dryrun = dryrun
        self.cuda_graphs = cuda_graphs
        self._call: Callable[..., Any] = module
        self._graphs_cm = None
        if cuda_graphs:
            from torch_tensorrt.runtime import enable_cudagraphs

            self._graphs_cm = enable_cudagraphs(module)
            self._call = self._graphs_cm.__enter__()

    def __call__(self, *args: torch.Tensor) -> Any:
        return self._call(*args)

    def __del__(self) -> None:
        if self._graphs_cm is not None:
            with contextlib.suppress(Exception):  # interpreter shutdown
                self._graphs_cm.__exit__(None, None, None)


def _profile_inputs(profile: list[InputSpec], runtime: Runtime, index: int, log: BuildLog) -> list[dict[str, Any]]:
    """`Input` kwargs of one profile in the dtypes the runner gets (floats in the compute dtype unless Q/DQ,
    as `Runtime.adapt` and the optimized module's call cast them); adjustments go to the report."""
    out = []
    for spec in profile:
        cast = spec.torch_dtype.is_floating_point and not runtime.quantized
        kw, notes = input_kwargs(spec, runtime.dtype if cast else spec.torch_dtype)
        out.append(kw)
        for n in notes:
            log.note(f"tensorrt profile {index}: {n}")
    return out


def _import_torch_tensorrt():
    trt, why = tensorrt_status()
    if trt is None:
        raise BackendUnavailableError(f"the tensorrt backend needs Torch-TensorRT: {why}; {INSTALL_HINT}")
    return trt


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def build_serialized_engines(
    model: torch.nn.Module,
    profiles: list[list[InputSpec]],
    runtime: Runtime,
    config: TensorRTConfig,
    log: BuildLog,
) -> list[tuple[bytes, list[dict[str, Any]]]]:
    """One serialized TensorRT engine per profile (what Triton's `tensorrt_plan` platform and TensorRT's C++
    runtime load), each with its inputs' `torch_tensorrt.Input` keyword arguments (name, min/opt/max shapes,
    dtype): `torch.export` of the profile, then `convert_exported_program_to_serialized_trt_engine`.

    Raises BackendUnavailableError without Torch-TensorRT, TensorRT or a CUDA device.
    """
    reason = TensorRTBackend().unavailable_reason(runtime.device)
    if reason is not None:
        raise BackendUnavailableError(f"serialized TensorRT engines need Torch-TensorRT: {reason}")
    trt = _import_torch_tensorrt()
    device = runtime.device
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    kwargs = serialized_engine_kwargs(
        config, device=device, quantized=runtime.quantized, calib_fingerprint=runtime.calib_fingerprint
    )
    if runtime.quantized:
        _check_quantized(model, torch.cuda.get_device_capability(device))
    engines = []
    for p, profile in enumerate(profiles):
        specs_kw = _profile_inputs(profile, runtime, p, log)
        log.log(f"building the serialized TensorRT engine of profile {p}")
        program = export_profile(
            model, profile, device=device, dtype=runtime.dtype, quantized=runtime.quantized, index=p
        )
        engine = trt.dynamo.convert_exported_program_to_serialized_trt_engine(
            program, arg_inputs=[trt.Input(**kw) for kw in specs_kw], **kwargs
        )
        engines.append((bytes(engine), specs_kw))
    return engines


class TensorRTBackend(Backend):
    name = "tensorrt"
    config_class = TensorRTConfig

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            # No torch_tensorrt import here: `auto` asks on every CPU run; the import is slow and noisy.
            missing = [f"a CUDA device (the recipe runs on {device})"]
            if importlib.util.find_spec("torch_tensorrt") is None:
                missing.append("the torch_tensorrt package")
            elif importlib.util.find_spec("tensorrt") is None:
                missing.append("TensorRT itself (the `tensorrt` package with libnvinfer)")
            return f"Torch-TensorRT is missing {' and '.join(missing)}; {INSTALL_HINT}"
        trt, why = tensorrt_status()
        if trt is None:
            return why if "pip install" in why else f"{why}; {INSTALL_HINT}"
        version = str(getattr(trt, "__version__", "0"))
        if tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < MIN_TORCH_TENSORRT:
            return (
                f"torch_tensorrt {version} is older than 2.13, whose API this backend uses (Input.shared_dims,"
                f" strongly typed networks); {INSTALL_HINT}"
            )
        return None

    def build(self, model, profiles, runtime, settings, log):
        trt = _import_torch_tensorrt()
        cfg: TensorRTConfig = settings.config or TensorRTConfig()
        device = runtime.device
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if runtime.quantized:
            fmt, problem = _check_quantized(model, torch.cuda.get_device_capability(device))
            log.details["quant_format"] = fmt
            if problem:  # export_quantized also warns (DeploymentWarning)
                log.note(f"tensorrt: {problem}")
        if cfg.autocast is not None:
            if runtime.dtype != torch.float32 or runtime.quantized:
                state = "quantized" if runtime.quantized else str(runtime.dtype).removeprefix("torch.")
                raise ValueError(
                    f"tensorrt.autocast={cfg.autocast!r} lowers a float32 model inside TensorRT, but the"
                    f" model is {state} after the earlier steps; use cast dtype float32 with autocast, or"
                    " drop autocast"
                )
            _check_keep_patterns(model, cfg.autocast_keep)
            # Tolerances follow the lowest precision in the network; inputs stay float32 (runtime.dtype as is).
            log.precision = (
                cfg.autocast,
                "Torch-TensorRT autocast of the float32 model"
                + (f", keeping {cfg.autocast_keep} in float32" if cfg.autocast_keep else ""),
            )
        kwargs = build_compile_kwargs(
            cfg, device=device, quantized=runtime.quantized, calib_fingerprint=runtime.calib_fingerprint
        )
        if "engine_cache_dir" in kwargs:
            _check_writable_dir("tensorrt.engine_cache_dir", Path(kwargs["engine_cache_dir"]))
        if "timing_cache_path" in kwargs:
            _check_writable_dir("the parent of tensorrt.timing_cache_path", Path(kwargs["timing_cache_path"]).parent)
        if runtime.quantized and cfg.min_block_size is None:
            log.note("tensorrt: min_block_size=1 for the Q/DQ model (every quantized layer becomes TensorRT)")
        cuda_graphs = bool(settings.cuda_graphs) and use_cuda_graphs(settings, device) and not cfg.dryrun
        if settings.cuda_graphs is None:
            log.note(
                "tensorrt: CUDA graphs off (on request with compile.cuda_graphs: true; they re-record at"
                " every new input shape)"
            )
        if cfg.dryrun:
            log.note("tensorrt: dry run, no engine built; the partitioned graph runs in PyTorch")

        runners, profile_details = [], []
        for p, profile in enumerate(profiles):
            specs_kw = _profile_inputs(profile, runtime, p, log)
            log.log(f"exporting profile {p} for TensorRT")
            program = export_profile(
                model, profile, device=device, dtype=runtime.dtype, quantized=runtime.quantized, index=p
            )
            log.log(f"building TensorRT engines for profile {p} (minutes for large models)")
            t0 = time.perf_counter()
            compiled = trt.dynamo.compile(program, arg_inputs=[trt.Input(**kw) for kw in specs_kw], **kwargs)
            seconds = time.perf_counter() - t0
            if cfg.offload_module_to_cpu:
                # The build moved the weights it shares with `model` to CPU; the optimized module keeps them.
                model.to(device)
            report = partition_report(compiled)
            if report["fallback_ops"]:
                ops = ", ".join(f"{k} ×{v}" for k, v in report["fallback_ops"].items())
                log.note(f"tensorrt profile {p}: {report['tensorrt_blocks']} TensorRT block(s); in PyTorch: {ops}")
            profile_details.append(
                {"inputs": _jsonable(specs_kw), "partition": report, "build_seconds": round(seconds, 3)}
            )
            runners.append(_TensorRTRunner(compiled, specs_kw, cuda_graphs=cuda_graphs, dryrun=cfg.dryrun))
        log.details["tensorrt"] = {
            "compile_kwargs": _jsonable(kwargs),
            "cuda_graphs": cuda_graphs,
            "profiles": profile_details,
        }
        return runners

    def save(self, runners: list[Callable[..., Any]], path: Path) -> dict[str, Any] | None:
        if not runners or not all(isinstance(r, _TensorRTRunner) and not r.dryrun for r in runners):
            return None  # dry-run graphs are built again from the saved module on load
        trt = _import_torch_tensorrt()
        files = []
        for i, r in enumerate(runners):
            name = f"tensorrt_profile{i}.ep"
            trt.save(r.module, str(path / name), **save_kwargs([trt.Input(**kw) for kw in r.inputs]))
            files.append(name)
        return {"files": files, "cuda_graphs": runners[0].cuda_graphs}

    def load(self, path, meta, profiles, runtime, log):
        trt = _import_torch_tensorrt()
        files = meta["files"]
        if len(files) != len(profiles):
            raise ValueError(f"{str(path)!r}: {len(files)} TensorRT programs for {len(profiles)} profiles")
        runners = []
        for p, name in enumerate(files):
            module = trt.load(str(path / name)).module()
            inputs = _profile_inputs(profiles[p], runtime, p, log)  # kept for a later save
            runners.append(_TensorRTRunner(module, inputs, cuda_graphs=bool(meta.get("cuda_graphs"))))
        return runners
