"""torchopt.batch: batch sizes that fit, that are fast, and that adapt.

- `find_max_batch`: the largest batch within a memory budget — warm up, probe, fit ``peak = a + b · batch``,
  predict, **verify by running it**, refine (after an OOM, from the allocator's own account of it,
  `torchopt.batch.oom.oom_report`); never returns a size it has not run. CUDA (caching allocator +
  ``mem_get_info``); on CPU only with an explicit ``memory_budget`` (peak RSS).
- `find_optimal_batch`: the best throughput whose latency percentile meets a budget (CPU and CUDA).
- `batch_profile`: those results as a dynamic-shape profile (``opt`` = optimal, ``max`` = max fit); the
  recipe step ``auto_batch`` does it inside `torchopt.optimize`.
- `AdaptiveBatchSizer`: for a running loop — shrink on OOM, grow back after successes; thread-safe.

Example::

    import torchopt.batch as tb

    mx = tb.find_max_batch(model, lambda n: torch.randn(n, 3, 224, 224, device="cuda"))
    best = tb.find_optimal_batch(model, lambda n: torch.randn(n, 3, 224, 224, device="cuda"),
                                 latency_budget_ms=25, max_batch=mx.size)
    print(mx.size, best.size)

matplotlib is imported only by the ``plot()`` methods.
"""

from torchopt.batch.adaptive import AdaptiveBatchConfig, AdaptiveBatchSizer
from torchopt.batch.max_batch import MaxBatchConfig, MaxBatchResult, find_max_batch
from torchopt.batch.memory_backends import CpuRssMemory, CudaMemory, MemoryBackend
from torchopt.batch.oom import is_out_of_memory
from torchopt.batch.optimal import OptimalBatchConfig, OptimalBatchResult, find_optimal_batch
from torchopt.batch.shapes import batch_profile

# The README's entry points, their configs (`config=`) and results, the memory backends their `memory=` takes,
# and `is_out_of_memory` for loops that report to an AdaptiveBatchSizer themselves. The rest (probe records,
# the memory fit, the allocator's OOM account) stays in its module: torchopt.batch.memory_fit, .oom, ...
__all__ = [
    "AdaptiveBatchConfig",
    "AdaptiveBatchSizer",
    "CpuRssMemory",
    "CudaMemory",
    "MaxBatchConfig",
    "MaxBatchResult",
    "MemoryBackend",
    "OptimalBatchConfig",
    "OptimalBatchResult",
    "batch_profile",
    "find_max_batch",
    "find_optimal_batch",
    "is_out_of_memory",
]
