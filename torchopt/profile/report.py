"""Reports: JSON and Markdown renderings of latency, trace and memory results, with the run's environment.

`ProfileReport` collects named latency results (e.g. ``{"eager": ..., "optimized": ...}``), an optional trace
summary, memory report and figure paths, and saves them as ``<stem>.json`` and ``<stem>.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchopt.config import check_type
from torchopt.environment import environment
from torchopt.profile.files import check_output_dir, json_safe, write_json
from torchopt.profile.formatting import fmt_bytes, fmt_ms, markdown_table

if TYPE_CHECKING:
    from torchopt.profile.latency import LatencyResult
    from torchopt.profile.memory import MemoryReport
    from torchopt.profile.trace import TraceResult

__all__ = ["ProfileReport", "latency_markdown", "memory_markdown", "trace_markdown"]


def latency_markdown(results: dict[str, LatencyResult] | LatencyResult, speedups: dict[str, Any] | None = None) -> str:
    """A table of latency results; with several, a speed-up column against the first: from `speedups`
    (`torchopt.profile.Speedup` by name, from `compare_latency`: with its spread) when given, else the p50
    ratio marked "unpaired" (measured one after the other: no spread, drift included)."""
    from torchopt.profile.latency import LatencyResult

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


@dataclasses.dataclass
class ProfileReport:
    """Everything one profiling run produced; `save` writes ``<stem>.json`` and ``<stem>.md``.

    Example::

        rep = ProfileReport("resnet50", latency={"eager": r0, "compiled": r1}, figures={"latency": "lat.png"})
        json_path, md_path = rep.save("out/")
    """

    title: str
    latency: dict[str, LatencyResult] = dataclasses.field(default_factory=dict)
    trace: TraceResult | None = None
    memory: MemoryReport | None = None
    figures: dict[str, str] = dataclasses.field(default_factory=dict)
    environment: dict[str, Any] = dataclasses.field(default_factory=environment)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "title": self.title,
                "environment": self.environment,
                "latency": {k: v.to_dict() for k, v in self.latency.items()},
                "trace": self.trace.to_dict(events=True) if self.trace is not None else None,
                "memory": self.memory.to_dict() if self.memory is not None else None,
                "figures": self.figures,
                "notes": self.notes,
            }
        )

    def to_markdown(self, base_dir: str | os.PathLike | None = None) -> str:
        env = self.environment
        device = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_count')} cores)"
        parts = [
            f"# {self.title}",
            f"{device} · torch {env.get('torch')} · triton {env.get('triton')} · {env.get('date')}",
        ]
        parts += [f"> {n}" for n in self.notes]
        if self.latency:
            parts.append("## Latency\n\n" + latency_markdown(self.latency))
        if self.trace is not None:
            parts.append("## Trace\n\n" + trace_markdown(self.trace))
        if self.memory is not None:
            parts.append("## Memory\n\n" + memory_markdown(self.memory))
        if self.figures:
            figs = []
            for name, path in self.figures.items():
                rel = os.path.relpath(path, base_dir) if base_dir is not None else path
                figs.append(f"![{name}]({rel})")
            parts.append("## Figures\n\n" + "\n\n".join(figs))
        return "\n\n".join(parts) + "\n"

    def save(self, out_dir: str | os.PathLike, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<out_dir>/<stem>.json`` and ``<out_dir>/<stem>.md``; returns both paths."""
        d = check_output_dir(out_dir, "out_dir")
        check_type("stem", stem, str)
        json_path = write_json(self.to_dict(), d / f"{stem}.json")
        md_path = d / f"{stem}.md"
        md_path.write_text(self.to_markdown(base_dir=d))
        return json_path, md_path
