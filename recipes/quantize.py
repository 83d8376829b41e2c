"""Recipe step `quantize`: ModelOpt Q/DQ quantization of the prepared module with the user's calibration data.

The options are `torchopt.quantize.QuantizeConfig` (declared once there, registered here), e.g.::

    - quantize: {format: int8, method: entropy,
                 keep: [{pattern: conv1, precision: fp16}, {pattern: "*head*", precision: fp32}],
                 cache_dir: ~/.cache/torchopt/quant}

The step needs ``optimize(..., calib_data=...)``. It hands later steps ``ctx.quantized`` and
``ctx.calib_fingerprint`` (the TensorRT backend puts it in its engine cache key, through the `Runtime`).
"""

from __future__ import annotations

import torch

from torchopt.quantize.api import quantize
from torchopt.quantize.calibrate import CalibData
from torchopt.quantize.config import QuantizeConfig
from torchopt.quantize.quant_summary import quant_record, summary
from torchopt.recipe import register_step

__all__ = ["QuantizeConfig"]


def _kept_by_reason(kept: dict[str, dict]) -> str:
    """'name, name (why); name (why)': the kept modules grouped by the reason their keep rule gives."""
    groups: dict[str, list[str]] = {}
    for name, item in kept.items():
        groups.setdefault(item["why"], []).append(name)
    return "; ".join(f"{', '.join(names)} ({why})" for why, names in groups.items())


def _apply_quantize(config: QuantizeConfig, ctx) -> None:
    if ctx.calib_data is None:
        raise ValueError(
            "recipe step 'quantize' needs calibration data: call torchopt.optimize(model, recipe, inputs=...,"
            " calib_data=batches) with a DataLoader, a list of input batches or a callable fn(model)"
        )
    # Tuple batches may carry labels after the inputs; floats follow the cast step's dtype.
    data = CalibData(
        ctx.calib_data,
        max_batches=config.max_batches,
        num_inputs=len(ctx.profiles[0]),
        dtype=None if ctx.dtype == torch.float32 else ctx.dtype,
    )
    ctx.log(f"quantizing to {config.format} ({config.resolved_method} calibration)")
    ctx.model = quantize(ctx.model, config, data, progress=ctx.progress)
    record = quant_record(ctx.model)
    ctx.quantized = True
    ctx.set_precision(config.format, f"{config.format} Q/DQ by ModelOpt, {record.method} calibration")
    ctx.calib_fingerprint = record.calib_fingerprint
    info = summary(ctx.model)
    ctx.details.update(
        format=record.format,
        method=record.method,
        calib_batches=record.calib_batches,
        calib_fingerprint=record.calib_fingerprint,
        cache=record.cache,
        counts=info.counts(),
        kept={n: k["why"] for n, k in record.kept.items()},
        excluded={r["module"]: r["why"] for r in info.rows if r["status"] == "excluded"},
        bypassed={r["module"]: r["why"] for r in info.rows if r["status"] == "bypassed"},
        modules=info.rows,
    )
    if record.kept:
        ctx.note(f"quantize: kept {len(record.kept)} modules unquantized: {_kept_by_reason(record.kept)}")
    for note in record.notes:
        ctx.note(f"quantize: {note}")
    if info.bypassed:
        ctx.note(
            f"quantize: {len(info.bypassed)} modules have quantizers their forward never reaches (fused paths),"
            f" so they stay unquantized: {', '.join(info.bypassed)}"
        )
    if record.cache.startswith("hit"):
        ctx.note("quantize: calibration restored from the cache (no calibration run)")
    if record.search:
        ctx.note(f"quantize: sensitivity search: {record.search['message']}")


register_step("quantize", _apply_quantize)(QuantizeConfig)
