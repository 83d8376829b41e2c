"""`quantize(model, config, calib_data)`: ModelOpt Q/DQ quantization with calibration, kept layers and a cache.

The model is quantized **in place** (like ``mtq.quantize``) and returned; keep a ``copy.deepcopy`` first when the
float model is still needed. Use the returned module: ModelOpt may replace the root when the root itself is a
quantizable layer. A quantization that fails leaves the model as it was.

A config with a ``budget`` first runs the sensitivity search (`auto_keep`), then quantizes with the keep rules it
found; the quantization itself is `torchopt.quantize._core`.
"""

from __future__ import annotations

from typing import Any

import torch

from torchopt.quantize._core import check_arguments, check_target, quantize_plain
from torchopt.quantize.calibrate import CalibData
from torchopt.quantize.config import QuantizeConfig, as_config
from torchopt.quantize.layer_sensitivity import auto_keep
from torchopt.quantize.quant_summary import RECORD_ATTR

__all__ = ["quantize"]


def quantize(
    model: torch.nn.Module,
    config: QuantizeConfig | dict | str | None = None,
    calib_data: Any = None,
    *,
    progress: bool = True,
    num_inputs: int | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Quantize `model` in place with NVIDIA ModelOpt (fake-quant Q/DQ) and calibrate it; returns the model.

    Args:
        model: a float model (eval mode is used for calibration; its training flag is restored).
        config: a `QuantizeConfig`, a dict of its options, or a format name ("int8", "fp8", ...).
        calib_data: a DataLoader, an iterable of tensors / tuples / dicts, one tensor, or ``fn(model)``.
        progress: show tqdm bars (calibration, entropy search).
        num_inputs: leading items of tuple batches that are model inputs (default: what ``forward`` takes).
        **options: `QuantizeConfig` fields overriding `config` (e.g. ``method="entropy"``).

    The model carries a `QuantRecord` afterwards (``model.torchopt_quant``); `torchopt.quantize.summary(model)`
    tells which module got which format and which were kept and why. Options, keep rules (at least one layer
    must be left that the format quantizes) and the first calibration batch are checked before the model is
    touched; when anything fails later (a calibration batch, ModelOpt, an interrupt) the model is put back as
    it was (`torchopt.quantize.snapshot`: a CPU copy of its weights is held meanwhile). ModelOpt's own prints
    ("Inserted N quantizers") and optional-package warnings are dropped inside the call.

    Example::

        import torchopt.quantize as tq

        qmodel = tq.quantize(copy.deepcopy(model), "int8", calib_data=loader, method="entropy",
                             keep=[{"pattern": "*head*", "precision": "fp32"}], cache_dir="~/.cache/tq")
        print(tq.summary(qmodel))
    """
    check_arguments(model, progress)
    cfg = as_config(config, options)
    check_target(model, cfg)  # before the search, which quantizes copies of the model
    data = (
        calib_data
        if isinstance(calib_data, CalibData)
        else CalibData(calib_data, max_batches=cfg.max_batches, num_inputs=num_inputs)
    )
    search = None
    if cfg.budget is not None:
        result = auto_keep(model, data, data, cfg.budget, config=cfg.replace(budget=None), progress=progress)
        if not result.met:
            raise ValueError(result.message)
        search = result.to_dict()
        cfg = cfg.replace(budget=None, keep=[*cfg.to_dict()["keep"], *(r.to_dict() for r in result.keep_rules)])
    model = quantize_plain(model, cfg, data, progress=progress)
    getattr(model, RECORD_ATTR).search = search
    return model
