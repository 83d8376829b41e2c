"""Quantization summary: which module got which format, which were kept (and why), which ModelOpt excluded.

`quantize` leaves a `QuantRecord` on the model (``model.torchopt_quant``); `summary(model)` reads it together
with the live ModelOpt quantizers, so it also describes a model restored from the cache.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization
from torchopt.quantize._tables import markdown_table, text_table
from torchopt.quantize.formats import format_from_weights

__all__ = ["QuantRecord", "QuantSummary", "detect_format", "origin_type", "quant_record", "summary"]

RECORD_ATTR = "torchopt_quant"
_COLUMNS = ["module", "type", "status", "precision", "weight", "input", "why"]


@dataclasses.dataclass
class QuantRecord:
    """What `torchopt.quantize.quantize` did to a model (kept on it as ``model.torchopt_quant``)."""

    format: str
    method: str
    options: dict[str, Any]
    kept: dict[str, dict[str, str]]  # module name -> {"precision", "why"}
    modelopt_config: dict[str, Any]
    calib_fingerprint: str | None = None
    calib_batches: int = 0  # 0 when restored from the cache
    cache: str = "off"  # "off", "hit <path>", "miss: saved <path>", "skipped: <why>"
    seconds: float = 0.0
    bypassed: dict[str, str] = dataclasses.field(default_factory=dict)  # module name -> why its Q/DQ never runs
    notes: list[str] = dataclasses.field(default_factory=list)
    search: dict[str, Any] | None = None  # the sensitivity search, when a budget chose the kept layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def quant_record(model: torch.nn.Module) -> QuantRecord | None:
    return getattr(model, RECORD_ATTR, None)


def origin_type(module: torch.nn.Module) -> str:
    """The user-facing class name (ModelOpt swaps in dynamic subclasses such as QuantConv2d)."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("modelopt"):
            return cls.__name__
    return type(module).__name__


def _bits(q: Any) -> str:
    nb = q.num_bits
    names = {(4, 3): "fp8", (5, 2): "fp8e5m2", (2, 1): "fp4"}
    return names.get(tuple(nb), str(nb)) if isinstance(nb, (tuple, list)) else f"int{nb}"


def describe_quantizer(q: Any) -> str:
    """'int8 axis=0 amax∈[0.1, 0.6]', 'fp8 per-tensor amax=2.7', 'int4 block 128', 'off'."""
    if not q.is_enabled:
        return "off"
    parts = [_bits(q)]
    if q.block_sizes:
        sizes = [v for k, v in q.block_sizes.items() if isinstance(k, int)]
        parts.append(
            f"block {sizes[0] if sizes else '?'}" + (" dynamic" if q.block_sizes.get("type") == "dynamic" else "")
        )
    elif q.axis is not None:
        parts.append(f"axis={q.axis}")
    else:
        parts.append("per-tensor")
    amax = q.amax
    if isinstance(amax, torch.Tensor) and amax.numel():
        a = amax.detach().float().cpu()
        parts.append(f"amax={float(a):.3g}" if a.numel() == 1 else f"amax∈[{float(a.min()):.3g}, {float(a.max()):.3g}]")
    elif amax is None and not q.block_sizes:
        parts.append("dynamic amax")
    if getattr(q, "pre_quant_scale", None) is not None:
        parts.append("smoothed")
    return " ".join(parts)


def _exclusion(entries: list[dict[str, Any]], qnames: list[str], module: torch.nn.Module) -> str | None:
    """The last preset entry that disabled these quantizers, as text."""
    mro = {c.__name__ for c in type(module).__mro__}
    for entry in reversed(entries):
        parent = entry.get("parent_class")
        if parent is not None and parent.removeprefix("nn.") not in mro:
            continue
        if any(fnmatch.fnmatch(n, entry["quantizer_name"]) for n in qnames):
            if entry.get("enable", True) is False:
                rule = entry["quantizer_name"] + (f" on {parent}" if parent else "")
                return f"ModelOpt preset excludes {rule!r}"
            return None
    return None


def detect_format(model: torch.nn.Module) -> str | None:
    """The format a model is quantized with (None when it has no quantizer)."""
    record = quant_record(model)
    if record is not None:
        return record.format
    mtq = import_modelopt_quantization()
    quantizers = [(n, m) for n, m in model.named_modules() if isinstance(m, mtq.nn.TensorQuantizer)]
    if not quantizers:
        return None
    weights = [m for n, m in quantizers if n.endswith("weight_quantizer") and m.is_enabled]
    if not weights:
        return "unknown ModelOpt format"
    kind = _bits(weights[0])
    smoothed = any(getattr(m, "pre_quant_scale", None) is not None for _, m in quantizers)
    return format_from_weights(kind, smoothed) or f"unknown ModelOpt format ({kind})"


@dataclasses.dataclass
class QuantSummary:
    """Per-module rows: name, type, status (quantized / kept / excluded / bypassed), quantizers, why."""

    format: str | None
    method: str | None
    rows: list[dict[str, str]]

    def modules(self, status: str) -> list[str]:
        """Module names with a status: 'quantized', 'kept', 'excluded' or 'bypassed'."""
        return [r["module"] for r in self.rows if r["status"] == status]

    @property
    def quantized(self) -> list[str]:
        return self.modules("quantized")

    @property
    def kept(self) -> list[str]:
        return self.modules("kept")

    @property
    def bypassed(self) -> list[str]:
        """Modules with enabled quantizers that calibration never reached (their Q/DQ never runs)."""
        return self.modules("bypassed")

    @property
    def excluded(self) -> list[str]:
        return self.modules("excluded")

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "method": self.method, "rows": self.rows}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def to_markdown(self) -> str:
        return markdown_table(_COLUMNS, [[r[c] for c in _COLUMNS] for r in self.rows])

    def __str__(self) -> str:
        head = f"quantization summary: format={self.format}, method={self.method}, {self.counts()}"
        return head + "\n" + text_table(_COLUMNS, [[r[c] for c in _COLUMNS] for r in self.rows])


def summary(model: torch.nn.Module) -> QuantSummary:
    """Describe every quantizable or kept module of a quantized model.

    Example::

        quantize(model, calib_data=loader, format="int8", keep=["*head*"])
        print(summary(model))           # or summary(model).to_markdown()
    """
    mtq = import_modelopt_quantization()
    record = quant_record(model)
    kept = record.kept if record else {}
    entries = (record.modelopt_config.get("quant_cfg") or []) if record else []
    bypassed = record.bypassed if record else {}
    rows: list[dict[str, str]] = []
    for name, module in model.named_modules():
        children = {c: m for c, m in module.named_children() if isinstance(m, mtq.nn.TensorQuantizer)}
        if not children and name not in kept:
            continue
        weight = children.get("weight_quantizer")
        inp = children.get("input_quantizer")
        enabled = [c for c, m in children.items() if m.is_enabled]

        def qualified(cs, name=name):
            return [f"{name}.{c}" if name else c for c in cs]

        param = next(iter(module.parameters(recurse=False)), None)
        dtype = str(param.dtype).removeprefix("torch.") if param is not None else "-"
        if name in kept:
            status, why = "kept", kept[name]["why"]
            precision = kept[name]["precision"]
            precision = dtype if precision == "auto" else precision
        elif enabled and name in bypassed:
            status, precision = "bypassed", dtype
            why = f"{bypassed[name]}; no Q/DQ is applied"
        elif enabled:
            status, precision = "quantized", dtype
            why = f"{record.format} ({record.method})" if record else "quantized with ModelOpt"
        else:
            status, precision = "excluded", dtype
            why = _exclusion(entries, qualified(children), module) if entries else None
            why = why or "its quantizers are disabled"
        rows.append(
            {
                "module": name or "(root)",
                "type": origin_type(module),
                "status": status,
                "precision": precision,
                "weight": describe_quantizer(weight) if weight is not None else "-",
                "input": describe_quantizer(inp) if inp is not None else "-",
                "why": why,
            }
        )
    return QuantSummary(record.format if record else detect_format(model), record.method if record else None, rows)
