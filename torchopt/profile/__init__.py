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

Nothing heavy is imported here: matplotlib loads inside the plotting functions, torch.profiler inside `trace`.
"""

from torchopt.environment import environment
from torchopt.profile.comparison import LatencyComparison, Speedup, compare_latency
from torchopt.profile.files import write_json
from torchopt.profile.memory_tracking import (
    Fragmentation,
    MemoryConfig,
    MemoryReport,
    MemorySample,
    MemorySnapshot,
    MemoryTracker,
    SnapshotDiff,
    StageMemory,
    VRAMMonitor,
    compare_snapshots,
    fragmentation,
    memory,
    record_history,
    rss_bytes,
    snapshot,
)
from torchopt.profile.plots import (
    plot_comparison,
    plot_latency,
    plot_memory,
    plot_stage_timeline,
    save_figure,
)
from torchopt.profile.profile_report import ProfileReport
from torchopt.profile.stages import StageEvent, StageRecorder, StageStat, current_stage, stage, stage_modules
from torchopt.profile.stats import percentile, summarize
from torchopt.profile.timing import LatencyConfig, LatencyResult, infer_device, latency, time_calls
from torchopt.profile.tracing import NoGPUKernelsWarning, OpStat, TraceConfig, Tracer, TraceResult, trace

__all__ = [
    "Fragmentation",
    "LatencyComparison",
    "LatencyConfig",
    "LatencyResult",
    "MemoryConfig",
    "MemoryReport",
    "MemorySample",
    "MemorySnapshot",
    "MemoryTracker",
    "NoGPUKernelsWarning",
    "OpStat",
    "ProfileReport",
    "SnapshotDiff",
    "Speedup",
    "StageEvent",
    "StageMemory",
    "StageRecorder",
    "StageStat",
    "TraceConfig",
    "TraceResult",
    "Tracer",
    "VRAMMonitor",
    "compare_latency",
    "compare_snapshots",
    "current_stage",
    "environment",
    "fragmentation",
    "infer_device",
    "latency",
    "memory",
    "percentile",
    "plot_comparison",
    "plot_latency",
    "plot_memory",
    "plot_stage_timeline",
    "record_history",
    "rss_bytes",
    "save_figure",
    "snapshot",
    "stage",
    "stage_modules",
    "summarize",
    "time_calls",
    "trace",
    "write_json",
]
