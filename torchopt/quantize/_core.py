"""Quantization with one plain config (no budget): the checks, ModelOpt's conversion, the calibration (or a
cache hit) and the `QuantRecord`. The public `torchopt.quantize.quantize` puts the budget search
(`torchopt.quantize.layer_sensitivity`) on top of this core; the search itself quantizes through it.

A quantization that fails leaves the model as it was (`torchopt.quantize.snapshot`).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
import warnings
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization
from torchopt.config import check_type, first_few
from torchopt.quantize.attention import attention_forms, explicit_attention
from torchopt.quantize.cache import CalibrationCache, cache_key, model_fingerprint
from torchopt.quantize.calibrate import (
    CalibData,
    bypassed_modules,
    calibrate_histograms,
    disable_fused_fast_paths,
    model_device,
)
from torchopt.quantize.config import QuantizeConfig
from torchopt.quantize.formats import FORMATS, HISTOGRAM_METHODS, modelopt_config, weight_quantized_modules
from torchopt.quantize.keep import apply_keep_precision, resolve_keep, top_level
from torchopt.quantize.quant_summary import RECORD_ATTR, QuantRecord, detect_format
from torchopt.quantize.snapshot import ModuleSnapshot

__all__ = ["check_arguments", "check_target", "quantize_plain"]


def check_arguments(model: Any, progress: Any) -> None:
    """TypeError unless `model` is an nn.Module and `progress` a bool (checked before the config is read)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_type("progress", progress, bool)


def check_target(model: torch.nn.Module, cfg: QuantizeConfig) -> None:
    """ImportError without ModelOpt; ValueError when the format needs CUDA and the model is elsewhere, or when
    the model is quantized already. Nothing is changed."""
    import_modelopt_quantization()
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


def quantize_plain(model: torch.nn.Module, cfg: QuantizeConfig, data: CalibData, *, progress: bool) -> torch.nn.Module:
    """Quantize `model` in place with `cfg` and calibrate it on `data`; returns the model (see
    `torchopt.quantize.quantize`, which this is without the budget search: `cfg.budget` must be None)."""
    check_arguments(model, progress)
    if cfg.budget is not None:
        raise ValueError("quantize_plain takes a config without a budget; torchopt.quantize.quantize searches it")
    check_target(model, cfg)
    return _quantize(model, cfg, data, import_modelopt_quantization(), progress)


def _check_quantizable(model: torch.nn.Module, kept: dict[str, Any], cfg: QuantizeConfig, mo_cfg: dict, mtq: Any):
    """ValueError unless ModelOpt would quantize the weights of at least one layer with `mo_cfg` (ModelOpt
    raises otherwise, after converting the model in place): all kept, or none the format quantizes."""
    if weight_quantized_modules(model, mo_cfg, mtq):
        return
    registry = mtq.QuantModuleRegistry
    layers = [n for n, m in model.named_modules() if type(m) in registry and getattr(m, "weight", None) is not None]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer ModelOpt can quantize (Linear, Conv, ...): nothing to quantize"
        )
    preset = FORMATS[cfg.format].preset
    quantizable = weight_quantized_modules(model, modelopt_config(cfg.format, cfg.resolved_method, mtq=mtq), mtq)
    others = [n for n in layers if n not in quantizable]
    never = f"; ModelOpt's {preset} never quantizes the weights of {others} (by type or name)" if others else ""
    if quantizable:
        raise ValueError(
            f"keep selects every quantizable layer ({quantizable}){never}: nothing would be quantized. Keep fewer"
            " layers"
        )
    raise ValueError(
        f"format {cfg.format!r} quantizes no layer of {type(model).__name__}: ModelOpt's {preset} never quantizes"
        f" the weights of {layers} (by type or name): nothing would be quantized"
    )


def _quantize(model: torch.nn.Module, cfg: QuantizeConfig, data: CalibData, mtq: Any, progress: bool):
    t0 = time.perf_counter()
    # From here on the model changes in place (its attention modules rewritten, then ModelOpt's conversion);
    # whatever fails (a keep rule, ModelOpt, a calibration batch, an interrupt) puts it back as it was, so the
    # caller keeps a float model that a later quantize accepts.
    snapshot = ModuleSnapshot(model)
    try:
        model, attention_notes = _explicit_attention(model, data)
        method = cfg.resolved_method
        first = data.check_fits(model)  # on the float model, before ModelOpt changes it
        kept = resolve_keep(model, cfg.keep, None if first is None else first.input_readers)
        mo_cfg = modelopt_config(cfg.format, method, keep_modules=top_level(kept), alpha=cfg.alpha, mtq=mtq)
        _check_quantizable(model, kept, cfg, mo_cfg, mtq)
        caching = _caching(model, cfg, data)
        quantized, fingerprint, batches, cache_note, notes = _convert_and_calibrate(
            model, cfg, method, mo_cfg, kept, data, mtq, progress, caching
        )
    except BaseException:
        snapshot.restore()
        raise
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
        bypassed=bypassed_modules(quantized, None if first is None else first.called),
        notes=[*attention_notes, *notes],
    )
    setattr(quantized, RECORD_ATTR, record)
    return quantized


def _explicit_attention(model: torch.nn.Module, data: CalibData) -> tuple[torch.nn.Module, list[str]]:
    """`explicit_attention` on the model, with one note for the rewritten modules and one per module left.

    Which attention modules run as cross-attention (split layout) is seen on the first calibration batch (one more
    forward, for models with an nn.MultiheadAttention only); a callable calib_data cannot be run for it, so there
    every supported module gets the packed layout.
    """
    forms = {} if data.is_callable else attention_forms(model, lambda: data.check_fits(model))
    model, done, left = explicit_attention(model, forms)
    rewritten = first_few([repr(n) for n in done])
    notes = [f"{len(done)} nn.MultiheadAttention rewritten ({rewritten}): {_DONE_WHY}"] if done else []
    return model, notes + [f"{name!r}: {why}" for name, why in left.items()]


_DONE_WHY = "their projections are Linear modules that ModelOpt quantizes (torchopt.quantize.attention)"


def _caching(model: torch.nn.Module, cfg: QuantizeConfig, data: CalibData) -> tuple[Any, Any, Any, str]:
    """(cache, key, key parts, note) for the calibration cache; all None and the note when it is not used."""
    if cfg.cache_dir is None:
        return None, None, None, "off"
    if data.is_callable:
        return None, None, None, "skipped: a callable calib_data cannot be fingerprinted before it runs"
    cache = CalibrationCache(cfg.cache_dir)
    key, parts = cache_key(model_fingerprint(model), cfg.to_dict(), data.fingerprint(model))
    return cache, key, parts, "off"


def _convert_and_calibrate(model, cfg, method, mo_cfg, kept, data, mtq, progress, caching):
    """Keep precisions, ModelOpt's conversion and the calibration (or a cache hit): the in-place part."""
    cache, key, parts, cache_note = caching
    device = model_device(model)
    apply_keep_precision(model, kept)
    notes = [f"fused fast path turned off on {n!r} so that its Q/DQ applies" for n in disable_fused_fast_paths(model)]
    if device.type == "cuda":
        notes += _load_cuda_kernels(cfg.format, mtq)
    if cache is not None and cache.has(key):
        with _quiet_modelopt():
            model = cache.restore(model, key)
        return model, parts["calib_data"], 0, f"hit {cache.path(key)}", notes
    loop = data.forward_loop(progress=progress, desc=f"calibrating {cfg.format}/{method}")
    with _expected_modelopt_warnings(), _quiet_modelopt():
        if method in HISTOGRAM_METHODS:
            model = mtq.quantize(model, mo_cfg, None)  # algorithm None: only inserts the quantizers
            calibrate_histograms(
                model, loop, method, percentile=cfg.percentile, entropy_stride=cfg.entropy_stride, progress=progress
            )
        else:
            model = mtq.quantize(model, mo_cfg, loop)
    model.to(device)
    if cache is not None:
        cache_note = f"miss: saved {cache.save(model, key, parts)}"
    return model, data.last_fingerprint, data.batches_seen, cache_note, notes


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


# What ModelOpt prints or warns on every quantization that says nothing about this one: its count of inserted
# quantizers (a print to stdout) and, at the first call, optional integrations it could not import.
_MODELOPT_CHATTER = re.compile(r"Inserted \d+ quantizers")
_MODELOPT_OPTIONAL_PACKAGE = r"Cannot find \S+ package"


class _DropLines(io.TextIOBase):
    """A stdout that drops the lines matching `pattern` and passes every other line on to `target`."""

    def __init__(self, target: Any, pattern: re.Pattern[str]):
        self._target, self._pattern, self._pending = target, pattern, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not self._pattern.fullmatch(line.strip()):
                self._target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not self._pattern.fullmatch(self._pending.strip()):
            self._target.write(self._pending)
        self._pending = ""
        self._target.flush()


@contextlib.contextmanager
def _quiet_modelopt():
    """Inside: ModelOpt's chatter is dropped (`_MODELOPT_CHATTER` lines on stdout, the optional-package
    UserWarnings); everything else printed or warned, torchopt's progress included, comes through."""
    quiet = _DropLines(sys.stdout, _MODELOPT_CHATTER)
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.filterwarnings("ignore", message=_MODELOPT_OPTIONAL_PACKAGE, category=UserWarning)
        try:
            yield
        finally:
            quiet.flush()


def _load_cuda_kernels(fmt: str, mtq: Any) -> list[str]:
    """Load ModelOpt's CUDA fake-quant extensions now, once, instead of at the first quantized forward.

    ModelOpt JIT-compiles them on first use and, when that fails (no nvcc on the machine), emits a UserWarning
    and falls back to its PyTorch implementation. Loading them here keeps that warning out of user code (it
    is cached either way) and turns it into a note in the record.
    """
    getter = FORMATS[fmt].cuda_ext
    if getter is None:
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ext = getattr(mtq.extensions, getter)()
    if ext is not None:
        return []
    why = str(caught[-1].message).strip().splitlines()[-1] if caught else "unknown reason"
    return [f"ModelOpt's CUDA fake-quant extension for {fmt} is unavailable ({why}); using its PyTorch fallback"]
