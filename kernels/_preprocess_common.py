"""Options, argument checking and geometry shared by `preprocess` (Triton) and `preprocess_ref` (torch).

Everything here is plain Python/torch: no Triton import, so `import torchopt.kernels` stays light and the
reference runs on machines without Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from torchopt.config import DTYPES, FLOAT_DTYPES, ConfigBase, check_choice, check_type, closest

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ParsedImages",
    "PreprocessConfig",
    "PreprocessParams",
    "check_out",
    "check_size",
    "normalization_constants",
    "parse_images",
    "plan_geometry",
    "resolve_config",
    "yuv_coefficients",
]

PIXEL_FORMATS = ("rgb", "bgr", "nv12", "i420")
YUV_FORMATS = ("nv12", "i420")
INTERPOLATIONS = ("bilinear", "nearest")
FITS = ("stretch", "letterbox", "crop")
ORDERS = ("rgb", "bgr")
LAYOUTS = ("NCHW", "NHWC")
# (Kr, Kb) luma weights of the two matrices video decoders emit; Kg = 1 - Kr - Kb.
YUV_MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
YUV_RANGES = ("limited", "full")
KERNEL_BACKENDS = ("auto", "triton", "reference")
MAX_GRID_BATCH = 65535  # the kernel puts the image index on grid axis 2 (CUDA limit 65535)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    """A number or a length-3 sequence of numbers as a tuple of 3 floats (one per channel)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    check_type(name, value, (list, tuple), "a number or a sequence of 3 numbers (one per channel)")
    if len(value) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel) or one number, got {len(value)}: {value!r}")
    for i, v in enumerate(value):
        check_type(f"{name}[{i}]", v, (int, float), "a number")
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be finite, got {v!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _lower_choice(name: str, value: Any, choices: Sequence[str], upper: bool = False) -> str:
    check_type(name, value, str)
    value = value.upper() if upper else value.lower()
    check_choice(name, value, list(choices))
    return value


@dataclasses.dataclass
class PreprocessConfig(ConfigBase):
    """Every option of `preprocess` / `preprocess_ref`; pass a config or override single fields as keywords.

    format: pixel format of the input: "rgb"/"bgr" for uint8 HWC images, "nv12"/"i420" for YUV 4:2:0 frames
        as decoders emit them, one uint8 buffer of (H*3/2, W) rows (luma, then the chroma planes).
    interpolation: "bilinear" (`F.interpolate(align_corners=False)`) or "nearest" (`F.interpolate`'s
        legacy "nearest": ``src = floor(dst * in / out)``).
    antialias: with bilinear, widen the filter by the downscale factor (torchvision `resize`'s default,
        PIL's BILINEAR); False matches `F.interpolate(antialias=False)` and OpenCV's INTER_LINEAR.
    fit: "stretch" resizes to `size` exactly; "letterbox" keeps the aspect ratio, centers the image and fills
        the rest with `pad_value` (YOLO); "crop" keeps the aspect ratio, covers `size` and crops the center.
    pad_value: letterbox fill in pixel units (0..255), one number or one per RGB channel; normalized like
        the pixels. YOLO uses 114.
    crop_pct: with fit="crop", the crop covers this fraction of the resized image: timm's eval transform,
        ``Resize(floor(size / crop_pct))`` (torchvision's, short side) + ``CenterCrop(size)``; ImageNet eval
        uses 0.875, i.e. resize to 256 then crop 224. 1.0 crops only the excess of the aspect ratio.
    mean, std: ``(x / 255 - mean) / std`` per output channel (RGB order), one number or three; the default
        (0, 1) only scales to [0, 1]. See `IMAGENET_MEAN` / `IMAGENET_STD`.
    yuv_matrix, yuv_range: colour matrix ("bt601" SD, "bt709" HD) and range ("limited": Y in 16..235,
        "full": 0..255) of nv12/i420 input. OpenCV's COLOR_YUV2RGB_NV12 is bt601 + limited.
    output_order: channel order of the output, "rgb" or "bgr".
    layout: "NCHW" or "NHWC" output (case-insensitive).
    dtype: output dtype, "float32", "float16" or "bfloat16" (or the torch dtype).
    backend: "auto" runs the Triton kernel on GPU tensors and the torch reference on CPU tensors (Triton's
        interpreter instead when TRITON_INTERPRET=1 was set when torchopt.kernels was imported); "triton" or
        "reference" force one.

    The config is immutable and hashable (it keys the launch caches): derive variants with
    ``dataclasses.replace(config, dtype="float16")``.
    """

    format: str = "rgb"
    interpolation: str = "bilinear"
    antialias: bool = False
    fit: str = "stretch"
    pad_value: tuple[float, ...] = (114.0, 114.0, 114.0)
    crop_pct: float = 1.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    yuv_matrix: str = "bt601"
    yuv_range: str = "limited"
    output_order: str = "rgb"
    layout: str = "NCHW"
    dtype: str = "float32"
    backend: str = "auto"

    def __post_init__(self) -> None:
        # ConfigBase is a plain dataclass, so this one cannot be frozen=True; it normalizes its fields here and
        # then refuses assignment (see __setattr__), which keeps __hash__ stable.
        self.format = _lower_choice("format", self.format, PIXEL_FORMATS)
        self.interpolation = _lower_choice("interpolation", self.interpolation, INTERPOLATIONS)
        check_type("antialias", self.antialias, bool)
        if self.antialias and self.interpolation == "nearest":
            raise ValueError("antialias=True needs interpolation='bilinear' (nearest has no antialiased variant)")
        self.fit = _lower_choice("fit", self.fit, FITS)
        self.pad_value = _triple("pad_value", self.pad_value)
        if any(not 0.0 <= v <= 255.0 for v in self.pad_value):
            raise ValueError(f"pad_value is in pixel units and must be within [0, 255], got {self.pad_value}")
        check_type("crop_pct", self.crop_pct, (int, float), "a number in (0, 1]")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        self.crop_pct = float(self.crop_pct)
        self.mean = _triple("mean", self.mean)
        self.std = _triple("std", self.std)
        if any(v == 0.0 for v in self.std):
            raise ValueError(f"std must not contain 0 (the pixels are divided by it), got {self.std}")
        self.yuv_matrix = _lower_choice("yuv_matrix", self.yuv_matrix, tuple(YUV_MATRICES))
        self.yuv_range = _lower_choice("yuv_range", self.yuv_range, YUV_RANGES)
        self.output_order = _lower_choice("output_order", self.output_order, ORDERS)
        self.layout = _lower_choice("layout", self.layout, LAYOUTS, upper=True)
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        self.dtype = _lower_choice("dtype", self.dtype, FLOAT_DTYPES)
        self.backend = _lower_choice("backend", self.backend, KERNEL_BACKENDS)
        # Hashed on every launch (plan cache key): computed once.
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, f) for f in self.field_names())))
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise dataclasses.FrozenInstanceError(
                f"PreprocessConfig is immutable; use dataclasses.replace(config, {name}=...)"
            )
        object.__setattr__(self, name, value)

    def __hash__(self) -> int:
        return self._hash

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_yuv(self) -> bool:
        return self.format in YUV_FORMATS


_DEFAULT_CONFIG = PreprocessConfig()


@functools.lru_cache(maxsize=256)
def _config_from_items(items: tuple[tuple[str, Any], ...]) -> PreprocessConfig:
    return _merged(None, dict(items))


def _merged(config: PreprocessConfig | None, options: dict[str, Any]) -> PreprocessConfig:
    """`config` with keyword `options` through `ConfigBase.merge`; an unknown option is a TypeError, as an
    unknown keyword argument of a function is."""
    valid = PreprocessConfig.field_names()
    for key in options:
        if key not in valid:
            raise TypeError(f"unexpected option {key!r}{closest(key, valid)}; the options are: {', '.join(valid)}")
    return PreprocessConfig.merge(config, **options)


def resolve_config(config: PreprocessConfig | None, options: dict[str, Any]) -> PreprocessConfig:
    """The config of one call: `config` (default options when None) with keyword `options` applied.

    `preprocess` resolves its config on every call, and at batch 1 the whole call has a budget of a few µs,
    while building and validating a PreprocessConfig costs tens of µs: keyword-only calls are therefore cached
    on their (hashable) options, so the per-call cost is a dict lookup. The rest goes through the merge.
    """
    if config is not None and not isinstance(config, PreprocessConfig):
        raise TypeError(f"config must be a PreprocessConfig or None, got {type(config).__name__} {config!r}")
    if not options:
        return _DEFAULT_CONFIG if config is None else config
    if config is not None:
        return _merged(config, options)
    try:
        return _config_from_items(tuple(sorted(options.items())))
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return _merged(None, options)  # e.g. mean given as a list


def check_size(size: Any) -> tuple[int, int]:
    """`size` as (height, width): an int is a square."""
    if type(size) is int and size > 0:  # fast paths: the per-call budget at batch 1 is a few us
        return size, size
    ints = type(size) is tuple and len(size) == 2 and type(size[0]) is int and type(size[1]) is int
    if ints and size[0] > 0 and size[1] > 0:
        return size
    if isinstance(size, (list, tuple, torch.Size)):
        if len(size) != 2:
            raise ValueError(f"size must be an int or (height, width), got {len(size)} values: {tuple(size)!r}")
        for i, v in enumerate(size):
            check_type(f"size[{i}]", v, int)
            if v <= 0:
                raise ValueError(f"size must be positive, got {tuple(size)!r}")
        return int(size[0]), int(size[1])
    check_type("size", size, int, "an int or a (height, width) pair")
    raise ValueError(f"size must be positive, got {size!r}")


# ---------------------------------------------------------------------------------------------- geometry


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    """Where one source image landed in the output, to map coordinates (e.g. detected boxes) back.

    The source is resized to `resized_size` and its top-left corner placed at `offset` = (top, left) in
    output pixels: positive for letterbox padding, negative when the center was cropped. In continuous pixel
    coordinates (align_corners=False), ``out = src * scale + offset`` per axis.
    """

    source_size: tuple[int, int]  # (H, W) of the source image
    output_size: tuple[int, int]  # (height, width) of the output
    resized_size: tuple[int, int]  # (h, w) the whole source was resized to
    offset: tuple[int, int]  # (top, left) of the resized image in the output

    @property
    def scale(self) -> tuple[float, float]:
        """(y, x) output pixels per source pixel."""
        return self.resized_size[0] / self.source_size[0], self.resized_size[1] / self.source_size[1]

    def to_source(self, boxes: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Map (..., 4) xyxy boxes from output pixels to source pixels (clipped to the image by default)."""
        sy, sx = self.scale
        top, left = self.offset
        b = boxes.float()
        x = (b[..., 0::2] - left) / sx
        y = (b[..., 1::2] - top) / sy
        if clip:
            x = x.clamp(0, self.source_size[1])
            y = y.clamp(0, self.source_size[0])
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)

    def to_output(self, boxes: torch.Tensor) -> torch.Tensor:
        """Map (..., 4) xyxy boxes from source pixels to output pixels."""
        sy, sx = self.scale
        top, left = self.offset
        b = boxes.float()
        x = b[..., 0::2] * sx + left
        y = b[..., 1::2] * sy + top
        return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


@functools.lru_cache(maxsize=1024)
def plan_geometry(src: tuple[int, int], size: tuple[int, int], fit: str, crop_pct: float) -> PreprocessParams:
    """Resized size and placement of a source of `src` (H, W) in an output of `size` (h, w).

    letterbox: r = min(h/H, w/W), resized (round(H r), round(W r)), centered with the extra pixel of an odd
    margin at the bottom/right (YOLO's LetterBox). crop: the standard evaluation transform, see `_crop_resize`,
    then torchvision CenterCrop's offset ``int(round((resized - h) / 2.0))``.
    """
    (H, W), (oh, ow) = src, size
    if fit == "stretch":
        return PreprocessParams(src, size, size, (0, 0))
    if fit == "letterbox":
        r = min(oh / H, ow / W)
        nh, nw = min(oh, max(1, round(H * r))), min(ow, max(1, round(W * r)))
        return PreprocessParams(src, size, (nh, nw), ((oh - nh) // 2, (ow - nw) // 2))
    nh, nw = _crop_resize(src, size, crop_pct)
    return PreprocessParams(src, size, (nh, nw), (-round((nh - oh) / 2.0), -round((nw - ow) / 2.0)))


def _crop_resize(src: tuple[int, int], size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """The resized (h, w) of timm's eval transform: ``scale_size = floor(size / crop_pct)`` per side, then

    * square output: torchvision ``Resize(scale_size)``: the short side becomes scale_size and the long side
      ``int(scale_size * long / short)`` (truncated, torchvision's `_compute_resized_output_size`);
    * otherwise timm's ``ResizeKeepRatio(scale_size)``: ratio = min(H / scale_h, W / scale_w), both sides
      ``round(side / ratio)``.

    E.g. 300 x 451 -> 224 with crop_pct 0.875: 256 x 384; crop_pct 0.95: short side 235.
    """
    (H, W), (oh, ow) = src, size
    scale_h, scale_w = math.floor(oh / crop_pct), math.floor(ow / crop_pct)
    if scale_h == scale_w:  # crop_pct <= 1: equal only for a square output
        short, long = (W, H) if W <= H else (H, W)
        new_long = int(scale_h * long / short)
        nh, nw = (new_long, scale_h) if W <= H else (scale_h, new_long)
    else:
        ratio = min(H / scale_h, W / scale_w)
        nh, nw = round(H / ratio), round(W / ratio)
    return max(oh, nh), max(ow, nw)  # never below the crop (timm's sizes cover it; float rounding aside)


# ------------------------------------------------------------------------------------------ colour, scale


@functools.lru_cache(maxsize=16)
def yuv_coefficients(matrix: str, rng: str) -> tuple[float, float, float, float, float, float]:
    """(y_offset, cy, crv, cgu, cgv, cbu) of ``R = cy (Y - y_offset) + crv (V - 128)``,
    ``G = cy (Y - y_offset) + cgu (U - 128) + cgv (V - 128)``, ``B = cy (Y - y_offset) + cbu (U - 128)``.

    From the matrix's luma weights (Kr, Kb); limited range stretches Y 16..235 and chroma ±112 to full scale.
    """
    kr, kb = YUV_MATRICES[matrix]
    kg = 1.0 - kr - kb
    y_off, cy, cs = (16.0, 255.0 / 219.0, 255.0 / 224.0) if rng == "limited" else (0.0, 1.0, 1.0)
    crv = cs * 2.0 * (1.0 - kr)
    cbu = cs * 2.0 * (1.0 - kb)
    cgu = -cs * 2.0 * kb * (1.0 - kb) / kg
    cgv = -cs * 2.0 * kr * (1.0 - kr) / kg
    return y_off, cy, crv, cgu, cgv, cbu


@functools.lru_cache(maxsize=256)
def normalization_constants(config: PreprocessConfig) -> tuple[tuple[float, ...], ...]:
    """(scale, bias, pad) per RGB output channel: ``y = x * scale + bias`` for x in 0..255, and the normalized
    letterbox fill.

    scale = 1 / (255 std) and bias = -mean / std are rounded once from float64 (the kernel multiplies: GPU fp32
    division is approximate). The pad is computed in fp32 torch exactly as the reference normalizes pixels,
    so the letterbox border of kernel and reference are the same bits.
    """
    scale = tuple(1.0 / (255.0 * s) for s in config.std)
    bias = tuple(-m / s for m, s in zip(config.mean, config.std, strict=True))
    pad = torch.tensor(config.pad_value, dtype=torch.float32)
    pad = (pad / 255 - torch.tensor(config.mean, dtype=torch.float32)) / torch.tensor(config.std, dtype=torch.float32)
    return scale, bias, tuple(pad.tolist())


# ---------------------------------------------------------------------------------------- argument checks


@dataclasses.dataclass
class ParsedImages:
    """The `images` argument after checking: a batch tensor or a list, and each image's (H, W)."""

    batch: torch.Tensor | None  # (N, H, W, 3) RGB/BGR or (N, H*3/2, W) YUV; None for a list
    items: list[torch.Tensor] | None  # list input: (H, W, 3) or (H*3/2, W) each
    sizes: list[tuple[int, int]]  # luma (H, W) per image
    single: bool  # one image without a batch dim: the output has none either
    device: torch.device

    @property
    def n(self) -> int:
        return len(self.sizes)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}"


def _check_image(where: str, t: Any, fmt: str, dims: tuple[int, ...]) -> tuple[int, int]:
    """Check an image tensor (or a batch) of `fmt` with one of `dims` dimensions; return its luma (H, W)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(
            f"{where} must be uint8 pixels (0..255), got {t.dtype}; float images: (x * 255).round().to(torch.uint8)"
        )
    batched = t.dim() == max(dims)
    if fmt in YUV_FORMATS:
        if t.dim() not in dims:
            hint = " (this looks like HWC RGB: use format='rgb')" if t.dim() >= 3 and t.shape[-1] == 3 else ""
            shapes = " or ".join(("(H*3/2, W)", "(N, H*3/2, W)")[: len(dims)])
            raise ValueError(
                f"{where} must be {shapes} {fmt} frames (luma rows, then chroma rows), got {_describe(t)}{hint}"
            )
        rows, w = t.shape[-2], t.shape[-1]
        if t.numel() == 0:
            raise ValueError(f"{where} has a zero-size dimension: {_describe(t)}")
        if rows % 3 or w % 2:
            hint = " (this looks like HWC RGB: use format='rgb')" if w == 3 else ""
            raise ValueError(
                f"{where}: {fmt} needs even luma height and width (buffer rows = H*3/2 divisible by 3, W even),"
                f" got {_describe(t)}: odd dimensions cannot be 4:2:0 subsampled{hint}"
            )
        if fmt == "i420" and (t.stride(-1) != 1 or t.stride(-2) % 2):
            raise ValueError(
                f"{where}: i420 planes must be packed rows (last stride 1, even row pitch), got strides"
                f" {t.stride()}; pass a contiguous buffer"
            )
        return rows // 3 * 2, w
    if t.dim() not in dims:
        shapes = " or ".join(("(H, W, 3)", "(N, H, W, 3)")[: len(dims)])
        raise ValueError(f"{where} must be a {shapes} uint8 HWC image, got {_describe(t)}")
    c = t.shape[-1]
    if c != 3:
        if t.shape[-3] == 3:
            perm = "permute(0, 2, 3, 1)" if batched and len(dims) > 1 else "permute(1, 2, 0)"
            raise ValueError(f"{where} looks like CHW {_describe(t)}; expected HWC (channels last): use .{perm}")
        hint = {4: " (drop alpha with [..., :3])", 1: " (expand gray with .expand(..., 3))"}.get(c, "")
        raise ValueError(f"{where} must have 3 channels in the last dim (HWC {fmt}), got {c}{hint}: {_describe(t)}")
    if t.numel() == 0:
        raise ValueError(f"{where} has a zero-size dimension: {_describe(t)}")
    return t.shape[-3], t.shape[-2]


def parse_images(images: Any, fmt: str) -> ParsedImages:
    """Check `images` (a tensor or a list of tensors) for pixel format `fmt` and describe it."""
    one = 2 if fmt in YUV_FORMATS else 3  # dims of one image
    if isinstance(images, torch.Tensor):
        hw = _check_image("images", images, fmt, (one, one + 1))
        single = images.dim() == one
        batch = images.unsqueeze(0) if single else images
        if batch.shape[0] > MAX_GRID_BATCH:
            raise ValueError(
                f"images holds {batch.shape[0]} images; at most {MAX_GRID_BATCH} per call, split the batch"
            )
        return ParsedImages(batch, None, [hw] * batch.shape[0], single, images.device)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list; pass at least one image")
        if len(images) > MAX_GRID_BATCH:
            raise ValueError(f"images holds {len(images)} images; at most {MAX_GRID_BATCH} per call")
        sizes = [_check_image(f"images[{i}]", t, fmt, (one,)) for i, t in enumerate(images)]
        device = images[0].device
        for i, t in enumerate(images):
            if t.device != device:
                raise ValueError(f"images[{i}] is on {t.device} but images[0] is on {device}; use one device")
        return ParsedImages(None, list(images), sizes, False, device)
    raise TypeError(
        "images must be a uint8 tensor, (H, W, 3) or (N, H, W, 3) (YUV: (H*3/2, W) or (N, H*3/2, W)),"
        f" or a list of such images, got {type(images).__name__}"
    )


def output_shape(n: int, size: tuple[int, int], layout: str) -> tuple[int, int, int, int]:
    return (n, 3, *size) if layout == "NCHW" else (n, *size, 3)


def check_out(out: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Check a caller-provided output tensor: shape, dtype, device, and no aliased elements."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype} but the config asks for {dtype}; pass dtype={dtype} or fix out")
    if out.shape != tuple(shape):  # torch.Size compares equal to a tuple (not to a list)
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out is on {out.device} but the images are on {device}")
    strides = out.stride()
    if 0 in strides and any(st == 0 and sz > 1 for st, sz in zip(strides, out.shape, strict=True)):
        raise ValueError(f"out has overlapping elements (a zero stride: {strides}); pass a dense tensor")
