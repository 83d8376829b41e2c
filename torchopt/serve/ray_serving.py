"""Scaling a saved torchopt model out on Ray: Ray Serve replicas (`ray_deployment`) and Ray Data batch
inference (`RayPredictor`).

Compiled models go wrong on Ray in three ways, each answered by what the saved artifact already holds:
every replica compiling again (replicas `torchopt.load` the saved module instead), variable batch sizes
recompiling (the input profiles cover batch 1..max; replicas warm up over the profile's points before they
take traffic) and guessed batch sizes (the batch cap is the profile's max, the wait is derived from the
measured latency and a budget, `ray_batch_size` runs `find_optimal_batch`).

`ray` is an optional extra (``pip install torchopt-infer[ray]``) imported only when a deployment is built;
`RayPredictor` itself needs no Ray import (Ray Data constructs it on its workers).

Example::

    from ray import serve
    from torchopt.serve import ray_deployment

    app = ray_deployment("resnet.torchopt", num_replicas=2, latency_budget_ms=50).bind()
    serve.run(app, route_prefix="/resnet")      # POST {"x": [[...]]} (one item) → {"outputs": ...}

    ds.map_batches(RayPredictor, **predictor_options("resnet.torchopt", concurrency=2))
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchopt.batch import find_optimal_batch
from torchopt.config import ConfigBase, check_positive, check_type
from torchopt.engine import OptimizedModule, load
from torchopt.inputs import WHICH, InputSpec
from torchopt.kernels import PreprocessConfig, preprocess
from torchopt.runtime import map_tensors
from torchopt.saving import read_meta
from torchopt.serve._common import budget_wait_ms, full_batch_ms, split_output

__all__ = [
    "RayPredictor",
    "RayServeConfig",
    "RayServePlan",
    "ServedModel",
    "plan_ray_serving",
    "predictor_options",
    "ray_batch_size",
    "ray_deployment",
]

# Ray Serve's own default wait for a batch to fill; used when the artifact holds no latency measurement.
DEFAULT_BATCH_WAIT_S = 0.01
# A request waits at most this long for a batch to fill however slow the model: beyond it, queueing for a full
# batch costs more latency than batching saves (and a budget makes the wait explicit anyway).
MAX_DERIVED_WAIT_S = 0.1
# One batch runs while the next one fills: a replica accepts two batches' worth of requests. Fewer and the
# batch can never fill (Ray Serve's max_ongoing_requests, default 5, caps the batch size per replica).
BATCHES_IN_FLIGHT = 2


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass
class RayServeConfig(ConfigBase):
    """Every option of `ray_deployment`.

    max_batch_size: the most requests one model call takes; default (None) the profile's max batch, and never
        above it (the artifact was compiled for 1..max).
    batch_wait_timeout_s: how long the first request of a batch waits for more; default (None) derived from
        `latency_budget_ms` and the latency measured when the model was optimized (see `plan_ray_serving`).
    latency_budget_ms: the latency a request may take (queueing + one full batch); None = no budget.
    num_replicas: replicas started (ignored when `autoscaling` is given).
    num_cpus / num_gpus: Ray resources per replica; a replica with a GPU runs the model on CUDA. Torch's
        intra-op threads are pinned to `num_cpus` (at least 1): unpinned replicas fight over the cores.
    autoscaling: Ray Serve's `autoscaling_config` (min_replicas, max_replicas, ...); its
        `target_ongoing_requests` defaults to the batch size, so replicas are added when batches are full,
        not at Ray's default of 2 requests.
    name: the deployment's name.
    constructor_retries: how many failed replica starts Ray allows before it marks the deployment failed
        (at least 1; a missing artifact fails the same way every time, so Ray's default of 20 only delays it).
    """

    max_batch_size: int | None = None
    batch_wait_timeout_s: float | None = None
    latency_budget_ms: float | None = None
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    autoscaling: dict[str, Any] | None = None
    name: str = "torchopt"
    constructor_retries: int = 3

    def __post_init__(self) -> None:
        if self.max_batch_size is not None:
            check_positive("max_batch_size", self.max_batch_size)
        if self.batch_wait_timeout_s is not None:
            check_positive("batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True, types_=(int, float))
        if self.latency_budget_ms is not None:
            check_positive("latency_budget_ms", self.latency_budget_ms, types_=(int, float))
        check_positive("num_replicas", self.num_replicas)
        check_positive("num_cpus", self.num_cpus, allow_zero=True, types_=(int, float))
        check_positive("num_gpus", self.num_gpus, allow_zero=True, types_=(int, float))
        if self.autoscaling is not None:
            check_type("autoscaling", self.autoscaling, dict, "Ray Serve's autoscaling_config as a dict")
        check_type("name", self.name, str)
        check_positive("constructor_retries", self.constructor_retries)


@dataclasses.dataclass
class RayServePlan:
    """What a deployment of an artifact uses and why: the batch cap, the wait, the requests a replica accepts."""

    path: str
    max_batch_size: int
    profile_max_batch: int
    batch_wait_timeout_s: float
    max_ongoing_requests: int
    reasons: list[str]

    def __str__(self) -> str:
        lines = [
            f"max_batch_size {self.max_batch_size}, batch_wait_timeout_s {self.batch_wait_timeout_s:.4f},"
            f" max_ongoing_requests {self.max_ongoing_requests}"
        ]
        return "\n".join([*lines, *(f"  {r}" for r in self.reasons)])


def _profile_max_batch(profiles: list[list[dict[str, Any]]]) -> tuple[int, int]:
    """The largest batch (dim 0 of the first input) any profile covers, and the profile's opt batch there."""
    best = (0, 0)
    for profile in profiles:
        spec = InputSpec.from_dict(profile[0])
        if spec.rank == 0:
            return 1, 1
        best = max(best, (spec.max[0], spec.opt[0]))
    return best


def _artifact_meta(path: str | os.PathLike) -> dict[str, Any]:
    check_type("saved_path", path, (str, os.PathLike), "the directory `OptimizedModule.save` wrote")
    if not Path(path).exists():
        raise FileNotFoundError(f"saved_path {os.fspath(path)!r} does not exist (save a model with fast.save(dir))")
    return read_meta(Path(path))


def derive_batch_wait_s(
    max_batch_size: int, opt_batch: int, latency_after: dict[str, Any] | None, latency_budget_ms: float | None
) -> tuple[float, str]:
    """The batch wait and why: with a budget, `budget_wait_ms` (the rule Triton's queue delay uses: budget minus
    two full batches' p99, the one in flight and the request's own); without one, the p50 of a full batch
    (waiting as long as a batch runs at most doubles a request's latency while letting batches form). A full
    batch's latency is the measured one at the opt batch scaled to the max (`full_batch_ms`, as the Triton export
    scales it)."""
    if not latency_after:
        if latency_budget_ms is None:
            return DEFAULT_BATCH_WAIT_S, f"no latency measured in the artifact: Ray's default {DEFAULT_BATCH_WAIT_S} s"
        wait = latency_budget_ms / 2e3
        return wait, f"no latency measured in the artifact: half the {latency_budget_ms} ms budget"
    p50, p99 = (full_batch_ms(latency_after[k], opt_batch, max_batch_size) for k in ("p50_ms", "p99_ms"))
    measured = f"a batch of {max_batch_size} ≈ p50 {p50:.2f} ms, p99 {p99:.2f} ms (measured at batch {opt_batch})"
    if latency_budget_ms is None:
        wait = min(p50 / 1e3, MAX_DERIVED_WAIT_S)
        return wait, f"no budget: the wait is one full batch's p50; {measured}"
    try:
        wait_ms, why = budget_wait_ms(latency_budget_ms, p99)
    except ValueError as exc:
        raise ValueError(
            f"latency_budget_ms={latency_budget_ms} cannot be met with max_batch_size={max_batch_size}: {measured}"
            f" ({exc})"
        ) from None
    return min(wait_ms / 1e3, MAX_DERIVED_WAIT_S), f"{why}; {measured}"


def plan_ray_serving(
    saved_path: str | os.PathLike, config: RayServeConfig | None = None, **overrides: Any
) -> RayServePlan:
    """The batch cap, wait and request limit a deployment of `saved_path` uses (reads only its meta.json).

    Example::

        print(plan_ray_serving("resnet.torchopt", latency_budget_ms=50))
    """
    cfg = RayServeConfig.merge(config, where="ray_deployment options", **overrides)
    meta = _artifact_meta(saved_path)
    profile_max, opt = _profile_max_batch(meta["profiles"])
    reasons = []
    if cfg.max_batch_size is None:
        size = profile_max
        reasons.append(f"max_batch_size: the profile's max batch {profile_max}")
    elif cfg.max_batch_size > profile_max:
        raise ValueError(
            f"max_batch_size={cfg.max_batch_size} is above the artifact's profile max batch {profile_max}"
            f" ({os.fspath(saved_path)!r} was compiled for batches 1..{profile_max}); give at most {profile_max}"
        )
    else:
        size = cfg.max_batch_size
        reasons.append(f"max_batch_size: given ({size}; profile max {profile_max})")
    if cfg.batch_wait_timeout_s is not None:
        wait = float(cfg.batch_wait_timeout_s)
        reasons.append("batch_wait_timeout_s: given")
    else:
        wait, why = derive_batch_wait_s(size, opt, meta["report"].get("latency_after"), cfg.latency_budget_ms)
        reasons.append(f"batch_wait_timeout_s: {why}")
    ongoing = BATCHES_IN_FLIGHT * size
    reasons.append(f"max_ongoing_requests: {BATCHES_IN_FLIGHT} batches of {size} (one runs while the next fills)")
    return RayServePlan(os.fspath(saved_path), size, profile_max, wait, ongoing, reasons)


# ------------------------------------------------------------------------------------------------ the model


def _to_tensor(value: Any, spec: InputSpec, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        try:
            tensor = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where} must be a (nested) list of numbers, an array or a tensor: {exc}") from None
    if tensor.is_floating_point() and not spec.torch_dtype.is_floating_point:
        raise TypeError(f"{where} must hold integers (the model takes {spec.dtype}), got {tensor.dtype}")
    return tensor.to(spec.torch_dtype)


class ServedModel:
    """A loaded artifact as a replica or a Ray Data worker uses it: load on a device, warm up over the
    profile's points, check a request's item, run a list of items as batches of one shape each.

    An *item* is one request's input without its batch dim: a tensor, an array or nested lists for a
    one-input model, else a mapping from each input's name to one.
    """

    def __init__(
        self, path: str | os.PathLike, device: torch.device | str | None = None, num_threads: int | None = None
    ):
        if not Path(path).exists():
            raise FileNotFoundError(
                f"torchopt artifact {os.fspath(path)!r} not found on {socket.gethostname()} (the path must be"
                " readable where the replica runs: a shared file system or a copy per node)"
            )
        if num_threads is not None:
            torch.set_num_threads(max(1, int(num_threads)))
        self.path = os.fspath(path)
        self.model: OptimizedModule = load(path, device=device)
        self.device = self.model.runtime.device
        self.specs: list[InputSpec] = self.model.profiles[0]
        self.max_batch = max(p[0].max[0] if p[0].rank else 1 for p in self.model.profiles)
        self.min_batch = min(p[0].min[0] if p[0].rank else 1 for p in self.model.profiles)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def warm_up(self) -> int:
        """Run every profile at each of its points (min, min+1, opt, max-1, max) so no request compiles or
        autotunes; returns the number of calls."""
        calls = 0
        with torch.no_grad():
            for profile in self.model.profiles:
                for which in WHICH:
                    self.model.call_flat(*[s.example(which, self.device, seed=0) for s in profile])
                    calls += 1
        return calls

    def item(self, value: Any) -> tuple[torch.Tensor, ...]:
        """One request's inputs as tensors (no batch dim), checked against the profiles."""
        if isinstance(value, Mapping):
            missing = [n for n in self.input_names if n not in value]
            extra = [k for k in value if k not in self.input_names]
            if missing or extra:
                raise ValueError(
                    f"request inputs {sorted(map(str, value))} do not match the model's inputs {self.input_names}"
                    + (f" (missing {missing})" if missing else "")
                    + (f" (unknown {extra})" if extra else "")
                )
            values = [value[n] for n in self.input_names]
        elif len(self.specs) == 1:
            values = [value]
        else:
            raise TypeError(
                f"the model takes {len(self.specs)} inputs {self.input_names}: send a mapping from each name to"
                f" one item, got {type(value).__name__}"
            )
        tensors = tuple(_to_tensor(v, s, f"input {s.name!r}") for v, s in zip(values, self.specs, strict=True))
        self._check_shapes(tensors)
        return tensors

    def _check_shapes(self, tensors: tuple[torch.Tensor, ...]) -> None:
        for profile in self.model.profiles:
            # The batch dim is the batcher's business (padded up to the profile's min): only the item dims count.
            if all(s.contains((s.min[0], *t.shape)) for s, t in zip(profile, tensors, strict=True)):
                return
        spec, tensor = self.specs[0], tensors[0]
        wanted = " or ".join(f"{[f'{s.name}: {s.min[1:]}..{s.max[1:]}' for s in p]}" for p in self.model.profiles)
        raise ValueError(
            f"input {spec.name!r}: one item has shape {tuple(tensor.shape)} (all inputs:"
            f" {[tuple(t.shape) for t in tensors]}); the profiles take items (shape without the batch dim) {wanted}"
        )

    def run(self, items: Sequence[tuple[torch.Tensor, ...]]) -> list[Any]:
        """Outputs, one per item, in order: items of one shape run together, in chunks of at most the profile's
        max batch, padded up to its min batch (padding rows are dropped)."""
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(tuple(t.shape) for t in item), []).append(i)
        results: list[Any] = [None] * len(items)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                outputs = self.run_batch([torch.stack(col) for col in zip(*(items[i] for i in chunk), strict=True)])
                for i, out in zip(chunk, outputs, strict=True):
                    results[i] = out
        return results

    def run_batch(self, inputs: Sequence[torch.Tensor]) -> list[Any]:
        """One model call on batched inputs (at most the profile's max rows); per-row outputs on the CPU."""
        n = inputs[0].shape[0]
        rows = max(n, self.min_batch)
        if rows > n:  # below the profile's min batch: repeat the last row, then drop the copies
            inputs = [torch.cat([t, t[-1:].expand(rows - n, *t.shape[1:])]) for t in inputs]
        with torch.no_grad():
            out = self.model.call_flat(*[t.to(self.device, non_blocking=True) for t in inputs])
        return split_output(map_tensors(lambda t: t.detach().cpu(), out), n, rows)


def to_json(out: Any) -> Any:
    """An output tree with tensors as nested lists (what an HTTP response carries)."""
    if isinstance(out, torch.Tensor):
        return out.tolist()
    if isinstance(out, dict):
        return {str(k): to_json(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [to_json(v) for v in out]
    return out


# ------------------------------------------------------------------------------------------------ Ray Serve


def _import_serve():
    try:
        from ray import serve
    except ImportError as exc:
        raise ImportError(
            f"Ray Serve is not installed ({exc}); install the extra: pip install 'torchopt-infer[ray]'"
        ) from None
    return serve


def ray_deployment(saved_path: str | os.PathLike, config: RayServeConfig | None = None, **overrides: Any):
    """A Ray Serve deployment whose replicas load `saved_path`, warm up, and serve batched requests.

    Each replica loads the artifact (no per-replica optimize; a compiled backend builds from the saved
    module), warms up over every profile point, then batches concurrent requests with `@serve.batch` (cap:
    `plan.max_batch_size`, wait: `plan.batch_wait_timeout_s`, see `plan_ray_serving`) and accepts
    `plan.max_ongoing_requests` so that batches can fill.

    HTTP: POST a JSON item (nested lists; for several inputs an object {input name: item}); the answer is
    ``{"outputs": ..., "batch_size": n, "replica": id}``, a bad item a 400 with ``{"error": ...}``. Handle:
    ``handle.remote(item)`` returns the same dict with tensors; ``handle.stats.remote()`` one replica's batch
    size histogram ({size: batches}). Options: `RayServeConfig` fields (max_batch_size, batch_wait_timeout_s,
    latency_budget_ms, num_replicas, num_cpus, num_gpus, autoscaling, name, constructor_retries).

    Example::

        app = ray_deployment("resnet.torchopt", num_replicas=2, num_gpus=1).bind()
        serve.run(app, route_prefix="/resnet")
    """
    cfg = RayServeConfig.merge(config, where="ray_deployment options", **overrides)
    plan = plan_ray_serving(saved_path, cfg)
    serve = _import_serve()
    replica_cls = _replica_class(serve, plan)
    options: dict[str, Any] = {
        "name": cfg.name,
        "max_ongoing_requests": plan.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_constructor_retry_count": cfg.constructor_retries,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = {"target_ongoing_requests": plan.max_batch_size, **cfg.autoscaling}
    else:
        options["num_replicas"] = cfg.num_replicas
    deployment = serve.deployment(replica_cls, **options)
    # Bound arguments travel to each replica: the path (absolute: a replica's working directory is its own), its
    # device and thread count.
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    threads = max(1, int(cfg.num_cpus))
    return _BoundDeployment(deployment, plan, (os.path.abspath(saved_path), device, threads))


def replica_failure(app_name: str) -> str | None:
    """Why application `app_name`'s deployment failed: the replica's own exception line (e.g. the artifact file
    that is missing), from Serve's status; None when none failed. `serve.run` only says that it failed."""
    serve = _import_serve()
    app = serve.status().applications.get(app_name)
    if app is None:
        return None
    for deployment in app.deployments.values():
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if deployment.status == "DEPLOY_FAILED" and lines:
            return lines[-1]  # Ray's message is the replica's traceback: its last line is the exception
    return None


class _BoundDeployment:
    """The Ray deployment with its plan; `.bind()` gives the application `serve.run` takes, and every other
    attribute (options, name, ...) is the deployment's."""

    def __init__(self, deployment: Any, plan: RayServePlan, args: tuple):
        self.deployment, self.plan, self._args = deployment, plan, args

    def bind(self) -> Any:
        return self.deployment.bind(*self._args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.deployment, name)


def _replica_class(serve: Any, plan: RayServePlan) -> type:
    """The replica class; built here because `@serve.batch` takes its cap and wait at class definition and
    `ray` is imported only when a deployment is made."""

    class TorchoptReplica:
        def __init__(self, path: str, device: str, num_threads: int):
            t0 = time.perf_counter()
            self.served = ServedModel(path, device=device, num_threads=num_threads)
            self.warmup_calls = self.served.warm_up()
            self.start_seconds = time.perf_counter() - t0
            self.batch_sizes: collections.Counter[int] = collections.Counter()  # size → batches (bounded by the cap)
            context = serve.get_replica_context()
            self.replica = context.replica_id.unique_id if context is not None else "local"

        async def __call__(self, request: Any) -> Any:
            http = hasattr(request, "json") and hasattr(request, "method")
            try:
                item = self.served.item(await request.json() if http else request)
            except (TypeError, ValueError) as exc:
                if not http:
                    raise
                from starlette.responses import JSONResponse  # comes with ray[serve]

                return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=400)
            output, size = await self.predict(item)
            answer = {"outputs": output, "batch_size": size, "replica": self.replica}
            return {**answer, "outputs": to_json(output)} if http else answer

        @serve.batch(max_batch_size=plan.max_batch_size, batch_wait_timeout_s=plan.batch_wait_timeout_s)
        async def predict(self, items: list[tuple[torch.Tensor, ...]]) -> list[tuple[Any, int]]:
            self.batch_sizes[len(items)] += 1
            return [(out, len(items)) for out in self.served.run(items)]

        def stats(self) -> dict[str, Any]:
            return {
                "replica": self.replica,
                "batch_sizes": dict(self.batch_sizes),
                "warmup_calls": self.warmup_calls,
                "start_seconds": self.start_seconds,
            }

    return TorchoptReplica


# ------------------------------------------------------------------------------------------------ Ray Data


class RayPredictor:
    """A callable class for `Dataset.map_batches`: loads the artifact once per worker, runs each batch.

    A batch is a dict of numpy arrays (Ray Data's default) or a pandas DataFrame; each model input is read
    from the column of its name (a one-input model also takes a batch with a single column, e.g. Ray's
    ``"data"``). The result is a dict of numpy arrays: the output under `output_column` (a tuple's outputs as
    ``output_0, output_1, ...``, a dict's as ``output_<key>``) next to every column that is not an input (ids
    pass through). Batches larger than the profile's max batch run in chunks.

    preprocess: `torchopt.kernels.preprocess` options (a dict or a `PreprocessConfig`) applied to the input
        column, which then holds uint8 (N, H, W, 3) images; `image_size` (default the input's H, W) is the
        size they are resized to.

    Example::

        ds.map_batches(RayPredictor, batch_size=64, concurrency=2, fn_constructor_kwargs={"path": "m.torchopt"})
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | None = None,
        output_column: str = "output",
        preprocess: dict[str, Any] | PreprocessConfig | None = None,
        image_size: int | tuple[int, int] | None = None,
        num_threads: int | None = None,
    ):
        check_type("output_column", output_column, str)
        self.served = ServedModel(path, device=device or _worker_device(), num_threads=num_threads)
        self.output_column = output_column
        self.preprocess = _preprocess_config(preprocess)
        self.image_size = self._image_size(image_size)
        self.served.warm_up()

    def _image_size(self, image_size: Any) -> tuple[int, int] | None:
        if self.preprocess is None:
            return None
        if image_size is not None:
            return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        spec = self.served.specs[0]
        if spec.rank != 4:
            raise ValueError(
                f"preprocess needs image_size: input {spec.name!r} has rank {spec.rank}, not an NCHW/NHWC image"
            )
        return tuple(spec.opt[2:]) if self.preprocess.layout == "NCHW" else tuple(spec.opt[1:3])

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        columns = _columns(batch)
        names = self._input_columns(columns)
        inputs = [self._input(columns[c], spec) for c, spec in zip(names, self.served.specs, strict=True)]
        n = inputs[0].shape[0]
        outputs = []
        for start in range(0, n, self.served.max_batch):
            chunk = [t[start : start + self.served.max_batch] for t in inputs]
            outputs.append(_stack_rows(self.served.run_batch(chunk)))
        result = {k: v for k, v in columns.items() if k not in names}
        result.update(_output_columns(_concat(outputs), self.output_column))
        return result

    def _input_columns(self, columns: dict[str, Any]) -> list[str]:
        names = self.served.input_names
        if all(n in columns for n in names):
            return names
        if len(names) == 1 and len(columns) == 1:
            return list(columns)
        raise KeyError(
            f"the batch has columns {sorted(columns)}; the model's inputs {names} must be columns of those names"
            " (a one-input model also takes a batch with a single column)"
        )

    def _input(self, column: Any, spec: InputSpec) -> torch.Tensor:
        array = np.asarray(column)
        if array.dtype.kind == "O":  # a column of per-row arrays (pandas, ragged storage)
            array = np.stack(list(array))
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.preprocess is None:
            return tensor.to(spec.torch_dtype)
        if tensor.dtype != torch.uint8 or tensor.dim() != 4 or tensor.shape[-1] != 3:
            raise ValueError(
                f"preprocess expects column {spec.name!r} to hold uint8 images (N, H, W, 3), got"
                f" {tensor.dtype} {tuple(tensor.shape)}"
            )
        images = tensor.to(self.served.device)
        return preprocess(images, self.image_size, config=self.preprocess).to(spec.torch_dtype)


def _worker_device() -> str:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it gave this worker; without num_gpus there are none.
    return "cuda" if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" else "cpu"


def _preprocess_config(value: Any) -> PreprocessConfig | None:
    if value is None or isinstance(value, PreprocessConfig):
        return value
    if isinstance(value, dict):
        return PreprocessConfig.from_dict(value, where="RayPredictor preprocess")
    raise TypeError(f"preprocess must be a dict of PreprocessConfig options or a PreprocessConfig, got {value!r}")


def _columns(batch: Any) -> dict[str, Any]:
    if isinstance(batch, Mapping):
        return dict(batch)
    if hasattr(batch, "columns") and hasattr(batch, "__getitem__"):  # a pandas DataFrame
        return {str(c): batch[c].to_numpy() for c in batch.columns}
    raise TypeError(
        f"RayPredictor takes a batch as a dict of numpy arrays or a pandas DataFrame, got {type(batch).__name__}"
    )


def _stack_rows(rows: list[Any]) -> Any:
    """Per-row outputs (as `split_output` gives them) back into one batched output tree."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(rows)
    if isinstance(first, dict):
        return {k: _stack_rows([r[k] for r in rows]) for k in first}
    if isinstance(first, (list, tuple)):
        return [_stack_rows([r[i] for r in rows]) for i in range(len(first))]
    return None


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, list):
        return [_concat([p[i] for p in parts]) for i in range(len(first))]
    return None


def _output_columns(out: Any, name: str) -> dict[str, np.ndarray]:
    if isinstance(out, torch.Tensor):
        return {name: out.numpy()}
    if isinstance(out, dict):
        items = out.items()
    elif isinstance(out, list):
        items = enumerate(out)
    else:
        raise ValueError(f"the model's output is a {type(out).__name__}; RayPredictor writes tensors as columns")
    columns = {}
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"the model's output {name}[{key!r}] is a {type(value).__name__}; RayPredictor writes one level of"
                " tuples or dicts of tensors as columns"
            )
        columns[f"{name}_{key}"] = value.numpy()
    return columns


def _example_batch(specs: list[InputSpec], device: torch.device):
    def make(n: int) -> tuple[torch.Tensor, ...]:
        return tuple(
            InputSpec(s.name, shape=(n, *s.opt[1:]), dtype=s.dtype, value_range=s.value_range).example(device=device)
            for s in specs
        )

    return make


def ray_batch_size(
    path: str | os.PathLike,
    *,
    latency_budget_ms: float | None = None,
    measure: bool = True,
    device: str | None = None,
    **sweep: Any,
) -> int:
    """The batch size for `map_batches`: `find_optimal_batch` on the loaded artifact here (from the profile's
    min batch up to its max, other dims at their opt), or the profile's opt batch with ``measure=False``.
    `sweep` takes other `OptimalBatchConfig` options (percentile, latency, progress, ...)."""
    check_type("measure", measure, bool)
    served = ServedModel(path, device=device)
    if not measure:
        return served.specs[0].opt[0] if served.specs[0].rank else 1
    served.warm_up()
    result = find_optimal_batch(
        lambda *inputs: served.model.call_flat(*inputs),
        _example_batch(served.specs, served.device),
        latency_budget_ms=latency_budget_ms,
        max_batch=served.max_batch,
        **{"progress": False, "start": served.min_batch, **sweep},
    )
    return result.size


def predictor_options(
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    **predictor_kwargs: Any,
) -> dict[str, Any]:
    """The `map_batches` keyword arguments for `RayPredictor` on `path`: ``ds.map_batches(RayPredictor,
    **predictor_options(path, concurrency=2))``. `batch_size` defaults to `ray_batch_size(path)` (measured
    here); `predictor_kwargs` go to `RayPredictor` (preprocess, output_column, ...)."""
    check_positive("concurrency", concurrency)
    check_positive("num_gpus", num_gpus, allow_zero=True, types_=(int, float))
    size = ray_batch_size(path) if batch_size is None else batch_size
    check_positive("batch_size", size)
    options: dict[str, Any] = {
        "batch_size": size,
        "concurrency": concurrency,
        "fn_constructor_kwargs": {"path": os.path.abspath(path), **predictor_kwargs},  # workers have their own cwd
    }
    if num_gpus:
        options["num_gpus"] = num_gpus
    if num_cpus is not None:
        options["num_cpus"] = num_cpus
        options["fn_constructor_kwargs"].setdefault("num_threads", max(1, int(num_cpus)))
    return options
