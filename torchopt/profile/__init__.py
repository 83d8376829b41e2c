"""torchopt.profile: latency statistics, pipeline stages, torch.profiler traces, memory, figures and reports.

Example::

    import torchopt.profile as tp

    res = tp.latency(model, x, warmup=10, iters=100, batch_size=x.shape[0])   # LatencyResult
    cmp = tp.compare_latency({"eager": model, "compiled": fast}, x)          # speedup with its spread
    with tp.stage("preprocess"):                                              # marks a stage
        ...
    summary = tp.trace(pipeline, batch, trace_path="out/trace.json.gz")       # TraceResult
    mem = tp.memory(pipeline, batch)                                          # MemoryReport
    tp.plot_latency(res, "out/latency.png")
    tp.ProfileReport("my model", latency={"eager": res}, trace=summary, memory=mem).save("out/")

The package exports the entry points, their option and result classes and what other layers use; the rest
(stage recorders, snapshots' parts, output helpers) is imported from its module: `timing`, `comparison`, `stages`,
`tracing`, `memory_tracking`, `plots`, `profile_report`, `stats`, `files`. Nothing heavy is imported here:
matplotlib loads inside the plotting functions, torch.profiler inside `trace`.
"""

from torchopt.profile.comparison import LatencyComparison, Speedup, compare_latency
from torchopt.profile.memory_tracking import (
    MemoryConfig,
    MemoryReport,
    VRAMMonitor,
    compare_snapshots,
    memory,
    snapshot,
)
from torchopt.profile.plots import plot_comparison, plot_latency, plot_memory, plot_stage_timeline
from torchopt.profile.profile_report import ProfileReport
from torchopt.profile.stages import stage, stage_modules
from torchopt.profile.stats import percentile
from torchopt.profile.timing import LatencyConfig, LatencyResult, infer_device, latency
from torchopt.profile.tracing import NoGPUKernelsWarning, TraceConfig, TraceResult, trace

__all__ = [
    "LatencyComparison",
    "LatencyConfig",
    "LatencyResult",
    "MemoryConfig",
    "MemoryReport",
    "NoGPUKernelsWarning",
    "ProfileReport",
    "Speedup",
    "TraceConfig",
    "TraceResult",
    "VRAMMonitor",
    "compare_latency",
    "compare_snapshots",
    "infer_device",
    "latency",
    "memory",
    "percentile",
    "plot_comparison",
    "plot_latency",
    "plot_memory",
    "plot_stage_timeline",
    "snapshot",
    "stage",
    "stage_modules",
    "trace",
]
