"""torchopt.quantize: NVIDIA ModelOpt Q/DQ quantization with calibration, layer overrides, sensitivity search
and a calibration cache.

    import torchopt.quantize as tq

    qmodel = tq.quantize(copy.deepcopy(model), "int8", calib_data=loader, method="entropy",
                         keep=[{"pattern": "*head*", "precision": "fp32"}])
    print(tq.summary(qmodel))
    print(tq.compare(model, loader, test_batches, methods=["max", "entropy", "percentile"], labels=y))
    search = tq.auto_keep(model, loader, test_batches, {"metric": "top1_agreement", "min": 0.99})

Formats (`FORMATS`): int8, int8_smoothquant, fp8, int4_awq, nvfp4 (CUDA). Methods (`METHODS`): max, entropy,
percentile, mse, smoothquant, awq. The recipe step ``quantize`` takes the same options (`QuantizeConfig`).
``deploy(qmodel, mode)`` runs the calibrated Linear layers as real FP8 / INT8 GEMMs (`LOWP_MODES`).

Importing this package is light: ModelOpt, matplotlib and tqdm load inside the functions that use them.
"""

from torchopt.quantize.api import quantize
from torchopt.quantize.comparison import compare
from torchopt.quantize.config import Budget, QuantizeConfig
from torchopt.quantize.deployment import LOWP_MODES, deploy
from torchopt.quantize.export import DeploymentWarning, export_quantized, quant_ops
from torchopt.quantize.formats import FORMATS, METHODS
from torchopt.quantize.keep import KeepRule
from torchopt.quantize.layer_sensitivity import auto_keep, sensitivity
from torchopt.quantize.quant_summary import detect_format, summary

# What README's "Quantization" section documents (tests/test_exports.py holds them to each other); the
# result types (Comparison, Sensitivity, KeepSearch, QuantSummary), CalibData, the cache and the ModelOpt config
# builder live in their modules (comparison, layer_sensitivity, quant_summary, calibrate, cache, formats).
__all__ = [
    "FORMATS",
    "LOWP_MODES",
    "METHODS",
    "Budget",
    "DeploymentWarning",
    "KeepRule",
    "QuantizeConfig",
    "auto_keep",
    "compare",
    "deploy",
    "detect_format",
    "export_quantized",
    "quant_ops",
    "quantize",
    "sensitivity",
    "summary",
]
