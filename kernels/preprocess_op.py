"""Fused preprocessing: uint8 frames to model-ready tensors in one launch.

``preprocess(images, size, **options)`` = colour conversion (RGB/BGR, NV12/I420 with BT.601/BT.709 and
limited/full range) -> resize (nearest, bilinear, antialiased bilinear) with stretch / letterbox / center-crop
geometry -> ``(x / 255 - mean) / std`` -> NCHW or NHWC, fp32/fp16/bf16, optionally into ``out=``.

Reference: `preprocess_ref` runs the same chain in plain torch, fp32 math: ``F.interpolate(x.float(), size,
mode, align_corners=False, antialias=...)`` (for a center crop, the same taps and weights for the kept window
only), then the normalization, then the cast. The Triton kernel (`_preprocess_triton`: the kernel, its math and
every launch decision) matches it within 1e-3 (fp32), 2e-3 (fp16), 1 ulp (bf16); nearest picks exactly the same
source pixels; the letterbox border is the same bits.

Inputs: uint8 HWC ``(H, W, 3)`` / ``(N, H, W, 3)`` with any strides (crops, channel slices of RGBA, ...) or a
list of differently sized images, processed in one launch; YUV 4:2:0 frames as one ``(H*3/2, W)`` buffer
(``(N, H*3/2, W)`` batched): luma rows, then interleaved UV rows (NV12) or the U then V plane (I420).
Output: ``(N, 3, h, w)`` (NCHW) or ``(N, h, w, 3)`` (NHWC); a single image gives ``(3, h, w)`` / ``(h, w, 3)``.

Where it runs: CUDA tensors -> the Triton kernel; CPU tensors -> the reference, or Triton's interpreter when
TRITON_INTERPRET=1 was set when this module was imported (how the tests run the kernel without a GPU);
``backend="triton"|"reference"`` forces one. This module holds the public functions, the reference and the
cache of launch plans (`_preprocess_triton.LaunchPlan`, the descriptor table on the device) per
(config, size, shape, strides, device): after the first call a batch call allocates only its output (none
with ``out=``) and does no host-device synchronization. Warm up once before capturing a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
import os
import struct
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from torchopt.kernels._preprocess_common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ParsedImages,
    PreprocessConfig,
    PreprocessParams,
    check_out,
    check_size,
    normalization_constants,
    output_shape,
    parse_images,
    plan_geometry,
    resolve_config,
    yuv_coefficients,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessConfig",
    "PreprocessParams",
    "preprocess",
    "preprocess_params",
    "preprocess_ref",
]

# Read once, like Triton reads it when the kernels are decorated (on first launch).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_PLAN_CACHE_SIZE = 64  # distinct (config, size, input layout, device) combinations kept

Images = torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]


def _pixels_to_rgb(x: torch.Tensor, fmt: str, hw: tuple[int, int], yuv: tuple[float, ...]) -> torch.Tensor:
    """(N, 3, H, W) fp32 RGB in 0..255 from a uint8 batch (N, H, W, 3) or a YUV 4:2:0 batch (N, H*3/2, W)."""
    if fmt in ("rgb", "bgr"):
        t = x.permute(0, 3, 1, 2).float()
        return t.flip(1) if fmt == "bgr" else t
    (H, W), n = hw, x.shape[0]
    sn, sh, sw = x.stride()
    if fmt == "nv12":
        uv = x[:, H:]
        u, v = uv[..., 0::2], uv[..., 1::2]
    else:  # i420: U then V plane, rows of half the luma pitch
        base, cp = x.storage_offset() + H * sh, sh // 2
        u = x.as_strided((n, H // 2, W // 2), (sn, cp, sw), base)
        v = x.as_strided((n, H // 2, W // 2), (sn, cp, sw), base + (H // 2) * cp)

    def up(c: torch.Tensor) -> torch.Tensor:  # nearest chroma upsampling, like OpenCV
        return c[:, :, None, :, None].expand(n, H // 2, 2, W // 2, 2).reshape(n, H, W).float() - 128

    u, v = up(u), up(v)
    y_off, cy, crv, cgu, cgv, cbu = yuv
    luma = (x[:, :H].float() - y_off).clamp_(min=0) * cy  # footroom (Y < 16) is black, as in OpenCV
    rgb = torch.stack([luma + crv * v, luma + cgu * u + cgv * v, luma + cbu * u], dim=1)
    return rgb.clamp_(0, 255)


def _f32(v: float) -> float:
    """v rounded to fp32 (C++'s ``(float)v``)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


Taps = tuple[torch.Tensor, torch.Tensor]  # source indices (count, taps) int64 and their weights (count, taps) fp32


def _axis_taps(n_in: int, n_resized: int, start: int, count: int, interpolation: str, antialias: bool, device) -> Taps:
    """The taps of resized positions ``start .. start + count - 1`` of an axis resized from `n_in` to
    `n_resized`, by F.interpolate's formulas (align_corners=False; scale = in/out rounded to fp32):

    * nearest: ``min(floor(dst * scale), in - 1)`` (PyTorch's legacy nearest), one tap of weight 1;
    * bilinear: ``src = max((dst + 0.5) scale - 0.5, 0)``, taps floor(src) and the next one (clamped);
    * antialias: PyTorch's `_compute_indices_min_size_weights_aa` triangle filter, weights normalized.
    """
    dst = torch.arange(start, start + count, device=device)
    one = torch.ones(count, 1, device=device)
    if n_in == n_resized:  # every mode is the identity at scale 1
        return dst[:, None], one
    scale = _f32(n_in / n_resized)  # n_in / n_resized is far from an fp32 tie: rounding twice is exact
    if interpolation == "nearest":
        return (dst.float() * scale).floor().long().clamp_(max=n_in - 1)[:, None], one
    if not antialias:
        # Rounded once, as PyTorch's CPU kernel computes it (a fused multiply-add); an unfused build is 1 ulp off.
        src = ((dst.double() + 0.5) * scale - 0.5).float().clamp_(min=0)
        i0 = src.floor().long().clamp_(max=n_in - 1)
        lam = (src - i0.float()).clamp_(0, 1)
        i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
        return torch.stack([i0, i1], 1), torch.stack([1 - lam, lam], 1)
    # PyTorch's types: center and support are fp32, the sums with 0.5 double, invscale fp32.
    support, invscale = max(scale, 1.0), _f32(1.0 / scale) if scale >= 1.0 else 1.0
    center = (scale * (dst.double() + 0.5)).float()
    lo = ((center - support).double() + 0.5).long().clamp_(min=0)
    hi = ((center + support).double() + 0.5).long().clamp_(max=n_in)
    j = lo[:, None] + torch.arange(2 * math.ceil(support) + 1, device=device)  # PyTorch's max_interp_size
    w = (1 - (((j.float() - center[:, None]).double() + 0.5) * invscale).float().abs()).clamp_(min=0)
    w = torch.where(j < hi[:, None], w, 0.0)
    total = w.sum(1, keepdim=True)
    return j.clamp_(max=n_in - 1), w / torch.where(total != 0, total, 1.0)


def _crop_window_taps(hw: tuple[int, int], geometry: PreprocessParams, config: PreprocessConfig, device):
    """(y taps, x taps) of the output pixels of a center crop (`_resize_window`), None for other geometries."""
    (H, W), (nh, nw) = hw, geometry.resized_size
    (oh, ow), (top, left) = geometry.output_size, geometry.offset
    if nh <= oh and nw <= ow:  # stretch or letterbox: the whole resized image is used
        return None
    mode = (config.interpolation, config.antialias, device)
    return _axis_taps(H, nh, -top, oh, *mode), _axis_taps(W, nw, -left, ow, *mode)


def _resample_axis(x: torch.Tensor, dim: int, taps: Taps) -> torch.Tensor:
    """``out[..., i, ...] = sum_k w[i, k] x[..., idx[i, k], ...]`` along `dim`, the taps summed in order."""
    idx, w = taps
    view = [1] * x.dim()
    view[dim] = -1
    out = x.index_select(dim, idx[:, 0]) * w[:, 0].view(view)
    for k in range(1, idx.shape[1]):
        out += x.index_select(dim, idx[:, k]) * w[:, k].view(view)
    return out


def _resize_window(rgb: torch.Tensor, window: tuple[Taps, Taps]) -> torch.Tensor:
    """The part of the resized image that a center crop keeps, computed alone from its taps.

    The resize is separable (an output pixel's y taps depend on its row only, its x taps on its column): one
    axis is resampled first, then the other, in the order with the smaller intermediate (window rows x source
    width, or source height x window columns), so no tensor is larger than both the source and the window,
    where the whole resized image can be orders of magnitude larger (a 1 x 4000 strip cropped to 112 resizes
    to 112 x 448000). Same taps and weights as F.interpolate; the sums round differently in fp32 only.
    """
    ys, xs = window
    (H, W), oh, ow = rgb.shape[-2:], ys[0].shape[0], xs[0].shape[0]
    if oh * W <= H * ow:
        return _resample_axis(_resample_axis(rgb, 2, ys), 3, xs)
    return _resample_axis(_resample_axis(rgb, 3, xs), 2, ys)


def _reference_chain(
    x: torch.Tensor,
    *,
    fmt: str,
    hw: tuple[int, int],
    geometry: PreprocessParams,
    window: tuple[Taps, Taps] | None,
    interpolation: str,
    antialias: bool,
    mean: torch.Tensor,
    std: torch.Tensor,
    pad: torch.Tensor,
    yuv: tuple[float, ...],
    output_order: str,
    layout: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The eager chain for a batch of same-size images; `torch.compile`-friendly (the benchmark compiles it)."""
    rgb = _pixels_to_rgb(x, fmt, hw, yuv)
    nh, nw = geometry.resized_size
    (oh, ow), (top, left) = geometry.output_size, geometry.offset
    if window is not None:  # center crop: only the window that survives it
        rgb = _resize_window(rgb, window)
    elif (nh, nw) != tuple(hw):
        if interpolation == "nearest":
            rgb = F.interpolate(rgb, size=(nh, nw), mode="nearest")
        else:
            rgb = F.interpolate(rgb, size=(nh, nw), mode="bilinear", align_corners=False, antialias=antialias)
    y = (rgb / 255 - mean) / std
    if (nh, nw) != (oh, ow) and window is None:  # letterbox: the image inside a normalized pad border
        canvas = pad.expand(x.shape[0], 3, oh, ow).clone()
        canvas[:, :, top : top + nh, left : left + nw] = y
        y = canvas
    if output_order == "bgr":
        y = y.flip(1)
    if layout == "NHWC":
        y = y.permute(0, 2, 3, 1)
    return y.to(dtype).contiguous()


def _chain_kwargs(config: PreprocessConfig, hw: tuple[int, int], size: tuple[int, int], device) -> dict[str, Any]:
    """Arguments of `_reference_chain` for images of luma size `hw`."""
    view = (1, 3, 1, 1)
    _, _, pad = normalization_constants(config)
    geometry = plan_geometry(hw, size, config.fit, config.crop_pct)
    return {
        "fmt": config.format,
        "hw": hw,
        "geometry": geometry,
        "window": _crop_window_taps(hw, geometry, config, device),
        "interpolation": config.interpolation,
        "antialias": config.antialias,
        "mean": torch.tensor(config.mean, dtype=torch.float32, device=device).view(view),
        "std": torch.tensor(config.std, dtype=torch.float32, device=device).view(view),
        "pad": torch.tensor(pad, dtype=torch.float32, device=device).view(view),
        "yuv": yuv_coefficients(config.yuv_matrix, config.yuv_range),
        "output_order": config.output_order,
        "layout": config.layout,
        "dtype": config.torch_dtype,
    }


def _finish(result: torch.Tensor, parsed: ParsedImages, out: torch.Tensor | None, params, return_params: bool):
    if parsed.single:
        result = result[0]
    if out is not None:
        out.copy_(result)
        result = out
    return (result, params) if return_params else result


def preprocess_ref(
    images: Images,
    size: int | tuple[int, int],
    *,
    config: PreprocessConfig | None = None,
    out: torch.Tensor | None = None,
    return_params: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[PreprocessParams]]:
    """Eager torch reference of `preprocess` (same signature and output), fp32 math, on any device.

    Example::

        ref = preprocess_ref(frames_u8, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float16)
    """
    cfg = resolve_config(config, options)
    size = check_size(size)
    parsed = parse_images(images, cfg.format)
    shape = output_shape(parsed.n, size, cfg.layout)
    if out is not None:
        check_out(out, shape[1:] if parsed.single else shape, cfg.torch_dtype, parsed.device)
    params = [plan_geometry(hw, size, cfg.fit, cfg.crop_pct) for hw in parsed.sizes]
    if parsed.batch is not None:
        result = _reference_chain(parsed.batch, **_chain_kwargs(cfg, parsed.sizes[0], size, parsed.device))
    else:
        parts = [
            _reference_chain(t.unsqueeze(0), **_chain_kwargs(cfg, hw, size, parsed.device))
            for t, hw in zip(parsed.items, parsed.sizes, strict=True)
        ]
        result = torch.cat(parts)
    return _finish(result, parsed, out, params, return_params)


def preprocess_params(
    image_size: tuple[int, int], size: int | tuple[int, int], *, config: PreprocessConfig | None = None, **options
) -> PreprocessParams:
    """Where an image of `image_size` (H, W) lands in a `size` output under the config's `fit`, without
    running anything (e.g. to map detections back: ``params.to_source(boxes)``)."""
    cfg = resolve_config(config, options)
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2):
        raise TypeError(f"image_size must be (height, width), got {image_size!r}")
    if not all(type(v) is int and v > 0 for v in image_size):
        raise ValueError(f"image_size must be two positive ints (height, width), got {tuple(image_size)!r}")
    return plan_geometry(tuple(image_size), check_size(size), cfg.fit, cfg.crop_pct)


# ------------------------------------------------------------------------------------------------ launcher

# The Triton side imports triton at its top: triton is optional (Linux only) and TRITON_INTERPRET must be set
# before it loads, so it is loaded by name on the first launch (tests/test_layers.py lists this lazy load).
_TRITON_MODULE = "torchopt.kernels._preprocess_triton"


@functools.cache
def _kernels() -> ModuleType:
    """The Triton module, imported on first use (keeps `import torchopt.kernels` free of triton)."""
    return importlib.import_module(_TRITON_MODULE)


_plans: dict = {}  # LaunchPlan by everything its building looked at (`_plan`)


def _list_key(images: Any) -> tuple | None:
    """What `parse_images` checks of each image of a list, or None where that cannot be read (it then raises)."""
    if not isinstance(images, (list, tuple)):
        return None
    try:
        return tuple((t.shape, t.stride(), t.dtype, t.device) for t in images if isinstance(t, torch.Tensor))
    except (AttributeError, TypeError):
        return None


def _plan(k, cfg: PreprocessConfig, images: Any, size: tuple[int, int]):
    """The cached plan for this call. Inputs are checked when the plan is built only: the key holds everything
    the checks looked at (per image of a list: shape, strides, dtype, device), so a hit is a valid input."""
    if isinstance(images, torch.Tensor):
        key = (cfg, size, images.shape, images.stride(), images.dtype, images.device)
    else:
        items = _list_key(images)
        # Not a list of tensors (the filter dropped one): no key, parse_images raises the error below.
        key = None if items is None or len(items) != len(images) else (cfg, size, items)
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan = k.LaunchPlan(cfg, parse_images(images, cfg.format), size)
        if len(_plans) >= _PLAN_CACHE_SIZE:
            # The oldest (dicts keep insertion order); another thread may be evicting at the same time.
            with contextlib.suppress(StopIteration, RuntimeError):
                _plans.pop(next(iter(_plans)), None)
        _plans[key] = plan
    return plan


def _use_triton(images: Any, cfg: PreprocessConfig) -> bool:
    if cfg.backend == "reference":
        return False
    first = images[0] if isinstance(images, (list, tuple)) and images else images
    if cfg.backend == "auto" and type(first) is torch.Tensor and first.is_cuda:  # the hot path, no device object
        return True
    device = first.device if isinstance(first, torch.Tensor) else None
    on_gpu = device is not None and device.type == "cuda"
    if cfg.backend == "auto":
        return on_gpu or (device is not None and device.type == "cpu" and _INTERPRET)
    if device is not None and not on_gpu and not (device.type == "cpu" and _INTERPRET):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before torchopt.kernels is imported"
            f" to run the kernel on CPU tensors in Triton's interpreter; images are on {device}"
        )
    return True


def preprocess(
    images: Images,
    size: int | tuple[int, int],
    *,
    config: PreprocessConfig | None = None,
    out: torch.Tensor | None = None,
    return_params: bool = False,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, list[PreprocessParams]]:
    """Resize, convert and normalize uint8 frames into a model-ready tensor in one kernel launch.

    Args:
        images: uint8 ``(H, W, 3)`` / ``(N, H, W, 3)`` (any strides), a list of such images of different
            sizes (one launch), or YUV 4:2:0 ``(H*3/2, W)`` / ``(N, H*3/2, W)`` frames with format="nv12"/"i420".
        size: output (height, width); an int is a square.
        config: a `PreprocessConfig`; keyword `options` (its field names: mean, std, fit, dtype, layout, ...)
            override single fields.
        out: write into this tensor (right shape, dtype and device, any strides) instead of allocating.
        return_params: also return one `PreprocessParams` per image (resized size, offset) to map boxes back.

    Returns:
        ``(N, 3, h, w)`` NCHW or ``(N, h, w, 3)`` NHWC (no N for a single image), or ``(tensor, params)``.

    Example::

        x = preprocess(frames, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float16)
        x, params = preprocess(frame, 640, fit="letterbox", return_params=True)
        boxes_in_frame = params[0].to_source(boxes)
    """
    cfg = resolve_config(config, options)
    if not _use_triton(images, cfg):
        return preprocess_ref(images, size, config=cfg, out=out, return_params=return_params)
    size = check_size(size)
    plan = _plan(_kernels(), cfg, images, size)
    device = images[0].device if plan.per_image else images.device
    if out is None:
        out = torch.empty(plan.out_shape, dtype=cfg.torch_dtype, device=device)
    else:
        check_out(out, plan.out_shape, cfg.torch_dtype, device)
    plan.run(images, out)
    return (out, list(plan.params)) if return_params else out


def _signature_from_config(fn) -> inspect.Signature:
    """`fn`'s signature with PreprocessConfig's fields spelled out as keyword-only options (declared once, in
    the dataclass), so `inspect.signature(preprocess).bind(...)` rejects unknown options and help() lists them."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    defaults = PreprocessConfig()
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=getattr(defaults, name))
        for name in PreprocessConfig.field_names()
    ]
    return sig.replace(parameters=params)


preprocess.__signature__ = _signature_from_config(preprocess)  # type: ignore[attr-defined]
preprocess_ref.__signature__ = _signature_from_config(preprocess_ref)  # type: ignore[attr-defined]
