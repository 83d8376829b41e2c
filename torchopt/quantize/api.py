"""`quantize(model, config, calib_data)`: ModelOpt Q/DQ quantization with calibration, kept layers and a cache.

The model is quantized **in place** (like ``mtq.quantize``) and returned; keep a ``copy.deepcopy`` first when the
float model is still needed. Use the returned module: ModelOpt may replace the root when the root itself is a
quantizable layer.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization
from torchopt.config import check_type
from torchopt.quantize.cache import CalibrationCache, cache_key, model_fingerprint
from torchopt.quantize.calibrate import (
    CalibData,
    bypassed_modules,
    calibrate_histograms,
    disable_fused_fast_paths,
    model_device,
)
from torchopt.quantize.config import QuantizeConfig
from torchopt.quantize.formats import HISTOGRAM_METHODS, modelopt_config
from torchopt.quantize.keep import apply_keep_precision, resolve_keep, top_level
from torchopt.quantize.summary import RECORD_ATTR, QuantRecord, detect_format

__all__ = ["as_config", "quantize"]


def as_config(config: QuantizeConfig | dict | str | None, options: dict[str, Any]) -> QuantizeConfig:
    """A QuantizeConfig from a config, a dict, a format name or None, with keyword options applied on top."""
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, QuantizeConfig):
        base = config.to_dict()
    elif isinstance(config, str):
        base = {"format": config}
    elif isinstance(config, dict):
        base = dict(config)
    else:
        raise TypeError(
            f"config must be a QuantizeConfig, a dict of options or a format name, got {type(config).__name__}"
        )
    if not options and isinstance(config, QuantizeConfig):
        return config
    return QuantizeConfig.from_dict({**base, **options}, where="quantize config")


def _check_quantizable(model: torch.nn.Module, kept: dict[str, Any], mtq: Any) -> None:
    """ValueError when no layer with weights is left to quantize (all kept, or none ModelOpt knows)."""
    registry = mtq.QuantModuleRegistry
    layers = [n for n, m in model.named_modules() if type(m) in registry and getattr(m, "weight", None) is not None]
    left = [n for n in layers if n not in kept]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer ModelOpt can quantize (Linear, Conv, ...): nothing to quantize"
        )
    if not left:
        raise ValueError(f"keep selects every quantizable layer ({layers}): nothing would be quantized")


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
    tells which module got which format and which were kept and why. Options, keep rules and the first
    calibration batch are checked before the model is touched; an error in a later batch leaves it converted
    but uncalibrated, so quantize a copy when the float model matters.

    Example::

        import torchopt.quantize as tq

        qmodel = tq.quantize(copy.deepcopy(model), "int8", calib_data=loader, method="entropy",
                             keep=[{"pattern": "*head*", "precision": "fp32"}], cache_dir="~/.cache/tq")
        print(tq.summary(qmodel))
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_type("progress", progress, bool)
    cfg = as_config(config, options)
    mtq = import_modelopt_quantization()
    device = model_device(model)
    if cfg.needs_cuda and device.type != "cuda":
        raise ValueError(
            f"format {cfg.format!r} needs a CUDA device (ModelOpt's {cfg.format} fake-quant kernels run on CUDA"
            f" only); the model is on {device}. Move it with model.cuda(), or use 'int8' / 'fp8' on CPU"
        )
    previous = detect_format(model)
    if previous is not None:
        what = (
            f"with format {previous!r}; quantizing it again with {cfg.format!r} would stack the formats"
            if previous != cfg.format
            else f"with format {previous!r} already; to recalibrate"
        )
        raise ValueError(f"model is already quantized {what}. Quantize a fresh copy of the float model instead")
    data = (
        calib_data
        if isinstance(calib_data, CalibData)
        else CalibData(calib_data, max_batches=cfg.max_batches, num_inputs=num_inputs)
    )
    search = None
    if cfg.budget is not None:
        from torchopt.quantize.sensitivity import auto_keep  # noqa: PLC0415  (it calls back into quantize)

        result = auto_keep(model, data, data, cfg.budget, config=cfg.replace(budget=None), progress=progress)
        if not result.met:
            raise ValueError(result.message)
        search = result.to_dict()
        cfg = cfg.replace(budget=None, keep=[*cfg.to_dict()["keep"], *(r.to_dict() for r in result.keep_rules)])
    model = _quantize(model, cfg, data, mtq, progress)
    getattr(model, RECORD_ATTR).search = search
    return model


def _quantize(model: torch.nn.Module, cfg: QuantizeConfig, data: CalibData, mtq: Any, progress: bool):
    t0 = time.perf_counter()
    method = cfg.resolved_method
    kept = resolve_keep(model, cfg.keep)
    _check_quantizable(model, kept, mtq)
    called = data.check_fits(model)  # on the float model, before anything is changed
    mo_cfg = modelopt_config(cfg.format, method, keep_modules=top_level(kept), alpha=cfg.alpha, mtq=mtq)
    device = model_device(model)

    cache, key, parts, cache_note = None, None, None, "off"
    if cfg.cache_dir is not None:
        if data.is_callable:
            cache_note = "skipped: a callable calib_data cannot be fingerprinted before it runs"
        else:
            cache = CalibrationCache(cfg.cache_dir)
            key, parts = cache_key(model_fingerprint(model), cfg.to_dict(), data.fingerprint(model))

    apply_keep_precision(model, kept)
    notes = [f"fused fast path turned off on {n!r} so that its Q/DQ applies" for n in disable_fused_fast_paths(model)]
    if device.type == "cuda":
        notes += _load_cuda_kernels(cfg.format, mtq)
    if cache is not None and cache.has(key):
        model = cache.restore(model, key)
        fingerprint, batches, cache_note = parts["calib_data"], 0, f"hit {cache.path(key)}"
    else:
        loop = data.forward_loop(progress=progress, desc=f"calibrating {cfg.format}/{method}")
        with _expected_modelopt_warnings():
            if method in HISTOGRAM_METHODS:
                model = mtq.quantize(model, mo_cfg, None)  # algorithm None: only inserts the quantizers
                calibrate_histograms(
                    model, loop, method, percentile=cfg.percentile, entropy_stride=cfg.entropy_stride, progress=progress
                )
            else:
                model = mtq.quantize(model, mo_cfg, loop)
        model.to(device)
        fingerprint, batches = data.last_fingerprint, data.batches_seen
        if cache is not None:
            cache_note = f"miss: saved {cache.save(model, key, parts)}"
    bypassed = bypassed_modules(model, called)

    record = QuantRecord(
        format=cfg.format,
        method=method,
        options=cfg.to_dict(),
        kept={n: {"precision": k.precision, "why": k.why} for n, k in kept.items()},
        modelopt_config=mo_cfg,
        calib_fingerprint=fingerprint,
        calib_batches=batches,
        cache=cache_note,
        seconds=time.perf_counter() - t0,
        bypassed=bypassed,
        notes=notes,
    )
    setattr(model, RECORD_ATTR, record)
    return model


# ModelOpt warns once per layer when SmoothQuant / AWQ skip a layer that calibration never reached; the
# summary reports those layers as "bypassed", so exactly these two messages are silenced.
_EXPECTED_WARNINGS = (
    r"\S+ is not calibrated, skip smoothing",
    r"awq_lite: Forcing pre_quant_scale=1 for \S+ because the expert was not properly exercised",
)


@contextlib.contextmanager
def _expected_modelopt_warnings():
    with warnings.catch_warnings():
        for pattern in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        yield


def _load_cuda_kernels(fmt: str, mtq: Any) -> list[str]:
    """Load ModelOpt's CUDA fake-quant extensions now, once, instead of at the first quantized forward.

    ModelOpt JIT-compiles them on first use and, when that fails (no nvcc on the machine), emits a UserWarning
    and falls back to its PyTorch implementation. Loading them here keeps that warning out of user code (it
    is cached either way) and turns it into a note in the record.
    """
    getters = {"int8": "get_cuda_ext", "int8_smoothquant": "get_cuda_ext", "fp8": "get_cuda_ext_fp8"}
    if fmt not in getters:
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = getattr(mtq.extensions, getters[fmt])()
    if ext is not None:
        return []
    why = str(caught[-1].message).strip().splitlines()[-1] if caught else "unknown reason"
    return [f"ModelOpt's CUDA fake-quant extension for {fmt} is unavailable ({why}); using its PyTorch fallback"]
