"""`export_triton`: a Triton Inference Server model repository from an optimized module or a saved one.

    repo/
      README.md                    the server command and the versions the artifact was built with
      model_analyzer.yaml          a Triton Model Analyzer config (latency constraint, sweeps around the batch)
      <name>/config.pbtxt          checked against Triton's schema and the input profile at export time
      <name>/1/model.py + artifact/   (platform "python": the saved torchopt module, run by `triton_model.py`)
      <name>/1/model.plan          (platform "tensorrt_plan": a serialized TensorRT engine)
      <name>/1/model.pt2           (platform "torch_aoti": an AOTInductor package, Beta in Triton)
      <name>_preprocess/, <name>_ensemble/   with a PreprocessConfig: uint8 frames → preprocess → the model

Example::

    from torchopt.serve import export_triton
    export_triton(fast, "model_repository", name="resnet", latency_budget_ms=20)
    # then: torchopt serve model_repository --smoke 1000
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform as platform_module
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

import torchopt
from torchopt.config import check_type
from torchopt.engine import OptimizedModule
from torchopt.engine import load as load_optimized
from torchopt.inputs import InputSpec
from torchopt.kernels import PreprocessConfig
from torchopt.saving import check_saved
from torchopt.serve._common import full_batch_ms
from torchopt.serve.triton_config import (
    PLATFORMS,
    TensorSpec,
    TritonConfig,
    TritonConfigError,
    check_semantics,
    derive_queue_delay_us,
    model_config_text,
    parse_model_config,
    profile_dims,
)

__all__ = ["TritonExport", "damaged_models", "export_triton"]

ARTIFACT_DIR = "artifact"  # the saved torchopt module inside <name>/1/ (Python backend)
PLATFORM_FILES = {"tensorrt_plan": "model.plan", "torch_aoti": "model.pt2"}
FRAMES = "frames"  # the ensemble's input: raw uint8 camera frames


@dataclasses.dataclass
class TritonExport:
    """What `export_triton` wrote: the repository, the model names, the batching it chose and why."""

    repo: Path
    model: str
    platform: str
    max_batch_size: int
    queue_delay_us: int
    queue_delay_reason: str
    ensemble: str | None = None
    files: list[Path] = dataclasses.field(default_factory=list)

    def server_command(self) -> str:
        return f"torchopt serve {self.repo}"


@dataclasses.dataclass
class _Model:
    """One model directory to write: its config text and the files of its version folder."""

    name: str
    config: str
    version_files: dict[str, Path | str]  # name in <name>/1/ → a file or folder to copy, or text to write
    warmup_files: dict[str, bytes] = dataclasses.field(default_factory=dict)  # name in <name>/warmup/ → bytes


def _load_source(source: Any) -> tuple[OptimizedModule, Path | None]:
    if isinstance(source, OptimizedModule):
        return source, None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_dir():
            raise ValueError(f"source {str(path)!r} is not a directory written by OptimizedModule.save")
        return load_optimized(path, device="cpu"), path
    raise TypeError(
        f"source must be an OptimizedModule or the directory of a saved one, got {type(source).__name__} {source!r}"
    )


def _batch_range(profiles: list[list[InputSpec]]) -> tuple[int, int, int]:
    """(min, opt, max) of dim 0 over all profiles (opt: the first profile's)."""
    lo = min(s.min[0] for p in profiles for s in p)
    hi = max(s.max[0] for p in profiles for s in p)
    return lo, profiles[0][0].opt[0], hi


def _auto_batch_result(report: dict[str, Any]) -> dict[str, Any] | None:
    for step in report.get("steps", []):
        if step.get("step") == "auto_batch" and "optimal_batch" in step.get("details", {}):
            return step["details"]["optimal_batch"]
    return None


def _measured_latency_ms(report: dict[str, Any], auto: dict[str, Any] | None, mbs: int) -> float | None:
    """A full batch's p99 (ms), which the queue delay adds to: the batch finder's at its batch, else the optimized
    module's p99 at the batch it was measured at; scaled to `mbs` (`full_batch_ms`, as Ray Serve's plan scales it)."""
    if auto is not None:
        return full_batch_ms(float(auto["latency_ms"]), int(auto["size"]), mbs)
    after = report.get("latency_after")
    if not after:
        return None
    return full_batch_ms(float(after.get("p99_ms") or after["p50_ms"]), after.get("batch_size") or 1, mbs)


def _output_specs(optimized: OptimizedModule, names: Sequence[str] | None) -> tuple[list[TensorSpec], str]:
    """The model's outputs as Triton tensors (dims: -1 where two probe shapes disagree) and their structure."""
    profile = optimized.profiles[0]
    device = optimized.runtime.device
    low = [s.example("min", device, seed=0)[:1] for s in profile]
    high = [s.example("max", device, seed=1)[: min(2, s.max[0])] for s in profile]
    with torch.inference_mode():
        outs = [optimized.call_flat(*xs) for xs in (low, high)]
    if isinstance(outs[0], torch.Tensor):
        pairs, default = [(outs[0], outs[1])], ["output"]
    elif isinstance(outs[0], dict):
        pairs, default = [(outs[0][k], outs[1][k]) for k in outs[0]], [str(k) for k in outs[0]]
    elif isinstance(outs[0], (tuple, list)):
        pairs, default = list(zip(outs[0], outs[1], strict=True)), [f"output_{i}" for i in range(len(outs[0]))]
    else:
        raise TypeError(
            f"the model returns a {type(outs[0]).__name__}; Triton needs a tensor, or a tuple/list/dict of tensors"
        )
    if names is not None and len(names) != len(pairs):
        raise ValueError(f"output_names has {len(names)} names, but the model returns {len(pairs)} outputs")
    specs = []
    for name, (a, b) in zip(names or default, pairs, strict=True):
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            raise TypeError(f"output {name!r} is not a batched tensor (dim 0 = batch); Triton cannot split it")
        dims = tuple(-1 if x != y else x for x, y in zip(a.shape[1:], b.shape[1:], strict=True))
        specs.append(TensorSpec(name, str(a.dtype).removeprefix("torch."), dims))
    return specs, type(outs[0]).__name__


def _instance_kind(config: TritonConfig, platform: str, optimized: OptimizedModule) -> str:
    if config.instance_kind != "auto":
        return config.instance_kind
    if platform == "tensorrt_plan":
        return "gpu"
    kind = "gpu" if optimized.runtime.device.type == "cuda" else "cpu"
    if kind == "cpu" and config.gpus is not None:
        raise ValueError(
            f"TritonConfig.gpus={config.gpus} places gpu instances, but the module was optimized on"
            f" {optimized.runtime.device} (instance_kind 'auto' -> cpu); optimize on CUDA or set instance_kind='gpu'"
        )
    return kind


def _checked(text: str, where: str, inputs, batch: tuple[int, int] | None, platform: str) -> str:
    proto = parse_model_config(text, where)
    check_semantics(proto, where, inputs=inputs, profile_batch=batch, platform=platform)
    return text


def _platform_artifact(platform: str, artifact: Any) -> Path:
    if artifact is None:
        raise ValueError(
            f"platform {platform!r} needs artifact=<path to the {PLATFORM_FILES[platform]} file> (the serialized"
            " engine / AOTInductor package built from this module)"
        )
    check_type("artifact", artifact, (str, os.PathLike))
    path = Path(artifact)
    if not path.is_file():
        raise ValueError(f"artifact {str(path)!r} does not exist or is not a file")
    return path


def _preprocess_models(
    name: str, spec: InputSpec, pre: PreprocessConfig, frame_size, mbs: int, config: TritonConfig, kind: str, outputs
) -> list[_Model]:
    """The preprocessing model (uint8 frames → the model's input) and the ensemble chaining it to `name`."""
    frames, model_input, size = _frame_tensors(spec, pre, frame_size)
    pre_name, ens_name = f"{name}_preprocess", f"{name}_ensemble"
    pre_text = model_config_text(
        name=pre_name,
        platform="python",
        max_batch_size=mbs,
        inputs=[frames],
        outputs=[model_input],
        config=config,
        queue_delay_us=0,
        instance_kind=kind,
        parameters={
            "torchopt_role": "preprocess",
            "preprocess": json.dumps(pre.to_dict()),
            "size": json.dumps(list(size)),
            "threads": str(config.threads),
        },
    )
    pre_text = _checked(pre_text, f"{pre_name}/config.pbtxt", [frames], None, "python")
    ens_text = model_config_text(
        name=ens_name,
        platform="ensemble",
        max_batch_size=mbs,
        inputs=[frames],
        outputs=outputs,
        config=config,
        queue_delay_us=0,
        instance_kind=kind,
    )
    ens_text += _ensemble_steps(pre_name, name, spec.name, outputs)
    ens_text = _checked(ens_text, f"{ens_name}/config.pbtxt", [frames], None, "ensemble")
    return [
        _Model(pre_name, pre_text, {"model.py": Path(__file__).with_name("triton_model.py")}),
        _Model(ens_name, ens_text, {}),
    ]


def _frame_tensors(
    spec: InputSpec, pre: PreprocessConfig, frame_size: tuple[int, int] | None
) -> tuple[TensorSpec, TensorSpec, tuple[int, ...]]:
    """The ensemble's uint8 frame input (-1 dims where `frame_size` is None), the model input the preprocessing
    writes, and the (H, W) it resizes to; ValueError unless the model's input is one static image."""
    if pre.dtype != spec.dtype:
        raise ValueError(f"preprocess dtype {pre.dtype!r} differs from the model input {spec.name!r} ({spec.dtype})")
    chw = spec.opt[1:]
    if len(chw) != 3 or any(spec.min[d] != spec.max[d] for d in range(1, 4)):
        raise ValueError(
            f"a preprocessing ensemble needs a static image input (N, 3, H, W) or (N, H, W, 3); input"
            f" {spec.name!r} has min {spec.min} max {spec.max}"
        )
    size = chw[1:3] if pre.layout == "NCHW" else chw[0:2]
    h, w = (-1, -1) if frame_size is None else frame_size
    frame_dims = (h, w, 3) if not pre.is_yuv else ((h * 3 // 2 if h > 0 else -1), w)
    return TensorSpec(FRAMES, "uint8", frame_dims), TensorSpec(spec.name, spec.dtype, tuple(chw)), tuple(size)


def _ensemble_steps(pre_name: str, name: str, input_name: str, outputs: Sequence[TensorSpec]) -> str:
    """frames → `pre_name` → "preprocessed" → `name`'s input → its outputs, as ensemble_scheduling text."""
    out_map = " ".join(f"output_map {{ key: {json.dumps(o.name)} value: {json.dumps(o.name)} }}" for o in outputs)
    return (
        "ensemble_scheduling { step [\n"
        f'  {{ model_name: "{pre_name}" model_version: -1 input_map {{ key: "{FRAMES}" value: "{FRAMES}" }}'
        f' output_map {{ key: "{input_name}" value: "preprocessed" }} }},\n'
        f'  {{ model_name: "{name}" model_version: -1 input_map {{ key: "{input_name}" value: "preprocessed" }}'
        f" {out_map} }}\n] }}\n"
    )


def _analyzer_yaml(repo: Path, export: TritonExport, config: TritonConfig, kind: str, batch_cap: int) -> str:
    """A Triton Model Analyzer config: sweeps around the chosen batch and instance count, the latency budget
    as a p99 constraint (batches never above the profile's `batch_cap`). Model Analyzer's perf_analyzer is not
    on PyPI: run it in NVIDIA's SDK container."""
    b = export.max_batch_size
    batches = sorted({max(1, b // 2), b, min(b * 2, batch_cap)})
    counts = sorted({1, config.instance_count, config.instance_count * 2})
    delays = sorted({0, export.queue_delay_us, max(100, export.queue_delay_us * 2)})
    doc: dict[str, Any] = {
        "model_repository": str(repo.resolve()),
        "profile_models": {
            export.model: {
                "model_config_parameters": {
                    "max_batch_size": batches,
                    "dynamic_batching": {"max_queue_delay_microseconds": delays},
                    "instance_group": [[{"kind": f"KIND_{kind.upper()}", "count": counts}]],
                },
                "parameters": {"concurrency": [1, 8, 32], "batch_sizes": [1]},
            }
        },
    }
    if config.latency_budget_ms is not None:
        doc["constraints"] = {"perf_latency_p99": {"max": config.latency_budget_ms}}
    return (
        "# Triton Model Analyzer (https://github.com/triton-inference-server/model_analyzer), written by torchopt\n"
        "# export-triton. Run it where perf_analyzer exists (NVIDIA's tritonserver SDK container).\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )


def _versions(platform: str) -> list[str]:
    lines = [
        f"- torchopt {torchopt.__version__}, torch {torch.__version__}, Python {platform_module.python_version()}",
    ]
    if platform == "tensorrt_plan":
        try:
            import tensorrt

            trt = tensorrt.__version__
        except ImportError:
            trt = "unknown (tensorrt not importable at export)"
        lines.append(
            f"- TensorRT {trt}: a TensorRT plan only loads under this same TensorRT version (pick the tritonserver"
            " container release that ships it)"
        )
    if platform == "torch_aoti":
        lines.append("- torch_aoti is Beta in Triton's PyTorch backend (26.03+); its batching above 1 is incomplete")
    return lines


def _readme(export: TritonExport, platform: str, queue_reason: str) -> str:
    models = [export.model] + ([export.ensemble, f"{export.model}_preprocess"] if export.ensemble else [])
    return "\n".join(
        [
            "# Triton model repository (written by `torchopt export-triton`)",
            "",
            f"Models: {', '.join(models)}. Platform of `{export.model}`: `{platform}`.",
            f"max_batch_size {export.max_batch_size}; dynamic batcher max queue delay {export.queue_delay_us} µs"
            f" ({queue_reason}).",
            "",
            "Serve it:",
            "",
            "    torchopt serve .                  # the tritonserver bundled with nvidia-pytriton (Python backend)",
            "    torchopt serve . --smoke 1000     # plus 1000 checked requests, latency and batch statistics",
            "    tritonserver --model-repository $PWD   # in NVIDIA's container (all backends)",
            "",
            "Built with:",
            "",
            *_versions(platform),
            "",
        ]
    )


def export_triton(
    source: OptimizedModule | str | os.PathLike,
    repo: str | os.PathLike,
    *,
    name: str = "model",
    platform: str = "python",
    artifact: str | os.PathLike | None = None,
    preprocess: PreprocessConfig | None = None,
    frame_size: tuple[int, int] | None = None,
    output_names: Sequence[str] | None = None,
    overwrite: bool = False,
    config: TritonConfig | None = None,
    **options: Any,
) -> TritonExport:
    """Write a Triton model repository for `source` (an OptimizedModule, or the directory of a saved one).

    platform: "python" (the saved torchopt module run by Triton's Python backend: works everywhere, CPU
        included), "tensorrt_plan" or "torch_aoti" (then `artifact` is the engine / AOTInductor package file;
        `source` gives its input profile and output shapes).
    preprocess: also write `<name>_preprocess` (uint8 frames → the model's input, `torchopt.kernels.preprocess`)
        and the ensemble `<name>_ensemble`, so clients send camera frames; `frame_size` (H, W) fixes the frame
        dims (None: any size).
    config / options: `TritonConfig` (batching, instances, warm-up, CUDA graphs), as an object or its fields.

    Every config.pbtxt is parsed against Triton's schema and checked against the input profile before anything
    is written; an existing model folder is only replaced with `overwrite=True`.
    """
    config = TritonConfig.merge(config, where="export_triton options", **options)
    repo = _checked_arguments(name, platform, preprocess, repo)
    optimized, saved_path = _load_source(source)
    profiles = optimized.profiles
    if preprocess is not None and len(profiles[0]) != 1:
        raise ValueError(f"a preprocessing ensemble needs a model with one image input, got {len(profiles[0])}")
    batching = _batching(config, platform, profiles, optimized.report.to_dict())
    kind = _instance_kind(config, platform, optimized)
    outputs, _ = _output_specs(optimized, output_names)
    text, warm_data = _model_config(name, platform, profiles, outputs, config, batching, kind)
    if platform == "python":
        version_files: dict[str, Path | str] = {"model.py": Path(__file__).with_name("triton_model.py")}
        version_files[ARTIFACT_DIR] = saved_path if saved_path is not None else optimized
    else:
        version_files = {PLATFORM_FILES[platform]: _platform_artifact(platform, artifact)}
    models = [_Model(name, text, version_files, dict(warm_data.values()))]
    mbs = batching.max_batch_size
    export = TritonExport(repo, name, platform, mbs, batching.queue_delay_us, batching.queue_delay_reason)
    if preprocess is not None:
        models += _preprocess_models(name, profiles[0][0], preprocess, frame_size, mbs, config, kind, outputs)
        export.ensemble = f"{name}_ensemble"
    _write(repo, models, overwrite, export)
    for file_name, content in (
        ("model_analyzer.yaml", _analyzer_yaml(repo, export, config, kind, batching.profile_max)),
        ("README.md", _readme(export, platform, batching.queue_delay_reason)),
    ):
        (repo / file_name).write_text(content)
        export.files.append(repo / file_name)
    return export


def _checked_arguments(name: Any, platform: Any, preprocess: Any, repo: Any) -> Path:
    check_type("name", name, str)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a folder name for the model (no '/', not hidden), got {name!r}")
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    if preprocess is not None:
        check_type("preprocess", preprocess, PreprocessConfig)
    check_type("repo", repo, (str, os.PathLike))
    return Path(repo)


@dataclasses.dataclass
class _Batching:
    """The batching an export chose: the batch range of the profile, max_batch_size, queue delay, preferred sizes."""

    profile_min: int
    profile_opt: int
    profile_max: int
    max_batch_size: int
    queue_delay_us: int
    queue_delay_reason: str
    preferred: list[int]


def _batching(config: TritonConfig, platform: str, profiles: list[list[InputSpec]], report: dict) -> _Batching:
    """max_batch_size (the option, else the batch finder's result, else the profile max), the queue delay from the
    latency budget and the measured latency, and preferred batch sizes only where they pay."""
    lo, opt, hi = _batch_range(profiles)
    auto = _auto_batch_result(report)  # a loaded module's report is the one saved, measurements included
    default_mbs = int(auto["size"]) if auto is not None else hi
    mbs = config.max_batch_size if config.max_batch_size is not None else default_mbs
    delay, delay_reason = derive_queue_delay_us(config, _measured_latency_ms(report, auto, mbs))
    preferred = config.preferred_batch_sizes
    several_plans = platform == "tensorrt_plan" and len(profiles) > 1
    if preferred and not several_plans:
        raise TritonConfigError(
            "preferred_batch_sizes only pays for TensorRT plans with several profiles (Triton's batcher guide: it"
            f" 'should not be used for most models'); this is platform {platform!r} with {len(profiles)} profile(s)"
        )
    if preferred is None and several_plans:
        preferred = sorted({p[0].opt[0] for p in profiles if p[0].opt[0] <= mbs})
    if config.cuda_graphs and platform != "tensorrt_plan":
        raise TritonConfigError(
            f"cuda_graphs=True: optimization.cuda.graphs is only read by the TensorRT backend, not by {platform!r}"
        )
    return _Batching(lo, opt, hi, mbs, delay, delay_reason, list(preferred or ()))


def _model_config(
    name: str,
    platform: str,
    profiles: list[list[InputSpec]],
    outputs: list[TensorSpec],
    config: TritonConfig,
    batching: _Batching,
    kind: str,
) -> tuple[str, dict[str, tuple[str, bytes]]]:
    """The model's config.pbtxt, checked against Triton's schema and the profile, and its warm-up sample files."""
    inputs = profile_dims(profiles[0], profiles[1:])
    mbs = batching.max_batch_size
    warm_inputs = [TensorSpec(s.name, s.dtype, tuple(s.opt[1:])) for s in profiles[0]]
    warm_data = _warmup_samples(profiles[0]) if config.warmup else {}
    parameters = {"threads": str(config.threads)}
    if platform == "python":
        parameters.update(torchopt_role="model", artifact=ARTIFACT_DIR)
    text = model_config_text(
        name=name,
        platform=platform,
        max_batch_size=mbs,
        inputs=inputs,
        outputs=outputs,
        config=config,
        queue_delay_us=batching.queue_delay_us,
        instance_kind=kind,
        preferred_batch_sizes=batching.preferred,
        warmup_batch=min(batching.profile_opt, mbs) if config.warmup else None,
        warmup_inputs=warm_inputs,
        warmup_files={name: file_name for name, (file_name, _) in warm_data.items()},
        parameters=parameters,
    )
    bounds = (batching.profile_min, batching.profile_max)
    return _checked(text, f"{name}/config.pbtxt", inputs, bounds, platform), warm_data


def _warmup_samples(profile: list[InputSpec]) -> dict[str, tuple[str, bytes]]:
    """Input name -> (file name, raw bytes of one sample at the profile's opt) for the integer and bool inputs.
    Triton's random_data fills them with any value of the type, and token ids out of an embedding's range make
    the warm-up request fail, which crashed tritonserver 2.51 while it loaded the model (exit -11). The sample
    comes from the input's value_range, like every example input torchopt makes."""
    return {
        s.name: (f"input_{i}", s.example("opt", seed=0)[0].contiguous().numpy().tobytes())
        for i, s in enumerate(profile)
        if not s.torch_dtype.is_floating_point
    }


def _write(repo: Path, models: list[_Model], overwrite: bool, export: TritonExport) -> None:
    """Write every model folder into a staging folder first, then move them into place (nothing half-written)."""
    existing = [m.name for m in models if (repo / m.name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{repo}: model folders {existing} exist already; pass overwrite=True to replace them")
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".torchopt-export-", dir=repo))
    try:
        for model in models:
            version = staging / model.name / "1"
            version.mkdir(parents=True)
            (staging / model.name / "config.pbtxt").write_text(model.config)
            for file_name, data in model.warmup_files.items():
                (staging / model.name / "warmup").mkdir(exist_ok=True)
                (staging / model.name / "warmup" / file_name).write_bytes(data)
            for file_name, content in model.version_files.items():
                target = version / file_name
                if isinstance(content, OptimizedModule):
                    content.save(target)
                elif isinstance(content, Path) and content.is_dir():
                    shutil.copytree(content, target)
                elif isinstance(content, Path):
                    shutil.copyfile(content, target)
                else:
                    target.write_text(content)
        for model in models:
            if (repo / model.name).exists():
                shutil.rmtree(repo / model.name)
            (staging / model.name).rename(repo / model.name)
            export.files.append(repo / model.name / "config.pbtxt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def damaged_models(repo: Path) -> dict[str, str]:
    """{model name: what is wrong} for each model of the repository whose saved torchopt module (the Python
    backend's ``artifact``) is missing or damaged, found without loading any of them (`torchopt.saving.check_saved`).

    A server finds the same when it loads the model, but tritonserver 2.51 can abort on a Python model whose
    initialize fails (a boost lock_exception, exit -6, seen on a loaded machine), and the stub's error naming the
    file is lost with it: checked here, the error always names the file.
    """
    problems: dict[str, str] = {}
    for config_file in sorted(Path(repo).glob("*/config.pbtxt")):
        model_dir = config_file.parent
        params = parse_model_config(config_file.read_text(), str(config_file)).parameters
        role = params["torchopt_role"].string_value if "torchopt_role" in params else None
        if role != "model":
            continue
        artifact = params["artifact"].string_value
        for version in sorted(d for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()):
            try:
                check_saved(version / artifact)
            except ValueError as exc:  # DamagedSaveError included
                problems[model_dir.name] = str(exc)
    return problems
