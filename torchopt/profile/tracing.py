"""`trace`: run torch.profiler over a few steps and summarize stages, top ops and GPU idle time.

A step is one call of ``fn(*inputs)`` (function mode) or the code between two ``tracer.step()`` calls (block
mode). The profiler schedule skips ``wait`` steps, warms up for ``warmup`` steps (recording, then discarding:
the first recorded steps carry the profiler's own start-up cost) and records ``active`` steps. The summary
holds:

- per stage (`stage`): count, mean, p99 and total host time, share of the active wall time, GPU time;
- the slowest stages by total time; the top ops by self device time (self CPU time when no GPU ran);
- the share of the active wall time during which the GPU ran nothing (idle);
- the profiler's overhead: median step time profiled vs unprofiled (function mode), and post-processing time.

The Chrome trace (``trace_path``, ``.json.gz`` or ``.json``) is kept under ``max_trace_mb`` of JSON (Perfetto
and chrome://tracing choke beyond a few hundred MB): few active steps and no stacks or shapes by default, and
if it is still too large the shortest events are dropped and the file says so. When CUDA activity was
requested but no GPU kernel was captured (CUPTI missing, or the work ran on the CPU), a `NoGPUKernelsWarning`
is raised and the summary starts with that warning.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, overload

import torch

from torchopt.config import ConfigBase, check_positive, check_type
from torchopt.profile.files import check_output_file
from torchopt.profile.formatting import fmt_ms, markdown_table
from torchopt.profile.stages import StageEvent, StageRecorder, StageStat, stage_stats, synchronize_all_devices

__all__ = ["NoGPUKernelsWarning", "OpStat", "TraceConfig", "TraceResult", "Tracer", "trace", "trace_markdown"]

_ACTIVITIES = ("cpu", "cuda")
# Rough size of one Chrome-trace event in JSON, used to pick how many events fit the bound.
_TRIM_SLACK = 0.97


class NoGPUKernelsWarning(UserWarning):
    """CUDA activity was requested but torch.profiler captured no GPU kernel."""


@dataclasses.dataclass
class TraceConfig(ConfigBase):
    """Every option of `trace`."""

    wait: int = 1  # steps run before the profiler records anything
    warmup: int = 1  # steps recorded and discarded (profiler start-up noise)
    active: int = 3  # steps recorded and summarized; the trace size grows with them
    activities: list[str] | None = None  # subset of ["cpu", "cuda"]; None = cpu, plus cuda when available
    record_shapes: bool = False  # op input shapes (inflates the trace)
    with_stack: bool = False  # Python stacks per op (inflates the trace ~2.5x)
    profile_memory: bool = False  # allocator events per op
    trace_path: str | None = None  # Chrome trace to write (.json.gz or .json); None = none
    max_trace_mb: float = 100.0  # bound on the Chrome trace's JSON size
    top_k: int = 10  # rows of the slowest-stages and top-ops tables
    measure_overhead: bool = True  # function mode: also time `active` unprofiled steps

    def __post_init__(self) -> None:
        check_positive("wait", self.wait, allow_zero=True)
        check_positive("warmup", self.warmup, allow_zero=True)
        check_positive("active", self.active)
        if self.activities is not None:
            check_type("activities", self.activities, (list, tuple), 'a list like ["cpu", "cuda"]')
            self.activities = list(self.activities)
            if not self.activities:
                raise ValueError('activities must name at least one of ["cpu", "cuda"], got []')
            for a in self.activities:
                if a not in _ACTIVITIES:
                    raise ValueError(f"activities entries must be among {list(_ACTIVITIES)}, got {a!r}")
        for name in ("record_shapes", "with_stack", "profile_memory", "measure_overhead"):
            check_type(name, getattr(self, name), bool)
        if self.trace_path is not None:
            check_type("trace_path", self.trace_path, (str, os.PathLike), "a file path")
            self.trace_path = os.fspath(self.trace_path)
            if not self.trace_path.endswith((".json", ".json.gz")):
                raise ValueError(f"trace_path must end in .json.gz or .json, got {self.trace_path!r}")
        check_positive("max_trace_mb", self.max_trace_mb, types_=(int, float))
        check_positive("top_k", self.top_k)

    def resolved_activities(self) -> list[str]:
        if self.activities is None:
            return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
        if "cuda" in self.activities and not torch.cuda.is_available():
            raise ValueError(f"activities={self.activities} asks for CUDA, but no CUDA device is available here")
        return self.activities


@dataclasses.dataclass
class OpStat:
    """An operator's totals over the active steps."""

    name: str
    count: int
    self_device_ms: float
    self_cpu_ms: float
    device_ms: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TraceResult:
    """Summary of a `trace` run (all times in ms over the active steps unless named per step)."""

    activities: list[str]
    steps: int  # active steps recorded
    step_ms: float  # median wall time of an active step
    wall_ms: float  # wall time of all active steps
    stages: list[StageStat]
    top_ops: list[OpStat]
    top_ops_by: str  # "self_device_ms" or "self_cpu_ms"
    gpu_kernels: int | None  # None when CUDA activity was not requested
    gpu_idle_pct: float | None
    overhead_pct: float | None  # profiled vs unprofiled median step time; None in block mode
    baseline_step_ms: float | None
    postprocess_s: float  # stopping the profiler, parsing events, writing the trace
    trace_path: str | None
    trace_mb: float | None  # JSON size of the written trace (uncompressed)
    trace_truncated: bool
    warnings: list[str]
    stage_events: list[StageEvent]
    top_k: int = 10

    @property
    def slowest_stages(self) -> list[StageStat]:
        return sorted(self.stages, key=lambda s: s.total_ms, reverse=True)[: self.top_k]

    def to_dict(self, events: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["slowest_stages"] = [s.path for s in self.slowest_stages]
        if not events:
            del d["stage_events"]
        return d

    def __str__(self) -> str:
        return trace_markdown(self)


def _activity_enums(names: list[str]) -> list[Any]:
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU if n == "cpu" else ProfilerActivity.CUDA for n in names]


def _is_gpu_event(ev: Any) -> bool:
    from torch.autograd import DeviceType

    return ev.device_type == DeviceType.CUDA and not getattr(ev, "is_user_annotation", False)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, -float("inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return busy / 1000.0  # profiler times are µs


class Tracer:
    """Block mode of `trace`: a context manager; call `step()` after every step, read `result` after exit.

    Example::

        with torchopt.profile.trace(wait=1, warmup=1, active=3) as tracer:
            for batch in loader:
                pipeline(batch)
                tracer.step()
                if tracer.done:
                    break
        print(tracer.result)
    """

    def __init__(self, config: TraceConfig) -> None:
        check_type("config", config, TraceConfig)
        self.config = config
        self.activities = config.resolved_activities()
        if config.trace_path is not None:
            check_output_file(config.trace_path, "trace_path")
        self.result: TraceResult | None = None
        self._prof: Any = None
        self._recorder = StageRecorder()
        self._steps = 0
        self._step_t: list[float] = []
        self._baseline_step_ms: float | None = None

    @property
    def _first_active(self) -> int:
        return self.config.wait + self.config.warmup

    @property
    def done(self) -> bool:
        """True once every active step has run (further steps are not recorded)."""
        return self._steps >= self._first_active + self.config.active

    def _sync(self) -> None:
        if "cuda" in self.activities:
            synchronize_all_devices()  # the traced work may run on any device, not only the current one

    def __enter__(self) -> Tracer:
        from torch.profiler import profile, schedule

        cfg = self.config
        with warnings.catch_warnings():
            # warmup=0 was asked for explicitly; torch's UserWarning about it becomes a note in the summary.
            warnings.filterwarnings("ignore", message="Profiler won't be using warmup", category=UserWarning)
            sched = schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active, repeat=1)
        self._prof = profile(
            activities=_activity_enums(self.activities),
            schedule=sched,
            record_shapes=cfg.record_shapes,
            with_stack=cfg.with_stack,
            profile_memory=cfg.profile_memory,
        )
        self._prof.__enter__()
        self._maybe_start_recording()
        return self

    def _maybe_start_recording(self) -> None:
        if self._steps == self._first_active:
            self._sync()
            self._step_t.append(time.perf_counter())
            self._recorder.__enter__()

    def step(self) -> None:
        """Mark the end of a step."""
        if self._prof is None:
            raise RuntimeError("Tracer.step() called outside its `with` block")
        active = self._first_active <= self._steps < self._first_active + self.config.active
        if active:
            self._sync()
            self._step_t.append(time.perf_counter())
        self._steps += 1
        if self._steps == self._first_active + self.config.active:
            self._recorder.__exit__(None, None, None)
        self._prof.step()
        self._maybe_start_recording()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        t0 = time.perf_counter()
        self._recorder.__exit__(None, None, None)
        self._prof.__exit__(exc_type, *exc)
        if exc_type is not None:
            return
        self.result = self._summarize(t0)

    def _summarize(self, t_stop: float) -> TraceResult:
        cfg = self.config
        warn: list[str] = []
        n_active = max(0, len(self._step_t) - 1)
        if n_active < cfg.active:
            warn.append(
                f"only {n_active} of {cfg.active} active steps ran (wait={cfg.wait}, warmup={cfg.warmup}):"
                " call step() after every step and run at least wait + warmup + active steps"
            )
        if cfg.warmup == 0:
            warn.append("warmup=0: the first active step includes the profiler's start-up cost")
        step_durs = [(b - a) * 1000.0 for a, b in zip(self._step_t, self._step_t[1:], strict=False)]
        wall_ms = sum(step_durs)
        events = self._prof.events() if n_active else []
        events = events or []

        stages = stage_stats(self._recorder.events, wall_ms)
        device_by_path: dict[str, float] = {}
        for ev in events if "cuda" in self.activities else []:
            if getattr(ev, "is_user_annotation", False) and ev.name in {s.path for s in stages}:
                device_by_path[ev.name] = device_by_path.get(ev.name, 0.0) + ev.device_time_total / 1000.0

        gpu_kernels = gpu_idle = None
        if "cuda" in self.activities:
            paths = {s.path for s in stages}
            gpu = [
                (ev.time_range.start, ev.time_range.end)
                for ev in events
                # GPU-side copies of annotations (stages, steps) span kernels; they are not work themselves.
                if _is_gpu_event(ev) and ev.name not in paths and not ev.name.startswith("ProfilerStep")
            ]
            gpu_kernels = len(gpu)
            steps = [ev for ev in events if ev.name.startswith("ProfilerStep")]
            if steps and wall_ms > 0:
                span = (min(e.time_range.start for e in steps), max(e.time_range.end for e in steps))
                clipped = [(max(a, span[0]), min(b, span[1])) for a, b in gpu if b > span[0] and a < span[1]]
                span_ms = (span[1] - span[0]) / 1000.0
                gpu_idle = max(0.0, 100.0 * (1.0 - _union_ms(clipped) / span_ms)) if span_ms > 0 else None
            if gpu_kernels == 0 and n_active:
                msg = (
                    "CUDA activity was requested but torch.profiler captured NO GPU kernel: either the work"
                    " ran on the CPU (check the inputs' and model's device) or CUPTI is missing/unusable"
                    " (install the CUDA toolkit's CUPTI, check LD_LIBRARY_PATH, and that no other profiler"
                    " such as Nsight holds"
                    " CUPTI). Device times and GPU idle share below are meaningless."
                )
                warn.append(msg)
                warnings.warn(msg, NoGPUKernelsWarning, stacklevel=3)

        top_ops, by = self._top_ops(gpu_kernels, {s.path for s in stages})
        trace_mb, truncated = None, False
        if cfg.trace_path is not None and n_active:
            trace_mb, truncated = _export_chrome_trace(self._prof, cfg.trace_path, cfg.max_trace_mb)
            if truncated:
                warn.append(
                    f"the Chrome trace exceeded max_trace_mb={cfg.max_trace_mb}:"
                    " the shortest events were dropped (use fewer active steps or a larger bound)"
                )
        med = statistics.median(step_durs) if step_durs else 0.0
        overhead = None
        if self._baseline_step_ms is not None and self._baseline_step_ms > 0 and step_durs:
            overhead = 100.0 * (med / self._baseline_step_ms - 1.0)
        return TraceResult(
            activities=self.activities,
            steps=n_active,
            step_ms=med,
            wall_ms=wall_ms,
            stages=[dataclasses.replace(s, device_ms=device_by_path.get(s.path)) for s in stages],
            top_ops=top_ops,
            top_ops_by=by,
            gpu_kernels=gpu_kernels,
            gpu_idle_pct=gpu_idle,
            overhead_pct=overhead,
            baseline_step_ms=self._baseline_step_ms,
            postprocess_s=time.perf_counter() - t_stop,
            trace_path=cfg.trace_path if trace_mb is not None else None,
            trace_mb=trace_mb,
            trace_truncated=truncated,
            warnings=warn,
            stage_events=list(self._recorder.events),
            top_k=cfg.top_k,
        )

    def _top_ops(self, gpu_kernels: int | None, stage_paths: set[str]) -> tuple[list[OpStat], str]:
        from torch.autograd import DeviceType

        by = "self_device_ms" if gpu_kernels else "self_cpu_ms"
        if len(self._step_t) < 2:
            return [], by
        ops = []
        for avg in self._prof.key_averages():
            # Steps and stages are annotations, not operators; GPU kernels are counted in their launching op's
            # self device time (listing them too would count that time twice).
            if (
                avg.key.startswith("ProfilerStep")
                or avg.key in stage_paths
                or getattr(avg, "is_user_annotation", False)
                or getattr(avg, "device_type", DeviceType.CPU) != DeviceType.CPU
            ):
                continue
            ops.append(
                OpStat(
                    name=avg.key,
                    count=int(avg.count),
                    self_device_ms=getattr(avg, "self_device_time_total", 0.0) / 1000.0,
                    self_cpu_ms=avg.self_cpu_time_total / 1000.0,
                    device_ms=getattr(avg, "device_time_total", 0.0) / 1000.0,
                )
            )
        ops.sort(key=lambda o: getattr(o, by), reverse=True)
        return ops[: self.config.top_k], by


def _export_chrome_trace(prof: Any, path: str, max_mb: float) -> tuple[float, bool]:
    """Write the trace (gzip when `path` ends in .gz) under `max_mb` of JSON; (JSON MB, truncated)."""
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(tmp)
        raw = Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)
    limit = int(max_mb * 1e6)
    truncated = len(raw) > limit
    if truncated:
        raw = _trim_trace(json.loads(raw), limit)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)
    return len(raw) / 1e6, truncated


def _trim_trace(data: dict[str, Any], limit: int) -> bytes:
    """Keep the metadata and the longest complete ('X') events that fit in `limit` bytes (drop flows)."""
    events = data.get("traceEvents", [])
    meta = [e for e in events if e.get("ph") == "M"]
    spans = [(i, e) for i, e in enumerate(events) if e.get("ph") == "X"]
    note = {"truncated": True, "kept_events": 0, "dropped_events": 0, "reason": f"max size {limit} bytes"}
    base = {k: v for k, v in data.items() if k != "traceEvents"}
    budget = _TRIM_SLACK * limit - len(json.dumps({**base, "torchopt": note, "traceEvents": meta}))
    kept: list[tuple[int, dict[str, Any]]] = []
    for i, e in sorted(spans, key=lambda ie: ie[1].get("dur", 0), reverse=True):
        size = len(json.dumps(e)) + 2
        if size > budget:
            break
        budget -= size
        kept.append((i, e))
    kept.sort(key=lambda ie: ie[0])
    note.update(kept_events=len(kept), dropped_events=len(events) - len(meta) - len(kept))
    out = {**base, "torchopt": note, "traceEvents": meta + [e for _, e in kept]}
    raw = json.dumps(out).encode()
    while len(raw) > limit and out["traceEvents"]:  # json.dumps spacing differs slightly: shave until it fits
        out["traceEvents"] = out["traceEvents"][: int(len(out["traceEvents"]) * 0.9)]
        raw = json.dumps(out).encode()
    return raw


@overload
def trace(fn: None = None, *, config: TraceConfig | None = None, **overrides: Any) -> Tracer: ...
@overload
def trace(fn: Callable[..., Any], *inputs: Any, config: TraceConfig | None = None, **overrides: Any) -> TraceResult: ...
def trace(fn: Callable[..., Any] | None = None, *inputs: Any, config: TraceConfig | None = None, **overrides: Any):
    """Profile ``fn(*inputs)`` over ``wait + warmup + active`` steps and summarize it (see `TraceConfig`).

    Without `fn`, returns a `Tracer` to use as a context manager around your own loop (block mode).

    Example::

        res = torchopt.profile.trace(model, x, active=5, trace_path="out/trace.json.gz")
        print(res)                    # Markdown summary: stages, top ops, GPU idle, overhead
        res.slowest_stages[0].path
    """
    if fn is not None and not callable(fn):
        raise TypeError(f"fn must be callable (a function or an nn.Module) or None, got {type(fn).__name__} {fn!r}")
    cfg = TraceConfig.merge(config, where="trace options", **overrides)
    tracer = Tracer(cfg)
    if fn is None:
        if inputs:
            raise TypeError("trace() got inputs but no fn; pass fn first, or no inputs for block mode")
        return tracer
    call = lambda: fn(*inputs)
    with tracer:
        for _ in range(cfg.wait + cfg.warmup + cfg.active):
            call()
            tracer.step()
        if cfg.measure_overhead:
            # Measured inside the block, before the profiler's post-processing, under the same per-step sync.
            tracer._baseline_step_ms = _median_step_ms(call, cfg.active, tracer._sync)
    return tracer.result


def _median_step_ms(call: Callable[[], Any], n: int, sync: Callable[[], None]) -> float:
    sync()
    t = [time.perf_counter()]
    for _ in range(n):
        call()
        sync()
        t.append(time.perf_counter())
    return statistics.median((b - a) * 1000.0 for a, b in itertools.pairwise(t))


def trace_markdown(res: TraceResult) -> str:
    """Warnings first, then the overview, the stage table, the slowest stages and the top ops."""
    out = [f"> **WARNING: {w}**" for w in res.warnings]
    overview = [
        f"- active steps: {res.steps}, median step {res.step_ms:.3f} ms, activities {', '.join(res.activities)}",
        f"- GPU kernels captured: {res.gpu_kernels}" if res.gpu_kernels is not None else "- GPU: not recorded",
    ]
    if res.gpu_idle_pct is not None:
        overview.append(f"- GPU idle: {res.gpu_idle_pct:.1f} % of the active wall time")
    if res.overhead_pct is not None:
        overview.append(
            f"- profiler overhead: {res.overhead_pct:+.1f} % per step (unprofiled median {res.baseline_step_ms:.3f} ms)"
        )
    overview.append(f"- post-processing: {res.postprocess_s:.2f} s")
    if res.trace_path:
        trunc = " (truncated)" if res.trace_truncated else ""
        overview.append(f"- Chrome trace: `{res.trace_path}` ({res.trace_mb:.2f} MB JSON{trunc})")
    out.append("\n".join(overview))
    if res.stages:
        rows = [
            [
                s.path,
                str(s.count),
                fmt_ms(s.mean_ms),
                fmt_ms(s.p99_ms),
                fmt_ms(s.total_ms),
                f"{100 * s.share:.1f} %",
                fmt_ms(s.device_ms),
            ]
            for s in res.stages
        ]
        out.append(
            "### Stages\n\n"
            + markdown_table(["stage", "count", "mean ms", "p99 ms", "total ms", "share", "GPU ms"], rows)
        )
        out.append("Slowest stages: " + ", ".join(f"`{s.path}` ({s.total_ms:.3f} ms)" for s in res.slowest_stages))
    if res.top_ops:
        gpu = res.gpu_kernels is not None
        rows = [
            [f"`{o.name}`", str(o.count), *([fmt_ms(o.self_device_ms)] if gpu else []), fmt_ms(o.self_cpu_ms)]
            for o in res.top_ops
        ]
        title = "self device time" if res.top_ops_by == "self_device_ms" else "self CPU time (no GPU activity)"
        out.append(
            f"### Top ops by {title}\n\n"
            + markdown_table(["op", "count", *(["self GPU ms"] if gpu else []), "self CPU ms"], rows)
        )
    return "\n\n".join(out)
