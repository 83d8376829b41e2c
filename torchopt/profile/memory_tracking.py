"""Memory: per-stage peaks, snapshots and their comparison, fragmentation, allocation history, a VRAM watcher.

On CUDA the numbers come from PyTorch's caching allocator: *allocated* is memory held by tensors, *reserved*
is what the allocator holds from the driver (allocated + cached blocks). Per-stage peaks are exact: the
allocator's peak counters are read and reset at every stage boundary and folded into every open stage, so
nested stages each get their own peak. On CPU both numbers are the process's resident set size (RSS), and a
stage's peak is the largest RSS seen at its boundaries and by the background sampler — an estimate, finer with
a smaller ``sample_interval_ms``.

Example::

    rep = torchopt.profile.memory(model, x)              # function mode: one call, stages inside it
    with torchopt.profile.memory() as mem:                # block mode
        with torchopt.profile.stage("forward"):
            y = model(x)
    print(mem.result)

    a = torchopt.profile.snapshot("before"); y = model(x); b = torchopt.profile.snapshot("after")
    print(torchopt.profile.compare_snapshots(a, b))
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, overload

import torch

from torchopt.config import ConfigBase, check_choice, check_positive, check_range, check_type, resolve_device
from torchopt.profile.files import check_output_file
from torchopt.profile.formatting import fmt_bytes, markdown_table
from torchopt.profile.stages import StageRecorder
from torchopt.profile.timing import infer_device

__all__ = [
    "Fragmentation",
    "MemoryConfig",
    "MemoryReport",
    "MemorySample",
    "MemorySnapshot",
    "MemoryTracker",
    "SnapshotDiff",
    "StageMemory",
    "VRAMMonitor",
    "compare_snapshots",
    "fragmentation",
    "memory",
    "memory_markdown",
    "record_history",
    "rss_bytes",
    "snapshot",
]


# ---------------------------------------------------------------------------------------------------- reading


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the peak RSS, the best portable one)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _read(dev: torch.device) -> tuple[int, int]:
    """(allocated, reserved) now: CUDA allocator, or RSS twice on CPU."""
    if dev.type == "cuda":
        stats = torch.cuda.memory_stats(dev)
        return stats.get("allocated_bytes.all.current", 0), stats.get("reserved_bytes.all.current", 0)
    rss = rss_bytes()
    return rss, rss


# -------------------------------------------------------------------------------------------------- snapshots


@dataclasses.dataclass
class MemorySnapshot:
    """Memory at one moment (bytes); on CPU the allocator fields are 0 and allocated = reserved = RSS."""

    name: str
    device: str
    time_s: float
    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    active_bytes: int
    inactive_split_bytes: int
    num_alloc_retries: int
    num_ooms: int
    rss_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_COMPARED = (
    "allocated_bytes",
    "reserved_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "active_bytes",
    "inactive_split_bytes",
    "num_alloc_retries",
    "num_ooms",
    "rss_bytes",
)


def snapshot(name: str = "", device: str | torch.device | int | None = None) -> MemorySnapshot:
    """The memory state now, named (`device` None: the current CUDA device, else CPU)."""
    check_type("name", name, str)
    dev = resolve_device("device", device)
    rss = rss_bytes()
    if dev.type != "cuda":
        return MemorySnapshot(name, str(dev), time.time(), rss, rss, rss, rss, 0, 0, 0, 0, rss)
    s = torch.cuda.memory_stats(dev)
    return MemorySnapshot(
        name=name,
        device=str(dev),
        time_s=time.time(),
        allocated_bytes=s.get("allocated_bytes.all.current", 0),
        reserved_bytes=s.get("reserved_bytes.all.current", 0),
        peak_allocated_bytes=s.get("allocated_bytes.all.peak", 0),
        peak_reserved_bytes=s.get("reserved_bytes.all.peak", 0),
        active_bytes=s.get("active_bytes.all.current", 0),
        inactive_split_bytes=s.get("inactive_split_bytes.all.current", 0),
        num_alloc_retries=s.get("num_alloc_retries", 0),
        num_ooms=s.get("num_ooms", 0),
        rss_bytes=rss,
    )


@dataclasses.dataclass
class SnapshotDiff:
    """`after` minus `before` for every field of `MemorySnapshot` (bytes or counts), plus the time between."""

    before: str
    after: str
    seconds: float
    delta: dict[str, int]
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"{self.before!r} → {self.after!r} ({self.seconds:.3f} s)"]
        for k, v in self.delta.items():
            if self.device == "cpu" and k != "rss_bytes":
                continue  # on CPU the other fields repeat the RSS or are 0
            shown = fmt_bytes(v) if k.endswith("_bytes") else str(v)
            lines.append(f"  {k:<22} {'+' if v > 0 else ''}{shown}")
        return "\n".join(lines)


def compare_snapshots(before: MemorySnapshot, after: MemorySnapshot) -> SnapshotDiff:
    """Differences between two snapshots of the same device."""
    check_type("before", before, MemorySnapshot)
    check_type("after", after, MemorySnapshot)
    if before.device != after.device:
        raise ValueError(f"snapshots are of different devices: {before.device!r} and {after.device!r}")
    delta = {k: getattr(after, k) - getattr(before, k) for k in _COMPARED}
    return SnapshotDiff(before.name, after.name, after.time_s - before.time_s, delta, before.device)


@dataclasses.dataclass
class Fragmentation:
    """How much reserved memory is not in use by tensors, and the allocator's distress signals."""

    reserved_bytes: int
    allocated_bytes: int
    reserved_minus_allocated_bytes: int
    inactive_split_bytes: int  # free pieces of split blocks: the part of the cache that is hard to reuse
    num_alloc_retries: int  # cudaMalloc failed and the cache was flushed to retry
    num_ooms: int

    @property
    def fragmentation_pct(self) -> float:
        return 100.0 * self.reserved_minus_allocated_bytes / self.reserved_bytes if self.reserved_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "fragmentation_pct": self.fragmentation_pct}


def fragmentation(device: str | torch.device | int | None = None) -> Fragmentation:
    """Fragmentation of the CUDA caching allocator on `device` (CUDA only)."""
    dev = resolve_device("device", device)
    if dev.type != "cuda":
        raise ValueError(f"fragmentation describes the CUDA caching allocator; device {dev} is not CUDA")
    s = snapshot("", dev)
    return Fragmentation(
        s.reserved_bytes,
        s.allocated_bytes,
        s.reserved_bytes - s.allocated_bytes,
        s.inactive_split_bytes,
        s.num_alloc_retries,
        s.num_ooms,
    )


@contextlib.contextmanager
def record_history(
    path: str | os.PathLike, max_entries: int = 100_000, stacks: str = "python", device: Any = None
) -> Iterator[str]:
    """Record every CUDA allocation inside the block and dump a pickle for https://pytorch.org/memory_viz.

    ``stacks="python"`` keeps recording cheap; ``"all"`` adds C++ frames (slow).

    Example::

        with torchopt.profile.memory_tracking.record_history("out/alloc.pickle"):
            model(x)
    """
    p = check_output_file(path, "path")
    check_positive("max_entries", max_entries)
    check_choice("stacks", stacks, ["python", "all"])
    dev = resolve_device("device", device)
    if dev.type != "cuda":
        raise ValueError(f"allocation history records the CUDA caching allocator; device {dev} is not CUDA")
    torch.cuda.memory._record_memory_history(enabled="all", stacks=stacks, max_entries=max_entries, device=dev)
    try:
        yield os.fspath(p)
    finally:
        try:
            torch.cuda.memory._dump_snapshot(os.fspath(p))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None, device=dev)


# -------------------------------------------------------------------------------------------- VRAM watcher


@dataclasses.dataclass
class MemorySample:
    """One reading: seconds since the watcher started, allocated, reserved and the watched value (bytes)."""

    t_s: float
    allocated_bytes: int
    reserved_bytes: int
    value_bytes: int


_METRICS = ("auto", "allocated", "reserved", "device_used", "rss")


class VRAMMonitor:
    """A thread sampling memory every `interval_s`; calls `callback(sample)` when it crosses `threshold`.

    `metric`: "allocated" / "reserved" (this process's CUDA allocator), "device_used" (the whole GPU, other
    processes included, from cudaMemGetInfo), "rss" (this process's resident memory, works on CPU); "auto" is
    "reserved" on CUDA and "rss" otherwise. `threshold`: bytes (int) or a fraction of the device's (or RAM's)
    total (float in (0, 1]); None only records. The callback fires once per upward crossing and re-arms when
    the value falls back under the threshold; an exception in it stops the watcher and `stop()` re-raises it.

    Example::

        def warn(s): print(f"VRAM at {s.value_bytes / 2**30:.1f} GiB")
        with torchopt.profile.VRAMMonitor(0.9, warn) as mon:
            train()
        print(mon.peak_bytes, mon.crossings)
    """

    def __init__(
        self,
        threshold: int | float | None = None,
        callback: Callable[[MemorySample], Any] | None = None,
        *,
        interval_s: float = 0.05,
        metric: str = "auto",
        device: str | torch.device | int | None = None,
        max_samples: int = 100_000,
    ) -> None:
        check_choice("metric", metric, list(_METRICS))
        check_positive("interval_s", interval_s, types_=(int, float))
        check_positive("max_samples", max_samples)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable(sample) or None, got {type(callback).__name__} {callback!r}")
        if metric in ("allocated", "reserved", "device_used") and device is None and not torch.cuda.is_available():
            raise ValueError(f"metric={metric!r} watches a CUDA device, but no CUDA device is available; use 'rss'")
        self.device = resolve_device("device", device) if metric != "rss" else torch.device("cpu")
        if metric == "auto":
            metric = "reserved" if self.device.type == "cuda" else "rss"
        if metric != "rss" and self.device.type != "cuda":
            raise ValueError(f"metric={metric!r} watches a CUDA device, got device {self.device}; use metric='rss'")
        self.metric = metric
        self.total_bytes = (
            torch.cuda.get_device_properties(self.device).total_memory if metric != "rss" else _total_ram()
        )
        self.threshold_bytes = self._threshold(threshold)
        self.callback = callback
        self.interval_s = float(interval_s)
        self.samples: collections.deque[MemorySample] = collections.deque(maxlen=max_samples)
        self.peak_bytes = 0
        self.crossings = 0
        self._above = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._t0 = 0.0
        self._listener: Callable[[MemorySample], None] | None = None  # every sample (MemoryTracker on CPU)

    def _threshold(self, threshold: Any) -> int | None:
        if threshold is None:
            return None
        check_type("threshold", threshold, (int, float), "bytes (int) or a fraction of the total (float)")
        if isinstance(threshold, float):
            check_range("threshold as a fraction", threshold, low=0.0, high=1.0, low_open=True, types_=float)
            return int(threshold * self.total_bytes)
        check_positive("threshold", threshold)
        return threshold

    def sample(self) -> MemorySample:
        """Take one reading now (also used by the thread); checks the threshold."""
        if self.metric == "rss":
            alloc = reserved = value = rss_bytes()
        else:
            alloc, reserved = _read(self.device)
            if self.metric == "device_used":
                free, total = torch.cuda.mem_get_info(self.device)
                value = total - free
            else:
                value = alloc if self.metric == "allocated" else reserved
        s = MemorySample(time.perf_counter() - self._t0, alloc, reserved, value)
        self.samples.append(s)
        if self._listener is not None:
            self._listener(s)
        self.peak_bytes = max(self.peak_bytes, value)
        if self.threshold_bytes is not None:
            above = value >= self.threshold_bytes
            if above and not self._above:
                self.crossings += 1
                if self.callback is not None:
                    self.callback(s)
            self._above = above
        return s

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval_s)
        except BaseException as exc:  # surfaced by stop(): a thread cannot raise into its owner
            self._error = exc

    def start(self) -> VRAMMonitor:
        if self._thread is not None:
            raise RuntimeError("VRAMMonitor is already running")
        self._stop.clear()
        self._error = None
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="torchopt-vram-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise RuntimeError(f"VRAMMonitor stopped: its sampling or callback raised {self._error!r}") from self._error

    def __enter__(self) -> VRAMMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- per-stage tracking


@dataclasses.dataclass
class MemoryConfig(ConfigBase):
    """Every option of `memory`."""

    device: str | None = None  # None: function mode infers it from the inputs, block mode takes CUDA if present
    iters: int = 1  # function mode: calls of fn
    sample_interval_ms: float = 5.0  # background sampling for the timeline (and CPU stage peaks); 0 = off
    record_history: bool = False  # CUDA: record allocations and dump a memory_viz pickle
    history_path: str | None = None  # where the pickle goes (required with record_history)
    max_entries: int = 100_000  # allocation-history ring buffer
    stacks: str = "python"  # allocation-history stacks: "python" (fast) or "all"

    def __post_init__(self) -> None:
        if self.device is not None:
            resolve_device("device", self.device)
        check_positive("iters", self.iters)
        check_positive("sample_interval_ms", self.sample_interval_ms, allow_zero=True, types_=(int, float))
        check_type("record_history", self.record_history, bool)
        if self.history_path is not None:
            check_type("history_path", self.history_path, (str, os.PathLike), "a file path")
            self.history_path = os.fspath(self.history_path)
        if self.record_history and self.history_path is None:
            raise ValueError("record_history=True needs history_path='.../alloc.pickle'")
        check_positive("max_entries", self.max_entries)
        check_choice("stacks", self.stacks, ["python", "all"])


@dataclasses.dataclass
class StageMemory:
    """Memory of one stage over its executions (bytes)."""

    path: str
    count: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    peak_increase_bytes: int  # largest (peak − allocated at entry): the stage's transient working memory
    retained_bytes: int  # allocated at exit − at entry, summed over executions: what it keeps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class MemoryReport:
    """Result of `memory`: peaks overall and per stage, start/end snapshots, fragmentation, timeline."""

    device: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    stages: list[StageMemory]
    start: MemorySnapshot
    end: MemorySnapshot
    fragmentation: Fragmentation | None
    timeline: list[MemorySample]
    stage_marks: list[tuple[float, str, str]]  # (t_s, stage path, "enter" | "exit")
    history_path: str | None = None

    def to_dict(self, timeline: bool = True) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["stages"] = [s.to_dict() for s in self.stages]
        d["start"], d["end"] = self.start.to_dict(), self.end.to_dict()
        d["fragmentation"] = self.fragmentation.to_dict() if self.fragmentation is not None else None
        d["timeline"] = [dataclasses.asdict(s) for s in self.timeline] if timeline else []
        d["stage_marks"] = [list(m) for m in self.stage_marks] if timeline else []
        return d

    def __str__(self) -> str:
        return memory_markdown(self)


class _Open:
    __slots__ = ("alloc0", "path", "peak_alloc", "peak_res")

    def __init__(self, path: str, alloc0: int, reserved0: int) -> None:
        self.path, self.alloc0, self.peak_alloc, self.peak_res = path, alloc0, alloc0, reserved0


class MemoryTracker(StageRecorder):
    """Block mode of `memory`: a context manager; `result` holds the `MemoryReport` after exit."""

    def __init__(self, config: MemoryConfig, device: torch.device | None = None) -> None:
        super().__init__()
        check_type("config", config, MemoryConfig)
        self.config = config
        self.dev = device if device is not None else resolve_device("device", config.device)
        if config.record_history:
            if self.dev.type != "cuda":
                raise ValueError(
                    f"record_history=True records the CUDA caching allocator; device {self.dev} is not CUDA"
                )
            check_output_file(config.history_path, "history_path")
        self.result: MemoryReport | None = None
        self._stages_open: list[_Open] = []  # one stack across threads: CUDA peaks are device-wide
        self._acc: dict[str, StageMemory] = {}
        self._marks: list[tuple[float, str, str]] = []
        self._boundary: list[MemorySample] = []  # readings at stage boundaries, merged into the timeline
        self._peak = [0, 0]
        self._monitor: VRAMMonitor | None = None
        self._history: Any = None
        self._start: MemorySnapshot | None = None

    def _fold(self) -> tuple[int, int]:
        """Fold the peaks since the last boundary into every open stage and the total; reset the counters."""
        if self.dev.type == "cuda":
            s = torch.cuda.memory_stats(self.dev)
            cur = (s.get("allocated_bytes.all.current", 0), s.get("reserved_bytes.all.current", 0))
            peak = (s.get("allocated_bytes.all.peak", 0), s.get("reserved_bytes.all.peak", 0))
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            cur = _read(self.dev)
            peak = cur
            if self._monitor is not None and self._monitor.samples:
                last = self._monitor.samples[-1]
                peak = (max(cur[0], last.allocated_bytes), max(cur[1], last.reserved_bytes))
        for o in self._stages_open:
            o.peak_alloc, o.peak_res = max(o.peak_alloc, peak[0]), max(o.peak_res, peak[1])
        self._peak = [max(self._peak[0], peak[0]), max(self._peak[1], peak[1])]
        return cur

    def _on_sample(self, sample: MemorySample) -> None:
        # CPU: the sampler is the only way to see a peak between boundaries.
        with self._lock:
            for o in self._stages_open:
                o.peak_alloc = max(o.peak_alloc, sample.allocated_bytes)
                o.peak_res = max(o.peak_res, sample.reserved_bytes)
            self._peak = [
                max(self._peak[0], sample.allocated_bytes),
                max(self._peak[1], sample.reserved_bytes),
            ]

    def _t(self) -> float:
        return time.perf_counter() - (self._monitor._t0 if self._monitor is not None else self._t0_s)

    def _enter(self, path: str) -> None:
        with self._lock:
            cur = self._fold()
            self._stages_open.append(_Open(path, cur[0], cur[1]))
            t = self._t()
            self._marks.append((t, path, "enter"))
            self._boundary.append(MemorySample(t, cur[0], cur[1], cur[0]))

    def _exit(self, path: str) -> None:
        with self._lock:
            open_ = self._stages_open
            idx = next((i for i in range(len(open_) - 1, -1, -1) if open_[i].path == path), None)
            if idx is None:  # entered before tracking started
                return
            cur = self._fold()
            o = open_.pop(idx)
            t = self._t()
            self._marks.append((t, path, "exit"))
            self._boundary.append(MemorySample(t, cur[0], cur[1], cur[0]))
            acc = self._acc.get(path)
            if acc is None:
                acc = self._acc[path] = StageMemory(path, 0, 0, 0, 0, 0)
            acc.count += 1
            acc.peak_allocated_bytes = max(acc.peak_allocated_bytes, o.peak_alloc)
            acc.peak_reserved_bytes = max(acc.peak_reserved_bytes, o.peak_res)
            acc.peak_increase_bytes = max(acc.peak_increase_bytes, o.peak_alloc - o.alloc0)
            acc.retained_bytes += cur[0] - o.alloc0

    def __enter__(self) -> MemoryTracker:
        cfg = self.config
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        self._start = snapshot("start", self.dev)
        self._acc.clear()
        self._marks.clear()
        self._boundary.clear()
        self._stages_open.clear()
        self._peak = [0, 0]
        self._t0_s = time.perf_counter()
        if cfg.record_history:
            self._history = record_history(cfg.history_path, cfg.max_entries, cfg.stacks, self.dev)
            self._history.__enter__()
        if cfg.sample_interval_ms > 0:
            metric = "rss" if self.dev.type == "cpu" else "allocated"
            self._monitor = VRAMMonitor(
                None,
                None,
                interval_s=cfg.sample_interval_ms / 1000.0,
                metric=metric,
                device=self.dev if self.dev.type == "cuda" else None,
            )
            if self.dev.type == "cpu":
                self._monitor._listener = self._on_sample
            self._monitor.start()
        with self._lock:
            self._fold()
        return super().__enter__()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        super().__exit__(exc_type, *exc)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        with self._lock:
            self._fold()
        try:
            if self._monitor is not None:
                self._monitor.stop()
        finally:
            if self._history is not None:
                self._history.__exit__(exc_type, *exc)
        if exc_type is not None:
            return
        end = snapshot("end", self.dev)
        sampled = list(self._monitor.samples) if self._monitor is not None else []
        timeline = sorted(sampled + self._boundary, key=lambda x: x.t_s)
        self.result = MemoryReport(
            device=str(self.dev),
            peak_allocated_bytes=self._peak[0],
            peak_reserved_bytes=self._peak[1],
            stages=list(self._acc.values()),
            start=self._start,
            end=end,
            fragmentation=fragmentation(self.dev) if self.dev.type == "cuda" else None,
            timeline=timeline,
            stage_marks=list(self._marks),
            history_path=self.config.history_path if self.config.record_history else None,
        )


@overload
def memory(fn: None = None, *, config: MemoryConfig | None = None, **overrides: Any) -> MemoryTracker: ...
@overload
def memory(
    fn: Callable[..., Any], *inputs: Any, config: MemoryConfig | None = None, **overrides: Any
) -> MemoryReport: ...
def memory(fn: Callable[..., Any] | None = None, *inputs: Any, config: MemoryConfig | None = None, **overrides: Any):
    """Measure memory of ``fn(*inputs)`` per stage (see `MemoryConfig`); without `fn`, a `MemoryTracker`.

    Example::

        rep = torchopt.profile.memory(model, x, record_history=True, history_path="out/alloc.pickle")
        print(rep)  # peaks per stage, fragmentation
    """
    if fn is not None and not callable(fn):
        raise TypeError(f"fn must be callable (a function or an nn.Module) or None, got {type(fn).__name__} {fn!r}")
    cfg = MemoryConfig.merge(config, where="memory options", **overrides)
    if fn is None:
        if inputs:
            raise TypeError("memory() got inputs but no fn; pass fn first, or no inputs for block mode")
        return MemoryTracker(cfg)
    dev = resolve_device("device", cfg.device) if cfg.device is not None else infer_device(fn, inputs)
    tracker = MemoryTracker(cfg, dev)
    with tracker:
        for _ in range(cfg.iters):
            fn(*inputs)
    return tracker.result


def memory_markdown(rep: MemoryReport) -> str:
    """Peaks, per-stage peaks and fragmentation of a memory report."""
    what = "CUDA caching allocator" if rep.device.startswith("cuda") else "process RSS (CPU)"
    out = [
        f"- device {rep.device}, measured: {what}",
        f"- peak RSS {fmt_bytes(rep.peak_allocated_bytes)}"
        if not rep.device.startswith("cuda")
        else f"- peak allocated {fmt_bytes(rep.peak_allocated_bytes)},"
        f" peak reserved {fmt_bytes(rep.peak_reserved_bytes)}",
    ]
    if rep.history_path:
        out.append(f"- allocation history: `{rep.history_path}` (open in https://pytorch.org/memory_viz)")
    text = "\n".join(out)
    if rep.stages:
        cpu = not rep.device.startswith("cuda")  # RSS only: allocated and reserved are the same number
        rows = [
            [
                s.path,
                str(s.count),
                fmt_bytes(s.peak_allocated_bytes),
                *([] if cpu else [fmt_bytes(s.peak_reserved_bytes)]),
                fmt_bytes(s.peak_increase_bytes),
                fmt_bytes(s.retained_bytes),
            ]
            for s in rep.stages
        ]
        peak = ["peak RSS"] if cpu else ["peak allocated", "peak reserved"]
        header = ["stage", "count", *peak, "peak above entry", "retained"]
        text += "\n\n### Memory per stage\n\n" + markdown_table(header, rows)
    if rep.fragmentation is not None:
        f = rep.fragmentation
        text += (
            f"\n\nFragmentation: reserved − allocated {fmt_bytes(f.reserved_minus_allocated_bytes)}"
            f" ({f.fragmentation_pct:.1f} % of reserved), inactive split {fmt_bytes(f.inactive_split_bytes)},"
            f" allocation retries {f.num_alloc_retries}, OOMs {f.num_ooms}"
        )
    return text
