"""Quantization formats and calibration methods, and the ModelOpt config each (format, method) pair maps to.

Every format starts from a ModelOpt preset (deep-copied, never mutated) whose ``quant_cfg`` is an ordered list
of ``{"quantizer_name": glob, "parent_class": ..., "cfg": {...}, "enable": bool}`` entries (ModelOpt ≥ 0.44;
later entries win). torchopt only edits the copy:

- ``entropy`` / ``percentile``: the preset's ``*input_quantizer`` entry gets ``"calibrator": "histogram"``
  in place (appending a new enabling entry would re-enable the quantizers the preset's exclusion entries turned
  off) and ``algorithm`` becomes None: ModelOpt's ``max`` algorithm cannot finish a histogram calibrator, so
  `torchopt.quantize.calibrate` collects the statistics and calls ``load_calib_amax`` per quantizer;
- ``smoothquant`` / ``awq`` / ``mse``: the ``algorithm`` entry (with its parameters);
- kept layers: one ``{"quantizer_name": "<module>.*", "enable": False}`` entry per kept module, appended last.

=================  ==========================  ====================================  ========================
format             ModelOpt preset             methods (first = default)             TensorRT deployment
=================  ==========================  ====================================  ========================
int8               INT8_DEFAULT_CFG            max, entropy, percentile, mse         any GPU
int8_smoothquant   INT8_SMOOTHQUANT_CFG        smoothquant                           any GPU
fp8                FP8_DEFAULT_CFG             max, percentile, mse                  sm_89+ (Ada, Hopper)
int4_awq           INT4_AWQ_CFG                awq, max                              no (deploy: int4_weight_only)
nvfp4              NVFP4_DEFAULT_CFG           max                                   sm_100+ (Blackwell)
=================  ==========================  ====================================  ========================

Entropy is not offered for fp8: ModelOpt's KL-divergence search assumes an integer grid (``num_bits`` int).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Iterable
from typing import Any

from torchopt._compat import import_modelopt_quantization
from torchopt.config import check_choice

__all__ = [
    "FORMATS",
    "METHODS",
    "FormatSpec",
    "check_format",
    "check_method",
    "deployment_warning",
    "format_from_weights",
    "modelopt_config",
    "trt_formats",
    "weight_quantized_modules",
]

METHODS = ("max", "entropy", "percentile", "mse", "smoothquant", "awq")
# Methods whose amax comes from a histogram of the activations (ModelOpt's HistogramCalibrator).
HISTOGRAM_METHODS = ("entropy", "percentile")


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """One quantization format: its ModelOpt preset, the methods that apply, and where it can run."""

    name: str
    preset: str
    methods: tuple[str, ...]
    description: str
    needs_cuda: bool = False  # ModelOpt's fake-quant kernels for the format assert CUDA tensors
    trt_min_sm: tuple[int, int] | None = (7, 5)  # None: Torch-TensorRT 2.13 has no converter for it
    # How a model quantized outside torchopt is recognized (`detect_format`): the element type its enabled weight
    # quantizers report ("int8", "fp8", "int4", "fp4"), and, between formats of one weight type, whether
    # SmoothQuant left a ``pre_quant_scale`` on a quantizer.
    weight_kind: str = ""
    smoothed: bool = False
    # The getter in ``mtq.extensions`` of the format's CUDA fake-quant extension, loaded once before calibrating
    # (None: the format has none to load up front).
    cuda_ext: str | None = None
    # The real low-precision execution modes `torchopt.quantize.deployment` turns a calibrated model of this format
    # into (`torchopt.quantize.deployment.LOWP_MODES`); the first runs what calibration chose, scale for scale.
    lowp_modes: tuple[str, ...] = ()

    @property
    def default_method(self) -> str:
        return self.methods[0]

    @property
    def takes_alpha(self) -> bool:
        """Whether the SmoothQuant migration strength (``alpha``) applies to the format."""
        return "smoothquant" in self.methods


FORMATS: dict[str, FormatSpec] = {
    f.name: f
    for f in (
        FormatSpec(
            "int8",
            "INT8_DEFAULT_CFG",
            ("max", "entropy", "percentile", "mse"),
            "INT8 weights per output channel (axis 0), INT8 activations per tensor",
            weight_kind="int8",
            cuda_ext="get_cuda_ext",
            lowp_modes=("int8", "int8_weight_only"),
        ),
        FormatSpec(
            "int8_smoothquant",
            "INT8_SMOOTHQUANT_CFG",
            ("smoothquant",),
            "INT8 with SmoothQuant (activation outliers migrated into the weights); for transformers",
            weight_kind="int8",
            smoothed=True,
            cuda_ext="get_cuda_ext",
            lowp_modes=("int8", "int8_weight_only"),
        ),
        FormatSpec(
            "fp8",
            "FP8_DEFAULT_CFG",
            ("max", "percentile", "mse"),
            "FP8 E4M3 weights and activations, per tensor",
            trt_min_sm=(8, 9),
            weight_kind="fp8",
            cuda_ext="get_cuda_ext_fp8",
            lowp_modes=("fp8", "fp8_rowwise"),
        ),
        FormatSpec(
            "int4_awq",
            "INT4_AWQ_CFG",
            ("awq", "max"),
            "INT4 weight-only, blocks of 128 along the input dim, AWQ scaling",
            trt_min_sm=None,
            weight_kind="int4",
            lowp_modes=("int4_weight_only",),
        ),
        FormatSpec(
            "nvfp4",
            "NVFP4_DEFAULT_CFG",
            ("max",),
            "NVFP4 (E2M1 with FP8 scales per 16 elements) weights and activations",
            needs_cuda=True,
            trt_min_sm=(10, 0),
            weight_kind="fp4",
        ),
    )
}


def format_from_weights(weight_kind: str, smoothed: bool) -> str | None:
    """The format whose weights are `weight_kind` ("int8", "fp8", ...; see `FormatSpec.weight_kind`), told apart
    from another of the same weight type by `smoothed`; None when no format has such weights."""
    same_weights = [f for f in FORMATS.values() if f.weight_kind == weight_kind]
    if len(same_weights) > 1:
        same_weights = [f for f in same_weights if f.smoothed == smoothed]
    return same_weights[0].name if same_weights else None


def trt_formats() -> list[str]:
    """The formats Torch-TensorRT 2.13 converts (on a GPU recent enough: `deployment_warning`)."""
    return [f.name for f in FORMATS.values() if f.trt_min_sm is not None]


def check_format(name: Any, where: str = "format") -> FormatSpec:
    check_choice(where, name, list(FORMATS))
    return FORMATS[name]


def check_method(fmt: str, method: Any, where: str = "method") -> str:
    """The method to use for `fmt` ('auto' → the format's default); ValueError when it does not apply."""
    spec = check_format(fmt)
    if method == "auto":
        return spec.default_method
    check_choice(where, method, ["auto", *METHODS])
    if method not in spec.methods:
        hint = ""
        if method == "smoothquant":
            hint = "; SmoothQuant is its own format: use format 'int8_smoothquant'"
        elif method == "entropy" and fmt == "fp8":
            hint = "; ModelOpt's entropy search assumes an integer grid, use 'percentile' or 'max' for fp8"
        raise ValueError(
            f"{where} {method!r} does not apply to format {fmt!r}; valid methods for {fmt}: "
            f"{', '.join(spec.methods)}{hint}"
        )
    return method


def _preset(mtq: Any, name: str) -> dict[str, Any]:
    return copy.deepcopy(getattr(mtq, name))


def modelopt_config(
    fmt: str,
    method: str,
    *,
    keep_modules: Iterable[str] = (),
    alpha: float | None = None,
    mtq: Any = None,
) -> dict[str, Any]:
    """The ModelOpt ``mtq.quantize`` config for a format and method (a deep copy of the preset, extended).

    Args:
        fmt: a key of `FORMATS`.
        method: one of the format's methods (already resolved, not 'auto').
        keep_modules: module names whose quantizers are disabled (appended last, so they win).
        alpha: SmoothQuant migration strength (None: ModelOpt's default).
        mtq: ``modelopt.torch.quantization`` (imported when None).

    Example::

        cfg = modelopt_config("int8", "entropy", keep_modules=["conv1"])
        mtq.quantize(model, cfg, None)  # then collect histograms: see torchopt.quantize.calibrate
    """
    if mtq is None:
        mtq = import_modelopt_quantization()
    spec = check_format(fmt)
    method = check_method(fmt, method)
    cfg = _preset(mtq, spec.preset)
    entries: list[dict[str, Any]] = cfg["quant_cfg"]
    if method in HISTOGRAM_METHODS:
        found = False
        for entry in entries:
            if entry.get("quantizer_name") == "*input_quantizer" and entry.get("cfg"):
                # In place: the preset's later exclusion entries must keep overriding this one.
                entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
                found = True
        if not found:
            raise ValueError(f"ModelOpt preset {spec.preset} has no '*input_quantizer' entry for {method!r}")
        cfg["algorithm"] = None  # statistics are collected and loaded by torchopt.quantize.calibrate
    elif method == "max":
        cfg["algorithm"] = "max"
    elif method == "mse":
        cfg["algorithm"] = {"method": "mse"}
    elif method == "smoothquant":
        cfg["algorithm"] = {"method": "smoothquant", **({} if alpha is None else {"alpha": float(alpha)})}
    elif method == "awq":
        pass  # the preset's own AWQ algorithm (awq_lite with its alpha_step)
    for name in keep_modules:
        entries.append({"quantizer_name": f"{name}.*", "enable": False})
    return cfg


def _has_weight_quantizer(quant_cls: type) -> bool:
    # ModelOpt's quantized classes declare the quantizers they create (QuantLinearConvBase, _QuantEmbedding).
    return any("weight_quantizer" in vars(c).get("__annotations__", {}) for c in quant_cls.__mro__)


def _entry_applies(entry: dict[str, Any], quantizer: str, quant_cls: type, registry: Any) -> bool:
    if not fnmatch.fnmatch(quantizer, entry.get("quantizer_name", "")):
        return False
    parent = entry.get("parent_class")
    if not parent:
        return True
    parent_cls = registry.get(parent)
    return parent_cls is not None and issubclass(quant_cls, parent_cls)


def weight_quantized_modules(model: Any, config: dict[str, Any], mtq: Any) -> list[str]:
    """Names of the modules whose weight quantizer ModelOpt would leave enabled when quantizing `model` with
    `config` (a `modelopt_config`), read from the float model without changing it.

    Mirrors ``mtq``'s ``set_quantizer_by_cfg``: a module gets a ``<module>.weight_quantizer`` when its quantized
    class declares one (Linear, Conv, ConvTranspose, Embedding, RNNs; not BatchNorm or LayerNorm, whose input
    only is quantized); the ``quant_cfg`` entries apply in order, each one whose ``quantizer_name`` glob matches
    that name (and whose ``parent_class``, if any, the module's quantized class derives from) sets it on (an
    entry with a ``cfg``, or ``enable: True``) or off (``enable: False``): an ``lm_head`` (off by name) or an
    Embedding (off by class) does not count. ModelOpt
    raises after converting the model in place when this list is empty; `quantize` checks it first.
    """
    registry = mtq.QuantModuleRegistry
    names = []
    for name, module in model.named_modules():
        if type(module) not in registry or getattr(module, "weight", None) is None:
            continue
        quant_cls = registry.get(type(module))
        if not _has_weight_quantizer(quant_cls):
            continue  # e.g. BatchNorm, LayerNorm: ModelOpt quantizes their input only
        quantizer = f"{name}.weight_quantizer" if name else "weight_quantizer"
        enabled = True  # a TensorQuantizer's default; every preset starts by turning all of them off
        for entry in config["quant_cfg"]:
            if _entry_applies(entry, quantizer, quant_cls, registry):
                enabled = bool(entry.get("enable", True)) if ("enable" in entry or "cfg" in entry) else enabled
        if enabled:
            names.append(name)
    return names


def deployment_warning(fmt: str, capability: tuple[int, int] | None) -> str | None:
    """Why `fmt` cannot be deployed through TensorRT on a GPU of compute `capability`, or None when it can.

    FP8 Q/DQ layers need sm_89+ (Ada/Hopper), NVFP4 sm_100+ (Blackwell); Torch-TensorRT 2.13 has no converter
    for INT4 weight-only layers at all.

    Example::

        msg = deployment_warning("fp8", torch.cuda.get_device_capability())  # "... needs sm_89+ ..." on an A100
    """
    spec = check_format(fmt)
    if spec.trt_min_sm is None:
        return (
            f"format {fmt!r} cannot be deployed through Torch-TensorRT 2.13 (no converter for its Q/DQ layers);"
            " it runs as fake quantization only"
        )
    if capability is None:
        return None
    if not (isinstance(capability, (tuple, list)) and len(capability) == 2):
        raise TypeError(f"capability must be a (major, minor) pair, got {capability!r}")
    cap = (int(capability[0]), int(capability[1]))
    if cap < spec.trt_min_sm:
        need = f"sm_{spec.trt_min_sm[0]}{spec.trt_min_sm[1]}"
        return (
            f"format {fmt!r} needs a GPU of compute capability {need}+ for TensorRT, this GPU is"
            f" sm_{cap[0]}{cap[1]}: the TensorRT build will fail or fall back to slower kernels; use 'int8'"
            " on this GPU"
        )
    return None
