"""torchopt.serve: serving a model in-process.

- `DynamicBatcher`: threads submit single items, one worker gathers them into batched model calls (up to the
  profile's batch max or a delay), splits the outputs back; bucketing with padding, back-pressure, per-request
  error isolation, drain-or-cancel shutdown.
- `export_triton` / `TritonServer`: a Triton Inference Server model repository (checked against Triton's schema)
  and the real server on it (`torchopt export-triton`, `torchopt serve`; tritonclient and tritonserver stay
  unimported until used).
- `ray_deployment` / `RayPredictor`: a saved artifact on Ray Serve replicas and in Ray Data `map_batches`
  (the optional extra `torchopt-infer[ray]`; `ray` is imported only when a deployment is built).
- `AsyncPipeline`: decode → preprocess → infer → postprocess stages on their own threads (and CUDA streams),
  bounded queues between them, per-stage statistics and the bottleneck stage.

Example::

    from torchopt.serve import DynamicBatcher

    with DynamicBatcher(fast, max_delay_ms=2) as batcher:   # fast: any batched callable
        logits = batcher.submit(image).result()             # image: one item, no batch dim
"""

from torchopt.serve.batcher import BatcherClosed, BatcherConfig, BatcherFull, BatcherStats, DynamicBatcher
from torchopt.serve.pipeline import AsyncPipeline, PipelineClosed, PipelineConfig, PipelineStats, Stage, StageStats
from torchopt.serve.ray_serving import (
    RayPredictor,
    RayServeConfig,
    RayServePlan,
    plan_ray_serving,
    predictor_options,
    ray_batch_size,
    ray_deployment,
)
from torchopt.serve.triton_config import TritonConfig, TritonConfigError
from torchopt.serve.triton_repo import TritonExport, export_triton
from torchopt.serve.triton_server import ServeExtraMissing, SmokeResult, TritonServer, TritonServerError, smoke_test

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
    "RayPredictor",
    "RayServeConfig",
    "RayServePlan",
    "ServeExtraMissing",
    "SmokeResult",
    "Stage",
    "StageStats",
    "TritonConfig",
    "TritonConfigError",
    "TritonExport",
    "TritonServer",
    "TritonServerError",
    "export_triton",
    "plan_ray_serving",
    "predictor_options",
    "ray_batch_size",
    "ray_deployment",
    "smoke_test",
]
