"""`stage("name")`: mark a pipeline stage for torch.profiler, Nsight Systems and torchopt's own recorders.

A stage is a ``record_function`` range (only while a torch.profiler session runs), an NVTX range (when CUDA is
available, so Nsight Systems shows it) and an event for every active `StageRecorder` (`trace` and `memory` use
them). With no profiler and no recorder running, entering and leaving a stage costs two list operations and
two flag checks (plus the NVTX push/pop on CUDA machines, ~1 µs).

Stages nest: a stage opened inside another is recorded under the path ``"outer/inner"``.

Example::

    with torchopt.profile.stage("preprocess"):
        x = transform(img)

    @torchopt.profile.stage("postprocess")
    def decode(logits): ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from torchopt.config import closest
from torchopt.profile.stats import percentile

__all__ = [
    "StageEvent",
    "StageRecorder",
    "StageStat",
    "current_stage",
    "stage",
    "stage_modules",
    "stage_stats",
    "synchronize_all_devices",
]

_LOCAL = threading.local()
# Active recorders, process-wide (a stage on any thread reports to them; events carry the thread id).
_RECORDERS: list[StageRecorder] = []
_RECORDERS_LOCK = threading.Lock()


def _stack() -> list[str]:
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    return stack


def current_stage() -> str | None:
    """Path of the innermost open stage on this thread (``"outer/inner"``), or None."""
    stack = _stack()
    return "/".join(stack) if stack else None


def synchronize_all_devices() -> None:
    """Wait for the queued work of every visible CUDA device (nothing without CUDA).

    ``torch.cuda.synchronize()`` waits for the thread's current device only (cuda:0 unless set), so a stage
    whose work runs on cuda:1 would be timed by its launches; recorders do not know the device, so they wait
    for all of them (one call per device, a few microseconds each).
    """
    if not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        torch.cuda.synchronize(index)


@functools.cache
def _nvtx_enabled() -> bool:
    # torch.cuda.nvtx raises on CPU-only builds; probe once.
    return torch.cuda.is_available()


class stage(contextlib.ContextDecorator):
    """Context manager and decorator marking a named pipeline stage (see the module docstring)."""

    __slots__ = ("_path", "_rf", "name")

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"stage name must be a str, got {type(name).__name__} {name!r}")
        if not name or "/" in name:
            raise ValueError(
                f"stage name must be a non-empty str without '/' (it separates nested stages), got {name!r}"
            )
        self.name = name
        self._rf: Any = None
        self._path = ""

    def _recreate_cm(self) -> stage:
        # As a decorator, every call gets its own instance so recursion and threads do not share state.
        return stage(self.name)

    def __enter__(self) -> stage:
        stack = _stack()
        stack.append(self.name)
        self._path = "/".join(stack)
        if torch.autograd._profiler_enabled():
            # The full path, so that profiler events map to exactly one stage even when names repeat.
            self._rf = torch.autograd.profiler.record_function(self._path)
            self._rf.__enter__()
        if _nvtx_enabled():
            torch.cuda.nvtx.range_push(self.name)
        if _RECORDERS:
            for rec in list(_RECORDERS):
                rec._enter(self._path)
        return self

    def __exit__(self, *exc: object) -> None:
        if _RECORDERS:
            for rec in list(_RECORDERS):
                rec._exit(self._path)
        if _nvtx_enabled():
            torch.cuda.nvtx.range_pop()
        if self._rf is not None:
            self._rf.__exit__(None, None, None)
            self._rf = None
        _stack().pop()


@dataclasses.dataclass
class StageEvent:
    """One execution of a stage: path, nesting depth, start (ms after the recorder started), duration."""

    path: str
    depth: int
    start_ms: float
    duration_ms: float
    thread: int

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclasses.dataclass
class StageStat:
    """Per-stage statistics over its executions; `share` is total time over the wall time (nested overlap)."""

    path: str
    count: int
    mean_ms: float
    p99_ms: float
    total_ms: float
    share: float
    device_ms: float | None = None  # GPU time of the kernels launched inside it (torch.profiler only)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def stage_stats(events: list[StageEvent], wall_ms: float) -> list[StageStat]:
    """Group events by path; in order of first appearance."""
    by_path: dict[str, list[float]] = {}
    for ev in sorted(events, key=lambda e: e.start_ms):
        by_path.setdefault(ev.path, []).append(ev.duration_ms)
    out = []
    for path, durs in by_path.items():
        total = sum(durs)
        out.append(
            StageStat(
                path=path,
                count=len(durs),
                mean_ms=total / len(durs),
                p99_ms=percentile(sorted(durs), 99.0),
                total_ms=total,
                share=total / wall_ms if wall_ms > 0 else 0.0,
            )
        )
    return out


class StageRecorder:
    """Records every stage entered while it is active (any thread), with host timestamps.

    On CUDA the host times measure launches, not GPU work, unless ``sync=True`` (synchronize at every stage
    boundary — accurate per-stage GPU time, but it removes CPU/GPU overlap).

    Example::

        with torchopt.profile.stages.StageRecorder() as rec:
            run_pipeline()
        for s in rec.stats():
            print(s.path, s.count, s.mean_ms)
    """

    def __init__(self, sync: bool = False) -> None:
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__} {sync!r}")
        self.sync = sync and torch.cuda.is_available()
        self.events: list[StageEvent] = []
        self._open: dict[tuple[int, str], list[int]] = {}
        self._t0 = 0
        self._t1: int | None = None
        self._lock = threading.Lock()

    def _now(self) -> int:
        if self.sync:
            synchronize_all_devices()
        return time.perf_counter_ns()

    def _enter(self, path: str) -> None:
        t = self._now()
        with self._lock:
            self._open.setdefault((threading.get_ident(), path), []).append(t)

    def _exit(self, path: str) -> None:
        t = self._now()
        tid = threading.get_ident()
        with self._lock:
            starts = self._open.get((tid, path))
            if not starts:  # the stage was entered before this recorder started
                return
            t0 = starts.pop()
            self.events.append(StageEvent(path, path.count("/"), (t0 - self._t0) / 1e6, (t - t0) / 1e6, tid))

    def __enter__(self) -> StageRecorder:
        self.events.clear()
        self._open.clear()
        self._t1 = None
        self._t0 = self._now()
        with _RECORDERS_LOCK:
            _RECORDERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with _RECORDERS_LOCK:
            if self in _RECORDERS:
                _RECORDERS.remove(self)
        self._t1 = self._now()

    @property
    def wall_ms(self) -> float:
        end = self._t1 if self._t1 is not None else time.perf_counter_ns()
        return (end - self._t0) / 1e6

    def stats(self) -> list[StageStat]:
        return stage_stats(self.events, self.wall_ms)


@contextlib.contextmanager
def stage_modules(model: torch.nn.Module, names: Sequence[str] | None = None) -> Iterator[list[str]]:
    """Mark submodules of `model` as stages (forward hooks) inside the block: its direct children by default.

    Gives a stage timeline of a model without editing its code; the hooks are removed on exit.

    Example::

        with torchopt.profile.stage_modules(resnet):           # conv1, bn1, ..., layer4, avgpool, fc
            res = torchopt.profile.trace(resnet, x)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r}")
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, _ in model.named_children()]
    elif isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of submodule names, got {type(names).__name__} {names!r}")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"names entries must be str, got {type(n).__name__} {n!r}")
        if n not in modules or n == "":
            valid = [k for k in modules if k]
            raise ValueError(f"{type(model).__name__} has no submodule {n!r}{closest(n, valid)}")
    handles = []
    for n in names:
        open_stages: list[stage] = []  # a module may run again inside itself (recursion)

        def pre(_mod: Any, _args: Any, _name: str = n, _open: list[stage] = open_stages) -> None:
            st = stage(_name)
            st.__enter__()
            _open.append(st)

        def post(_mod: Any, _args: Any, _out: Any, _open: list[stage] = open_stages) -> None:
            if _open:
                _open.pop().__exit__(None, None, None)

        handles.append(modules[n].register_forward_pre_hook(pre))
        handles.append(modules[n].register_forward_hook(post, always_call=True))
    try:
        yield list(names)
    finally:
        for h in handles:
            h.remove()
