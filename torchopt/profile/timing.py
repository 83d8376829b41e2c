"""`latency`: time a callable and summarize the samples (mean, std, percentiles, throughput, stability).

Timing: on CUDA a pair of CUDA events brackets every call on the current stream and the host synchronizes once
per measurement window, so the host never stalls between calls; on CPU ``time.perf_counter_ns`` brackets every
call. The device is taken from the tensor inputs (any CUDA tensor → CUDA timing), else from a module's
parameters, else CPU; ``device=`` overrides it (e.g. for a closure that takes no inputs).

Procedure: ``warmup`` calls (then more until ``warmup_s`` seconds have passed), then ``iters`` timed calls. If
the last ``stability_windows`` windows (of ``iters // stability_windows`` calls each) disagree by more than
``stability_pct`` percent (median against median), more windows run until they agree, ``max_iters`` calls were
timed or ``max_time_s`` seconds were spent timing; the verdict is reported as ``stable``.

``cuda_graph=True`` captures one call in a CUDA graph and times its replays (removes CPU launch gaps; the
inputs must stay the same tensors). ``l2="cold"`` overwrites a buffer larger than the cache before every call,
outside the timed region, like ``triton.testing.do_bench``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchopt.config import ConfigBase, check_choice, check_positive, check_type, resolve_device
from torchopt.profile.formatting import fmt_ms, markdown_table
from torchopt.profile.stats import stability_spread_pct, summarize

__all__ = ["LatencyConfig", "LatencyResult", "infer_device", "latency", "latency_markdown", "time_calls"]


@dataclasses.dataclass
class LatencyConfig(ConfigBase):
    """Every option of `latency`; pass a config or override single fields as keyword arguments."""

    warmup: int = 10  # untimed calls first (kernel selection, caches, allocator pools)
    iters: int = 100  # timed calls (at least); more run while the windows disagree
    warmup_s: float = 0.0  # then keep warming up until this many seconds have passed
    batch_size: int | None = None  # items per call: throughput in items/s instead of calls/s
    cuda_graph: bool = False  # time replays of a CUDA graph of one call (CUDA only)
    l2: str = "hot"  # "cold": flush the cache before every call
    l2_flush_mb: int = 256  # size of the flush buffer; > the last-level cache (H100 L2: 50 MB)
    stability_windows: int = 3  # windows that must agree (perf_analyzer: 3)
    stability_pct: float = 10.0  # how closely, median against median (perf_analyzer: 10 %)
    max_iters: int | None = None  # cap on timed calls while unstable; None = 10 × iters
    max_time_s: float = 5.0  # cap on timing time while unstable (the first `iters` always run)
    device: str | None = None  # None: inferred from the inputs
    progress: bool = False  # tqdm bar over the timed calls

    def __post_init__(self) -> None:
        check_positive("warmup", self.warmup)
        check_positive("iters", self.iters)
        check_positive("warmup_s", self.warmup_s, allow_zero=True, types_=(int, float))
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size)
        check_type("cuda_graph", self.cuda_graph, bool)
        check_choice("l2", self.l2, ["hot", "cold"])
        check_positive("l2_flush_mb", self.l2_flush_mb)
        check_positive("stability_windows", self.stability_windows)
        check_positive("stability_pct", self.stability_pct, types_=(int, float))
        if self.max_iters is not None:
            check_positive("max_iters", self.max_iters)
            if self.max_iters < self.iters:
                raise ValueError(f"max_iters must be >= iters ({self.iters}), got {self.max_iters}")
        check_positive("max_time_s", self.max_time_s, allow_zero=True, types_=(int, float))
        if self.device is not None:
            check_type("device", self.device, str, "a device string like 'cpu' or 'cuda:0'")
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"device must be a device string like 'cpu' or 'cuda:0', got {self.device!r}") from exc
        check_type("progress", self.progress, bool)

    @property
    def window_size(self) -> int:
        return max(1, self.iters // self.stability_windows)


@dataclasses.dataclass
class LatencyResult:
    """Latency statistics in milliseconds, throughput, the stability verdict and the raw samples."""

    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    throughput: float  # items/s when batch_size was given, else calls/s
    stable: bool
    samples_ms: list[float]
    device: str
    iters: int
    batch_size: int | None = None
    warmup: int = 0  # warm-up calls actually run
    cuda_graph: bool = False
    l2: str = "hot"
    stability_spread_pct: float | None = None  # spread of the last windows' medians; None if too few samples

    @property
    def throughput_unit(self) -> str:
        return "items/s" if self.batch_size else "calls/s"

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not samples:
            del d["samples_ms"]
        if d["stability_spread_pct"] is not None and math.isinf(d["stability_spread_pct"]):
            d["stability_spread_pct"] = None  # JSON has no infinity
        return d

    @classmethod
    def from_samples(
        cls, samples: list[float], *, device: Any, batch_size: int | None, stable: bool, **fields: Any
    ) -> LatencyResult:
        """The result for per-call times `samples` (ms): percentiles, mean, and throughput in items per second
        (`batch_size` items a call, else calls); `fields` sets the remaining ones (warmup, stability_spread_pct...)."""
        stats = summarize(samples)
        per_call = batch_size or 1
        return cls(
            **{f"{k}_ms": v for k, v in stats.items()},
            throughput=per_call * 1000.0 / stats["mean"] if stats["mean"] > 0 else math.inf,
            stable=stable,
            samples_ms=list(samples),
            device=str(device),
            iters=len(samples),
            batch_size=batch_size,
            **fields,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyResult:
        check_type("data", data, dict, "a dict from LatencyResult.to_dict()")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown LatencyResult keys {unknown}; valid keys: {sorted(names)}")
        return cls(**{**{"samples_ms": []}, **data})

    def __str__(self) -> str:
        verdict = "stable" if self.stable else "UNSTABLE"
        return (
            f"p50 {self.p50_ms:.3f} ms  p99 {self.p99_ms:.3f} ms"
            f"  mean {self.mean_ms:.3f} ± {self.std_ms:.3f} ms  {self.throughput:,.1f} {self.throughput_unit}"
            f"  ({self.iters} iters on {self.device}, {verdict})"
        )


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def infer_device(fn: Any, inputs: tuple[Any, ...]) -> torch.device:
    """The device a call runs on: the first CUDA tensor input, else a module's parameters, else CPU."""
    devices = [t.device for t in _tensors(inputs)]
    if not devices and isinstance(fn, torch.nn.Module):
        devices = [t.device for t in (*fn.parameters(), *fn.buffers())]
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        return cuda[0]
    return devices[0] if devices else torch.device("cpu")


def _call_device(fn: Any, inputs: tuple[Any, ...], cfg: LatencyConfig) -> torch.device:
    """`cfg.device` when set, else the device the inputs (or the module) are on; a CUDA graph needs CUDA."""
    device = resolve_device("device", cfg.device) if cfg.device is not None else infer_device(fn, inputs)
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(
            "cuda_graph=True needs the call to run on CUDA (a CUDA graph replays GPU kernels),"
            f" but it runs on {device}: pass CUDA tensors (or device='cuda') or set cuda_graph=False"
        )
    return device


_SYNC_HINT = (
    "a CUDA graph replays recorded GPU work without the host, so the captured call must not synchronize with"
    " the host: remove .item(), .cpu(), .tolist(), printing tensors, torch.cuda.synchronize(), data-dependent"
    " shapes (nonzero, boolean masks, unique) and CPU-side branching on tensor values,"
    " or set cuda_graph=False"
)


def _capture_graph(fn: Callable, inputs: tuple[Any, ...], device: torch.device) -> Callable[[], Any]:
    """A zero-argument replay of one call captured in a CUDA graph; a clear error if the call syncs."""
    # Try one call with sync debugging set to "error" first: it names a synchronizing op before a capture
    # fails with the less helpful "operation not permitted when stream is capturing".
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(*inputs)
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        raise ValueError(f"cuda_graph=True: fn synchronizes with the host ({exc}); {_SYNC_HINT}") from exc
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn(*inputs)
    except RuntimeError as exc:
        if "captur" not in str(exc):
            raise
        raise ValueError(f"cuda_graph=True: capturing fn in a CUDA graph failed ({exc}); {_SYNC_HINT}") from exc
    torch.cuda.synchronize(device)
    return graph.replay


def _warmup(call: Callable[[], Any], cfg: LatencyConfig, device: torch.device) -> int:
    n = 0
    start = time.perf_counter()
    while n < cfg.warmup or time.perf_counter() - start < cfg.warmup_s:
        call()
        n += 1
        if device.type == "cuda" and n == cfg.warmup and cfg.warmup_s > 0:
            torch.cuda.synchronize(device)  # count warm-up time as device time, not launch-queue time
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def _time_cpu(
    call: Callable[[], Any], n: int, flush: Callable[[], None] | None, clock: Callable[[], int] = time.perf_counter_ns
) -> list[float]:
    out = []
    for _ in range(n):
        if flush is not None:
            flush()
        t0 = clock()
        call()
        out.append((clock() - t0) / 1e6)
    return out


def _time_cuda(call: Callable[[], Any], n: int, flush: Callable[[], None] | None, device: torch.device) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    # The events go on `device`'s current stream: the bare record() would use the thread's current device
    # (cuda:0 unless set), so a call on cuda:1 would be bracketed by events on another GPU.
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        for start, end in zip(starts, ends, strict=True):
            if flush is not None:
                flush()
            start.record(stream)
            call()
            end.record(stream)
    torch.cuda.synchronize(device)  # once per window: the host never waits between calls
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def time_calls(
    call: Callable[[], Any],
    n: int,
    device: torch.device,
    *,
    flush: Callable[[], None] | None = None,
    timer: Callable[[], int] | None = None,
) -> list[float]:
    """Milliseconds of each of `n` calls of ``call()``: CUDA events on CUDA, else `timer` (integer
    nanoseconds, default ``time.perf_counter_ns``) around each call. Tests pass a fake `timer`."""
    if device.type == "cuda" and timer is None:
        return _time_cuda(call, n, flush, device)
    return _time_cpu(call, n, flush, timer or time.perf_counter_ns)


def latency(
    fn: Callable[..., Any],
    *inputs: Any,
    config: LatencyConfig | None = None,
    timer: Callable[[], int] | None = None,
    **overrides: Any,
) -> LatencyResult:
    """Time ``fn(*inputs)`` and return its latency statistics (see `LatencyConfig` for the options).

    `timer` (integer nanoseconds, default ``time.perf_counter_ns``; CUDA events on CUDA) replaces the clock
    around each call, so that tests can time a deterministic fake.

    Example::

        res = torchopt.profile.latency(model, x, warmup=10, iters=200, batch_size=x.shape[0])
        print(res.p50_ms, res.p99_ms, res.throughput, res.stable)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (a function or an nn.Module), got {type(fn).__name__} {fn!r}")
    cfg = LatencyConfig.merge(config, where="latency options", **overrides)
    device = _call_device(fn, inputs, cfg)
    is_cuda = device.type == "cuda"

    flush = None
    if cfg.l2 == "cold":
        buf = torch.empty(cfg.l2_flush_mb * 2**20 // 4, dtype=torch.int32, device=device)
        flush = buf.zero_

    with torch.cuda.device(device) if is_cuda else contextlib.nullcontext():
        if cfg.cuda_graph:
            # Warm up on a side stream before capture, as torch.cuda.graphs recommends (lazy workspace
            # allocations such as cuBLAS handles must not happen inside the capture).
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                n_warm = _warmup(lambda: fn(*inputs), cfg, device)
            torch.cuda.current_stream(device).wait_stream(side)
            call = _capture_graph(fn, inputs, device)
            call()
        else:
            call = lambda: fn(*inputs)
            n_warm = _warmup(call, cfg, device)

        max_iters = cfg.max_iters if cfg.max_iters is not None else 10 * cfg.iters
        window = cfg.window_size

        def measure(n: int) -> list[float]:
            return time_calls(call, n, device, flush=flush, timer=timer)

        from tqdm import tqdm  # not tqdm.auto: in Jupyter without ipywidgets it warns at import

        with tqdm(total=cfg.iters, desc="latency", unit="call", disable=not cfg.progress, leave=False) as bar:
            t_start = time.perf_counter()
            samples = measure(cfg.iters)
            bar.update(cfg.iters)
            spread = stability_spread_pct(samples, cfg.stability_windows, window)
            while (
                (spread is None or spread > cfg.stability_pct)
                and len(samples) < max_iters
                and time.perf_counter() - t_start < cfg.max_time_s
            ):
                n = min(window, max_iters - len(samples))
                samples += measure(n)
                bar.total += n
                bar.update(n)
                spread = stability_spread_pct(samples, cfg.stability_windows, window)

    return LatencyResult.from_samples(
        samples,
        device=device,
        batch_size=cfg.batch_size,
        stable=spread is not None and spread <= cfg.stability_pct,
        warmup=n_warm,
        cuda_graph=cfg.cuda_graph,
        l2=cfg.l2,
        stability_spread_pct=spread,
    )


def latency_markdown(results: dict[str, LatencyResult] | LatencyResult, speedups: dict[str, Any] | None = None) -> str:
    """A table of latency results; with several, a speed-up column against the first: from `speedups`
    (`torchopt.profile.Speedup` by name, from `compare_latency`: with its spread) when given, else the p50
    ratio marked "unpaired" (measured one after the other: no spread, drift included)."""
    if isinstance(results, LatencyResult):
        results = {"run": results}
    base = next(iter(results.values()), None)
    rows = []
    for name, r in results.items():
        speedup = base.p50_ms / r.p50_ms if base is not None and r.p50_ms > 0 else math.nan
        if r is base:
            speedup_cell = "1.00× (baseline)"
        elif speedups and name in speedups:
            speedup_cell = str(speedups[name]).replace("x (", "× (")
        else:
            speedup_cell = f"{speedup:.2f}× (unpaired)"
        rows.append(
            [
                name,
                fmt_ms(r.p50_ms),
                fmt_ms(r.p90_ms),
                fmt_ms(r.p99_ms),
                f"{r.mean_ms:.3f} ± {r.std_ms:.3f}",
                f"{r.throughput:,.1f} {r.throughput_unit}",
                speedup_cell,
                "yes" if r.stable else "**no**",
                str(r.iters),
                r.device + (" (graph)" if r.cuda_graph else "") + (" cold-L2" if r.l2 == "cold" else ""),
            ]
        )
    header = ["run", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "throughput", "speed-up", "stable"]
    return markdown_table([*header, "iters", "device"], rows)
