"""torchopt.serve: serving a model in-process.

- `DynamicBatcher`: threads submit single items, one worker gathers them into batched model calls (up to the
  profile's batch max or a delay), splits the outputs back; bucketing with padding, back-pressure, per-request
  error isolation, drain-or-cancel shutdown.
- `AsyncPipeline`: decode → preprocess → infer → postprocess stages on their own threads (and CUDA streams),
  bounded queues between them, per-stage statistics and the bottleneck stage.

Example::

    from torchopt.serve import DynamicBatcher

    with DynamicBatcher(fast, max_delay_ms=2) as batcher:   # fast: any batched callable
        logits = batcher.submit(image).result()             # image: one item, no batch dim
"""

from torchopt.serve.batcher import BatcherClosed, BatcherConfig, BatcherFull, BatcherStats, DynamicBatcher
from torchopt.serve.pipeline import AsyncPipeline, PipelineClosed, PipelineConfig, PipelineStats, Stage, StageStats

__all__ = [
    "AsyncPipeline",
    "BatcherClosed",
    "BatcherConfig",
    "BatcherFull",
    "BatcherStats",
    "DynamicBatcher",
    "PipelineClosed",
    "PipelineConfig",
    "PipelineStats",
    "Stage",
    "StageStats",
]
