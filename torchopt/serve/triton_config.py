"""Triton Inference Server model configurations: the options (one dataclass), the `config.pbtxt` writer, the
check against Triton's real schema and torchopt's semantic checks.

Every config this module writes is parsed with `google.protobuf.text_format` into `tritonclient`'s
`model_config_pb2.ModelConfig` (the schema the server itself reads), so a misspelled field, a wrong enum or a
wrong type fails at export time, never at the user's server. The semantic checks add what the schema cannot
see: `max_batch_size` within the engine's profile, `dims` equal to the profile without dim 0 (``-1`` where
min ≠ max), `optimization.cuda.graphs` only for TensorRT plans (only the TensorRT backend reads it), and
`preferred_batch_size` only for TensorRT plans with several profiles (Triton's batcher guide: it "should not be
used for most models").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from torchopt.config import ConfigBase, check_choice, check_positive, check_type
from torchopt.inputs import InputSpec
from torchopt.serve._common import budget_wait_ms

__all__ = [
    "PLATFORMS",
    "TRITON_DTYPES",
    "TensorSpec",
    "TritonConfig",
    "TritonConfigError",
    "check_semantics",
    "derive_queue_delay_us",
    "model_config_text",
    "parse_model_config",
    "profile_dims",
]

# torchopt dtype name → Triton's DataType enum name.
TRITON_DTYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int16": "TYPE_INT16",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
# What export_triton can write: a Python-backend model (runs the saved torchopt artifact anywhere, CPU
# included), a serialized TensorRT engine, an AOTInductor package (Triton's PyTorch backend, Beta).
PLATFORMS = ("python", "tensorrt_plan", "torch_aoti")
INSTANCE_KINDS = ("auto", "cpu", "gpu")
QUEUE_ACTIONS = ("reject", "delay")


class TritonConfigError(ValueError):
    """A model configuration that Triton's schema rejects or that contradicts the model's input profile."""


@dataclasses.dataclass
class TritonConfig(ConfigBase):
    """How one model is served by Triton (the options of `export_triton` and `torchopt export-triton`).

    max_batch_size: largest batch Triton's dynamic batcher forms (None: the profile's batch max, or the batch
        finder's result when the recipe ran auto_batch); above the profile's max is refused.
    latency_budget_ms: end-to-end latency target; the queue delay becomes the budget minus the measured
        latency at the batch the server will form, and the Model Analyzer config gets it as a p99 constraint.
    max_queue_delay_us: the dynamic batcher's wait for more requests, in microseconds (None: derived from
        latency_budget_ms, else 0, Triton's default: batches still form from requests queued while the model
        runs).
    preferred_batch_sizes: batch sizes the batcher aims for; only for TensorRT plans with several profiles
        (None: those profiles' opt batches there, nothing elsewhere).
    queue_timeout_us: requests waiting longer than this get `queue_timeout_action` (None: no queue policy).
    queue_timeout_action: "reject" or "delay" a request that waited `queue_timeout_us`.
    max_queue_size: requests allowed to wait; more are rejected at once (None: unbounded).
    instance_kind: "cpu", "gpu" or "auto" (gpu for TensorRT plans, else where the artifact was optimized).
    instance_count: model instances per device.
    gpus: GPU indices for gpu instances, `instance_count` on each (None: all the server's GPUs); e.g. [0, 1]
        with count 1 serves one instance per GPU of a two-GPU host.
    warmup: run the model at the optimal batch while loading, so the first request is not the slow one.
    cuda_graphs: TensorRT plans only: capture the engine in CUDA graphs (one per profile's opt batch).
    threads: intra-op threads per Python-backend instance (a server on a loaded CPU is slower with more).
    """

    max_batch_size: int | None = None
    latency_budget_ms: float | None = None
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: list[int] | None = None
    queue_timeout_us: int | None = None
    queue_timeout_action: str = "reject"
    max_queue_size: int | None = None
    instance_kind: str = "auto"
    instance_count: int = 1
    gpus: list[int] | None = None
    warmup: bool = True
    cuda_graphs: bool = False
    threads: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_batch_size", "instance_count", "threads"):
            if getattr(self, name) is not None:
                check_positive(f"TritonConfig.{name}", getattr(self, name))
        for name in ("max_queue_delay_us", "queue_timeout_us", "max_queue_size"):
            if getattr(self, name) is not None:
                check_positive(f"TritonConfig.{name}", getattr(self, name), allow_zero=True)
        if self.latency_budget_ms is not None:
            check_positive("TritonConfig.latency_budget_ms", self.latency_budget_ms, types_=(int, float))
        for name in ("preferred_batch_sizes", "gpus"):
            value = getattr(self, name)
            if value is not None:
                check_type(f"TritonConfig.{name}", value, (list, tuple), "a list of ints")
                for i, v in enumerate(value):
                    check_positive(f"TritonConfig.{name}[{i}]", v, allow_zero=name == "gpus")
                setattr(self, name, list(value))
        check_choice("TritonConfig.queue_timeout_action", self.queue_timeout_action, QUEUE_ACTIONS)
        check_choice("TritonConfig.instance_kind", self.instance_kind, INSTANCE_KINDS)
        if self.gpus is not None:
            if len(set(self.gpus)) != len(self.gpus):
                raise ValueError(f"TritonConfig.gpus lists a GPU twice: {self.gpus}; use instance_count for more")
            if self.instance_kind == "cpu":
                raise ValueError(f"TritonConfig.gpus={self.gpus} places gpu instances, but instance_kind is 'cpu'")
        check_type("TritonConfig.warmup", self.warmup, bool)
        check_type("TritonConfig.cuda_graphs", self.cuda_graphs, bool)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of a Triton model: its name, torchopt dtype name and dims without the batch dim."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    def to_pbtxt(self) -> str:
        if self.dtype not in TRITON_DTYPES:
            raise TritonConfigError(
                f"tensor {self.name!r} has dtype {self.dtype!r}, which Triton cannot carry; expected one of"
                f" {', '.join(TRITON_DTYPES)}"
            )
        dims = ", ".join(str(d) for d in self.dims)
        return f"{{ name: {_q(self.name)} data_type: {TRITON_DTYPES[self.dtype]} dims: [ {dims} ] }}"


def profile_dims(specs: Sequence[InputSpec], profiles: Sequence[Sequence[InputSpec]] = ()) -> list[TensorSpec]:
    """Each input's Triton dims: the profile without dim 0, ``-1`` where min ≠ max in any profile."""
    out = []
    for i, spec in enumerate(specs):
        variants = [spec, *(p[i] for p in profiles)]
        dims = tuple(
            -1 if any(v.min[d] != v.max[d] or v.min[d] != spec.min[d] for v in variants) else spec.min[d]
            for d in range(1, len(spec.min))
        )
        out.append(TensorSpec(spec.name, spec.dtype, dims))
    return out


def derive_queue_delay_us(config: TritonConfig, measured_ms: float | None) -> tuple[int, str]:
    """The dynamic batcher's max queue delay (µs) and why: explicit, derived from the budget and a full batch's
    measured p99 (`torchopt.serve._common.budget_wait_ms`, the rule Ray Serve's batch wait uses too), or 0."""
    if config.max_queue_delay_us is not None:
        return config.max_queue_delay_us, "given"
    if config.latency_budget_ms is None:
        return 0, "no latency budget: Triton's default 0 (batches form from requests queued while the model runs)"
    if measured_ms is None:
        raise TritonConfigError(
            f"latency_budget_ms={config.latency_budget_ms} needs the model's measured latency to derive the queue"
            " delay, and this artifact's report has none; give max_queue_delay_us instead"
        )
    try:
        wait_ms, why = budget_wait_ms(config.latency_budget_ms, measured_ms)
    except ValueError as exc:
        raise TritonConfigError(f"latency_budget_ms={config.latency_budget_ms}: {exc}") from None
    return int(wait_ms * 1000), why


def _q(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid protobuf text string literal


def model_config_text(
    *,
    name: str,
    platform: str,
    max_batch_size: int,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    config: TritonConfig,
    queue_delay_us: int,
    instance_kind: str,
    preferred_batch_sizes: Sequence[int] = (),
    warmup_batch: int | None = None,
    warmup_inputs: Sequence[TensorSpec] = (),
    warmup_files: dict[str, str] | None = None,
    parameters: dict[str, str] | None = None,
) -> str:
    """The config.pbtxt text of one model (not yet checked: see `parse_model_config` and `check_semantics`).

    `warmup_inputs` carry the concrete dims (the profile's opt, without the batch) the warm-up request uses;
    `warmup_files` maps an input name to the file in the model's ``warmup/`` folder holding its warm-up sample
    (others get Triton's random data).
    """
    lines = [f"name: {_q(name)}", *_platform_lines(platform), f"max_batch_size: {max_batch_size}"]
    lines.append("input [\n  " + ",\n  ".join(t.to_pbtxt() for t in inputs) + "\n]")
    lines.append("output [\n  " + ",\n  ".join(t.to_pbtxt() for t in outputs) + "\n]")
    if platform == "ensemble":
        return "\n".join(lines) + "\n"
    lines.append(_dynamic_batching(config, queue_delay_us, preferred_batch_sizes))
    lines.append(_instance_group(config, instance_kind))
    if warmup_batch is not None:
        lines.append(_warmup(warmup_batch, warmup_inputs, warmup_files or {}))
    if platform == "tensorrt_plan" and config.cuda_graphs:
        lines.append(_cuda_graphs(warmup_inputs, preferred_batch_sizes or [warmup_batch or max_batch_size]))
    for key, value in (parameters or {}).items():
        lines.append(f"parameters {{ key: {_q(key)} value {{ string_value: {_q(value)} }} }}")
    return "\n".join(lines) + "\n"


def _platform_lines(platform: str) -> list[str]:
    if platform == "python":
        return ['backend: "python"']
    if platform == "tensorrt_plan":
        return ['backend: "tensorrt"', 'platform: "tensorrt_plan"']
    if platform == "torch_aoti":
        return ['backend: "pytorch"', 'platform: "torch_aoti"']
    if platform == "ensemble":
        return ['platform: "ensemble"']
    raise TritonConfigError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")


def _dynamic_batching(config: TritonConfig, queue_delay_us: int, preferred: Sequence[int]) -> str:
    batching = [f"  max_queue_delay_microseconds: {queue_delay_us}"]
    if preferred:
        batching.append(f"  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]")
    if config.queue_timeout_us is not None or config.max_queue_size is not None:
        policy = []
        if config.queue_timeout_us is not None:
            policy += [
                f"    timeout_action: {config.queue_timeout_action.upper()}",
                f"    default_timeout_microseconds: {config.queue_timeout_us}",
            ]
        if config.max_queue_size is not None:
            policy.append(f"    max_queue_size: {config.max_queue_size}")
        batching.append("  default_queue_policy {\n" + "\n".join(policy) + "\n  }")
    return "dynamic_batching {\n" + "\n".join(batching) + "\n}"


def _instance_group(config: TritonConfig, instance_kind: str) -> str:
    group = [f"kind: KIND_{instance_kind.upper()}", f"count: {config.instance_count}"]
    if instance_kind == "gpu" and config.gpus is not None:
        group.append(f"gpus: [ {', '.join(str(g) for g in config.gpus)} ]")
    return "instance_group [ { " + " ".join(group) + " } ]"


def _warmup(batch: int, inputs: Sequence[TensorSpec], files: dict[str, str]) -> str:
    warm_inputs = " ".join(
        f"inputs {{ key: {_q(t.name)} value {{ data_type: {TRITON_DTYPES[t.dtype]}"
        f" dims: [ {', '.join(str(d) for d in t.dims)} ]"
        f" {f'input_data_file: {_q(files[t.name])}' if t.name in files else 'random_data: true'} }} }}"
        for t in inputs
    )
    return f'model_warmup [ {{ name: "batch_{batch}" batch_size: {batch} {warm_inputs} }} ]'


def _cuda_graphs(inputs: Sequence[TensorSpec], batch_sizes: Sequence[int]) -> str:
    # Each graph is captured at one shape: the batch and every input's opt dims (the warm-up's).
    shapes = " ".join(
        f"input {{ key: {_q(t.name)} value {{ dim: [ {', '.join(str(d) for d in t.dims)} ] }} }}" for t in inputs
    )
    specs = " ".join(f"graph_spec {{ batch_size: {b} {shapes} }}" for b in batch_sizes)
    return f"optimization {{ cuda {{ graphs: true {specs} }} }}"


def parse_model_config(text: str, where: str) -> Any:
    """`text` parsed into Triton's `ModelConfig` protobuf (the server's own schema); TritonConfigError naming
    `where` and the offending line otherwise. Needs `tritonclient[grpc]` (the `serve` extra)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ImportError(
            f"checking {where} against Triton's schema needs tritonclient ({exc}): pip install 'torchopt-infer[serve]'"
        ) from exc
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonConfigError(f"{where} does not match Triton's model configuration schema: {exc}") from None


def check_semantics(
    proto: Any, where: str, *, inputs: Sequence[TensorSpec], profile_batch: tuple[int, int] | None, platform: str
) -> None:
    """What the schema cannot check: batch vs the profile, dims vs the profile, features vs the platform.

    `profile_batch` is the (min, max) batch the artifact accepts; None for a model without a batch dim.
    """
    if profile_batch is not None:
        lo, hi = profile_batch
        if proto.max_batch_size > hi:
            raise TritonConfigError(
                f"{where}: max_batch_size {proto.max_batch_size} is above the batch max {hi} of the model's input"
                " profile; the engine would refuse larger batches. Use max_batch_size <= "
                f"{hi} or optimize with a larger batch range"
            )
        if lo > 1:
            raise TritonConfigError(
                f"{where}: the model's input profile starts at batch {lo}, but Triton's dynamic batcher sends"
                " batches from 1 up; optimize with a batch range starting at 1"
            )
    given = {t.name: t for t in proto.input}
    for spec in inputs:
        if spec.name not in given:
            raise TritonConfigError(f"{where}: input {spec.name!r} of the model's profile is missing")
        dims = tuple(given[spec.name].dims)
        if dims != spec.dims:
            raise TritonConfigError(
                f"{where}: input {spec.name!r} has dims {list(dims)}, but the profile without its batch dim is"
                f" {list(spec.dims)} (-1 where min != max)"
            )
    extra = sorted(set(given) - {s.name for s in inputs})
    if extra:
        raise TritonConfigError(f"{where}: inputs {extra} are not in the model's profile")
    if proto.optimization.cuda.graphs and platform != "tensorrt_plan":
        raise TritonConfigError(
            f"{where}: optimization.cuda.graphs is only read by the TensorRT backend, not by platform {platform!r}"
        )
    preferred = list(proto.dynamic_batching.preferred_batch_size)
    if any(b > proto.max_batch_size for b in preferred):
        raise TritonConfigError(
            f"{where}: preferred_batch_size {preferred} exceeds max_batch_size {proto.max_batch_size}"
        )
    for warm in proto.model_warmup:
        if warm.batch_size > max(proto.max_batch_size, 1):
            raise TritonConfigError(
                f"{where}: model_warmup batch {warm.batch_size} exceeds max_batch_size {proto.max_batch_size}"
            )
