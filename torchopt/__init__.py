"""torchopt: make a trained PyTorch module fast on NVIDIA GPUs.

    import torchopt
    spec = torchopt.InputSpec("x", min=(1, 3, 224, 224), opt=(8, 3, 224, 224), max=(32, 3, 224, 224))
    fast = torchopt.optimize(model, "default", inputs=[spec])
    print(fast.report)

Heavy optional dependencies (torch_tensorrt, modelopt, triton, matplotlib) are imported only by the features
that need them.
"""

from torchopt import recipes  # noqa: E402, I001  (registers the built-in recipe steps)
from torchopt import batch, kernels, profile, quantize  # noqa: E402  (light: heavy deps load on first use)
from torchopt.feeder import FeederConfig, FrameFeeder  # noqa: E402
from torchopt.accuracy import AccuracyMetrics, compare_outputs
from torchopt.engine import AccuracyError, OptimizedModule, load, optimize
from torchopt.inputs import InputSpec
from torchopt.recipe import Recipe
from torchopt.report import OptimizeReport

__version__ = "0.1.0"

__all__ = [
    "AccuracyError",
    "AccuracyMetrics",
    "FeederConfig",
    "FrameFeeder",
    "InputSpec",
    "OptimizeReport",
    "OptimizedModule",
    "Recipe",
    "batch",
    "compare_outputs",
    "kernels",
    "load",
    "optimize",
    "profile",
    "quantize",
    "recipes",
]
