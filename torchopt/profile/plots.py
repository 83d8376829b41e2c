"""Figures: latency histogram + CDF, comparison of runs, stage timeline, memory over time.

Built with matplotlib's object API (``matplotlib.figure.Figure``): no pyplot, no global backend, no GUI, safe
in threads and headless runs. Each function returns the figure and, given ``path`` (.png, .svg or .pdf), saves
it. matplotlib is imported inside the functions so that ``import torchopt`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torchopt.config import check_type
from torchopt.profile.files import check_output_file
from torchopt.profile.memory_tracking import MemoryReport, MemorySample, VRAMMonitor
from torchopt.profile.stages import StageEvent, StageRecorder
from torchopt.profile.stats import percentile
from torchopt.profile.timing import LatencyResult
from torchopt.profile.tracing import TraceResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_comparison", "plot_latency", "plot_memory", "plot_stage_timeline", "save_figure"]

_FORMATS = (".png", ".svg", ".pdf")
_P50_COLOR, _P99_COLOR = "tab:green", "tab:red"


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> str:
    """Save `fig` to `path` (.png/.svg/.pdf), creating its directory; returns the path."""
    p = check_output_file(path, "path")
    if p.suffix.lower() not in _FORMATS:
        raise ValueError(f"figure path must end in one of {list(_FORMATS)}, got {os.fspath(path)!r}")
    fig.savefig(p, dpi=dpi)
    return os.fspath(p)


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        save_figure(fig, path)
    return fig


def _samples(data: LatencyResult | Sequence[float], name: str) -> list[float]:
    samples = data.samples_ms if isinstance(data, LatencyResult) else data
    check_type(name, samples, (list, tuple), "a LatencyResult or a list of millisecond samples")
    if not samples:
        raise ValueError(f"{name} has no samples to plot (LatencyResult.samples_ms is empty)")
    return sorted(float(s) for s in samples)


def _cdf(ax: Any, s: list[float], label: str | None = None, color: Any = None) -> None:
    n = len(s)
    ax.step(s, [(i + 1) / n for i in range(n)], where="post", label=label, color=color)


def plot_latency(
    result: LatencyResult | Sequence[float], path: str | os.PathLike | None = None, title: str = "Latency"
) -> Figure:
    """Histogram and CDF of the latency samples, p50 and p99 marked.

    Example::

        torchopt.profile.plot_latency(torchopt.profile.latency(model, x), "out/latency.png")
    """
    s = _samples(result, "result")
    p50, p99 = percentile(s, 50.0), percentile(s, 99.0)
    fig, (ax_h, ax_c) = _figure(2)
    ax_h.hist(s, bins=min(60, max(10, len(s) // 5)), color="tab:blue", alpha=0.8)
    ax_h.set_xlabel("latency (ms)")
    ax_h.set_ylabel("calls")
    _cdf(ax_c, s, color="tab:blue")
    ax_c.set_xlabel("latency (ms)")
    ax_c.set_ylabel("fraction of calls ≤ x")
    for ax in (ax_h, ax_c):
        ax.axvline(p50, color=_P50_COLOR, linestyle="--", label=f"p50 {p50:.3f} ms")
        ax.axvline(p99, color=_P99_COLOR, linestyle="--", label=f"p99 {p99:.3f} ms")
        ax.grid(alpha=0.3)
    ax_h.legend()
    unstable = getattr(result, "stable", True) is False  # a LatencyResult judged unstable
    fig.suptitle(f"{title} ({len(s)} calls{', UNSTABLE: the windows disagree' if unstable else ''})")
    return _finish(fig, path)


def plot_comparison(
    results: Mapping[str, LatencyResult],
    path: str | os.PathLike | None = None,
    title: str = "Latency comparison",
) -> Figure:
    """Several runs side by side (e.g. eager vs optimized): p50/p99 bars and overlaid CDFs.

    Example::

        torchopt.profile.plot_comparison({"eager": r0, "compiled": r1}, "out/compare.png")
    """
    check_type("results", results, Mapping, "a mapping of run name to LatencyResult")
    if not results:
        raise ValueError("results must hold at least one run, got an empty mapping")
    fig, (ax_b, ax_c) = _figure(2)
    names = list(results)
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    width = 0.38
    for i, name in enumerate(names):
        s = _samples(results[name], f"results[{name!r}]")
        p50, p99 = percentile(s, 50.0), percentile(s, 99.0)
        b50 = ax_b.bar(i - width / 2, p50, width, color=cmap(i % 10), label="p50" if i == 0 else None)
        b99 = ax_b.bar(
            i + width / 2,
            p99,
            width,
            color=cmap(i % 10),
            alpha=0.5,
            hatch="//",
            label="p99" if i == 0 else None,
        )
        ax_b.bar_label(b50, fmt="%.3g", fontsize=8)
        ax_b.bar_label(b99, fmt="%.3g", fontsize=8)
        _cdf(ax_c, s, label=f"{name} (p50 {p50:.3g}, p99 {p99:.3g} ms)", color=cmap(i % 10))
    ax_b.set_xticks(range(len(names)), names)
    ax_b.set_ylabel("latency (ms)")
    ax_b.legend()
    ax_b.grid(axis="y", alpha=0.3)
    ax_c.set_xlabel("latency (ms)")
    ax_c.set_ylabel("fraction of calls ≤ x")
    ax_c.grid(alpha=0.3)
    ax_c.legend(fontsize=8)
    if len(names) > 1:
        first = percentile(_samples(results[names[0]], "results"), 50.0)
        ratios = ", ".join(f"{n} {first / percentile(_samples(results[n], 'results'), 50.0):.2f}×" for n in names[1:])
        title = f"{title} — p50 speed-up vs {names[0]}: {ratios}"
    fig.suptitle(title)
    return _finish(fig, path)


def _stage_events(data: Any) -> list[StageEvent]:
    if isinstance(data, TraceResult):
        return data.stage_events
    if isinstance(data, StageRecorder):
        return data.events
    check_type("events", data, (list, tuple), "a TraceResult, a StageRecorder or a list of StageEvent")
    for i, ev in enumerate(data):
        check_type(f"events[{i}]", ev, StageEvent)
    return list(data)


def plot_stage_timeline(
    events: TraceResult | StageRecorder | Sequence[StageEvent],
    path: str | os.PathLike | None = None,
    title: str = "Stage timeline",
    max_events: int = 5000,
) -> Figure:
    """Gantt chart of stage executions, one row per nesting depth (and thread), colored by stage.

    Example::

        res = torchopt.profile.trace(pipeline, batch)
        torchopt.profile.plot_stage_timeline(res, "out/stages.png")
    """
    evs = _stage_events(events)
    if not evs:
        raise ValueError("no stage events to plot: wrap parts of the work in torchopt.profile.stage('name')")
    evs = sorted(evs, key=lambda e: e.start_ms)[:max_events]
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    rows = sorted({(e.thread, e.depth) for e in evs})
    row_of = {r: i for i, r in enumerate(rows)}
    names = list(dict.fromkeys(e.path for e in evs))
    legend_cols = min(5, len(names))
    legend_rows = -(-len(names) // legend_cols)
    fig, ax = _figure(1, width=10.0, height=1.4 + 0.5 * len(rows) + 0.3 * legend_rows)
    for j, name in enumerate(names):
        mine = [e for e in evs if e.path == name]
        for row in {(e.thread, e.depth) for e in mine}:
            spans = [(e.start_ms, e.duration_ms) for e in mine if (e.thread, e.depth) == row]
            ax.broken_barh(spans, (row_of[row] - 0.4, 0.8), color=cmap(j % 20))
        ax.plot([], [], color=cmap(j % 20), linewidth=8, label=f"{name} ×{len(mine)}")
    threads = {t for t, _ in rows}
    labels = [f"depth {d}" + (f" (thread {t % 10000})" if len(threads) > 1 else "") for t, d in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    # below the axes, in columns: a legend beside a one-row chart was cut off at the figure's bottom edge
    fig.legend(loc="outside lower center", ncols=legend_cols, fontsize=8, frameon=False)
    ax.set_title(title)
    return _finish(fig, path)


def plot_memory(
    data: MemoryReport | VRAMMonitor | Sequence[MemorySample],
    path: str | os.PathLike | None = None,
    title: str = "Memory over time",
) -> Figure:
    """Allocated and reserved memory over time (RSS on CPU), stages shaded, a watcher's threshold drawn.

    Example::

        rep = torchopt.profile.memory(model, x)
        torchopt.profile.plot_memory(rep, "out/memory.png")
    """
    marks: list[tuple[float, str, str]] = []
    threshold = None
    cpu = False
    if isinstance(data, MemoryReport):
        samples, marks, cpu = data.timeline, data.stage_marks, data.device == "cpu"
    elif isinstance(data, VRAMMonitor):
        samples, threshold, cpu = list(data.samples), data.threshold_bytes, data.metric == "rss"
    else:
        check_type("data", data, (list, tuple), "a MemoryReport, a VRAMMonitor or a list of MemorySample")
        samples = list(data)
        for i, s in enumerate(samples):
            check_type(f"data[{i}]", s, MemorySample)
    if not samples:
        raise ValueError("no memory samples to plot (sample_interval_ms=0, or the run was shorter than one interval)")
    top = max(max(s.reserved_bytes, s.value_bytes) for s in samples)
    unit, gib = ("GiB", 2.0**30) if top >= 2**30 else ("MiB", 2.0**20)
    t = [s.t_s * 1000.0 for s in samples]
    fig, ax = _figure(1, width=9.0)
    if cpu:
        ax.plot(t, [s.allocated_bytes / gib for s in samples], label="process RSS", color="tab:blue")
    else:
        ax.plot(t, [s.allocated_bytes / gib for s in samples], label="allocated", color="tab:blue")
        ax.plot(t, [s.reserved_bytes / gib for s in samples], label="reserved", color="tab:orange")
        if any(s.value_bytes not in (s.allocated_bytes, s.reserved_bytes) for s in samples):
            ax.plot(t, [s.value_bytes / gib for s in samples], label="device used", color="tab:purple")
    if threshold is not None:
        ax.axhline(threshold / gib, color=_P99_COLOR, linestyle="--", label=f"threshold {threshold / gib:.2f} {unit}")
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    opened: dict[str, list[float]] = {}
    colors: dict[str, Any] = {}
    for ts, stage_path, kind in marks:
        if kind == "enter":
            opened.setdefault(stage_path, []).append(ts)
        elif opened.get(stage_path):
            start = opened[stage_path].pop()
            first = stage_path not in colors  # label each stage once in the legend
            color = colors.setdefault(stage_path, cmap(len(colors) % 20))
            ax.axvspan(start * 1000.0, ts * 1000.0, color=color, alpha=0.15, label=stage_path if first else None)
    ax.set_xlabel("time (ms)")
    ax.set_ylabel(unit)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)  # beside the axes: inside, it covered the curve
    ax.set_title(title)
    return _finish(fig, path)
