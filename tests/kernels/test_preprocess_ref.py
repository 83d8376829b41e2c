"""`preprocess_ref` (plain torch, the spec the kernel is tested against) against independent implementations:
OpenCV's bilinear resize and YUV conversions, torchvision's antialiased resize and center crop, YOLO's
letterbox arithmetic; and CPU users never import triton."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from torchopt.kernels import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, preprocess_params, preprocess_ref

_IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def levels(images, size, **options) -> torch.Tensor:
    """The reference in pixel units (mean 0, std 1, x 255), NHWC fp32."""
    return preprocess_ref(images, size, layout="NHWC", **options) * 255


# Scales that are not exactly 2x: OpenCV's INTER_LINEAR switches to INTER_AREA for those.
@pytest.mark.parametrize(("src", "size"), [((37, 53), (16, 24)), ((123, 457), (31, 64)), ((13, 9), (40, 70))])
def test_bilinear_within_one_level_of_opencv(src, size):
    cv2 = pytest.importorskip("cv2")
    x = pixels(*src, 3, seed=1)
    expected = torch.from_numpy(cv2.resize(x.numpy(), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)).float()
    diff = (levels(x, size) - expected).abs()
    assert diff.max() <= 1.0, f"{diff.max():.3f} levels from cv2 INTER_LINEAR (11-bit fixed point)"


@pytest.mark.parametrize(("src", "size"), [((37, 53), (16, 24)), ((64, 64), (20, 13)), ((30, 40), (45, 70))])
def test_antialias_matches_torchvision_float(src, size, tvf):
    x = pixels(*src, 3, seed=2)
    expected = tvf.resize(x.permute(2, 0, 1).float(), list(size), antialias=True).permute(1, 2, 0)
    torch.testing.assert_close(levels(x, size, antialias=True), expected, atol=1e-3, rtol=0)


def test_center_crop_matches_torchvision_resize_then_crop(tvf):
    x = pixels(2, 60, 90, 3, seed=3)
    p = preprocess_params((60, 90), 32, fit="crop", crop_pct=0.875)
    # timm's scale_size floor(32 / 0.875) = 36 (not rounded to 37), long side int(36 * 90 / 60) = 54
    assert p.resized_size == (36, 54)
    img = x.permute(0, 3, 1, 2).float()
    expected = tvf.center_crop(tvf.resize(img, list(p.resized_size), antialias=False), [32, 32])
    expected = (expected / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    got = preprocess_ref(x, 32, fit="crop", crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# Odd sizes cut from real photos (427 x 640; taller ones from the transposed photo): half of all aspect ratios
# truncate the long side differently from rounding it.
PHOTO_CROPS = [("china.jpg", 300, 451), ("flower.jpg", 451, 300), ("china.jpg", 333, 500), ("flower.jpg", 481, 257)]
# fp32, normalized units: the reference resamples only the crop window, summing the same taps in another order
# than F.interpolate (measured <= 5e-5 pixel levels); 2e-4 also covers a torch build whose bilinear source
# coordinate rounds twice (unfused multiply-add: 1 ulp of the coordinate, <= 0.01 levels).
CROP_ATOL = 2e-4


def _normalize(levels: torch.Tensor) -> torch.Tensor:
    view = (3, 1, 1)
    return (levels / 255 - torch.tensor(IMAGENET_MEAN).view(view)) / torch.tensor(IMAGENET_STD).view(view)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875, 0.95])
@pytest.mark.parametrize(("name", "h", "w"), PHOTO_CROPS)
def test_crop_is_the_torchvision_eval_transform_on_photos(name, h, w, crop_pct, antialias, photo, tv2):
    x = photo(name, h, w)
    scale_size = math.floor(224 / crop_pct)  # timm's transforms_imagenet_eval
    img = x.permute(2, 0, 1).float()  # float pixels: torchvision resizes with F.interpolate, no uint8 rounding
    resized = tv2.Resize(scale_size, antialias=antialias)(img)
    expected = _normalize(tv2.CenterCrop(224)(resized))
    got, (params,) = preprocess_ref(
        x, 224, fit="crop", crop_pct=crop_pct, antialias=antialias, return_params=True, **_IMAGENET
    )
    assert params.resized_size == tuple(resized.shape[-2:])
    torch.testing.assert_close(got, expected, atol=CROP_ATOL, rtol=0)


def test_crop_geometry_examples():
    p = preprocess_params((300, 451), 224, fit="crop", crop_pct=0.875)
    assert (p.resized_size, p.offset) == ((256, 384), (-16, -80))  # long side int(384.85) = 384, not 385
    p = preprocess_params((451, 300), 224, fit="crop", crop_pct=0.95)
    assert p.resized_size == (353, 235)  # floor(224 / 0.95) = floor(235.8) = 235, not 236


def _full_resize_then_crop(x: torch.Tensor, size: tuple[int, int], **options) -> torch.Tensor:
    """Center crop computed the long way: F.interpolate to the whole resized size, then slice, then normalize."""
    p = preprocess_params(tuple(x.shape[1:3]), size, fit="crop", crop_pct=options["crop_pct"])
    (nh, nw), (top, left) = p.resized_size, p.offset
    img = x.permute(0, 3, 1, 2).float()
    if options.get("interpolation") == "nearest":
        full = F.interpolate(img, (nh, nw), mode="nearest")
    else:
        full = F.interpolate(img, (nh, nw), mode="bilinear", align_corners=False, antialias=options.get("antialias"))
    return _normalize(full[:, :, -top : -top + size[0], -left : -left + size[1]])


@pytest.mark.parametrize("mode", [{"interpolation": "nearest"}, {"antialias": False}, {"antialias": True}])
@pytest.mark.parametrize(
    ("src", "size", "crop_pct"),
    [((37, 53), (16, 16), 1.0), ((53, 37), (16, 24), 0.875), ((13, 9), (40, 70), 0.9), ((1, 90), (8, 8), 1.0)],
)
def test_crop_window_equals_full_resize_then_crop(src, size, crop_pct, mode):
    x = pixels(2, *src, 3, seed=8)
    got = preprocess_ref(x, size, fit="crop", crop_pct=crop_pct, **mode, **_IMAGENET)
    expected = _full_resize_then_crop(x, size, crop_pct=crop_pct, **mode)
    if "interpolation" in mode:  # nearest: the same source pixels, bit for bit
        assert torch.equal(got, expected)
    torch.testing.assert_close(got, expected, atol=CROP_ATOL, rtol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest storage any torch op returns (deterministic: sizes, not timing or RSS)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("mode", [{"interpolation": "nearest"}, {"antialias": False}, {"antialias": True}])
def test_crop_computes_only_the_window(mode):
    x = pixels(1, 400, 3, seed=9)  # a strip: cropped to 32 x 32 from a 32 x 12800 resize (4.9 MB in fp32)
    with _LargestTensor() as seen:
        out = preprocess_ref(x, 32, fit="crop", **mode)
    window, source = out.nbytes, x.numel() * 4
    assert seen.largest <= max(window, source), f"a {seen.largest}-byte tensor for a {window}-byte window"


def _yolo_letterbox(h, w, oh, ow):
    """Ultralytics' LetterBox(auto=False, center=True) arithmetic."""
    r = min(oh / h, ow / w)
    new_w, new_h = round(w * r), round(h * r)
    dw, dh = (ow - new_w) / 2, (oh - new_h) / 2
    return (new_h, new_w), (round(dh - 0.1), round(dw - 0.1))


@pytest.mark.parametrize(
    ("src", "size"),
    [
        ((1080, 1920), (640, 640)),
        ((480, 640), (224, 224)),
        ((2160, 3840), (640, 640)),
        ((31, 17), (24, 40)),
        ((7, 7), (8, 9)),
    ],
)
def test_letterbox_geometry_matches_yolo(src, size):
    p = preprocess_params(src, size, fit="letterbox")
    assert (p.resized_size, p.offset) == _yolo_letterbox(*src, *size)


@pytest.mark.parametrize("fmt", ["nv12", "i420"])
def test_yuv_bt601_limited_within_two_levels_of_opencv(fmt):
    cv2 = pytest.importorskip("cv2")
    frame = pixels(90, 64, seed=4)  # random Y/U/V, including footroom, headroom and saturating chroma
    code = cv2.COLOR_YUV2RGB_NV12 if fmt == "nv12" else cv2.COLOR_YUV2RGB_I420
    expected = torch.from_numpy(cv2.cvtColor(frame.numpy(), code)).float()
    diff = (levels(frame, (60, 64), format=fmt) - expected).abs()
    assert diff.max() <= 2, f"{diff.max():.2f} levels from OpenCV"


def _yuv_frame(y: int, u: int, v: int) -> torch.Tensor:
    """A flat 2x2 frame of one YUV colour: 2 luma rows, then [U, V] (NV12's interleaved row, and also I420's
    1x1 U plane followed by its 1x1 V plane)."""
    return torch.tensor([[y, y], [y, y], [u, v]], dtype=torch.uint8)


@pytest.mark.parametrize(
    ("yuv", "matrix", "rng", "rgb"),
    [
        ((235, 128, 128), "bt601", "limited", (255, 255, 255)),
        ((16, 128, 128), "bt709", "limited", (0, 0, 0)),
        ((128, 128, 128), "bt709", "full", (128, 128, 128)),
        ((81, 90, 240), "bt601", "limited", (255, 0, 0)),  # BT.601 red
        ((63, 102, 240), "bt709", "limited", (255, 0, 0)),  # BT.709 red
        ((173, 42, 26), "bt709", "limited", (0, 255, 0)),  # BT.709 green
        ((32, 240, 118), "bt709", "limited", (0, 0, 255)),  # BT.709 blue
        ((76, 85, 255), "bt601", "full", (254, 0, 0)),  # JPEG (BT.601 full) red
    ],
)
@pytest.mark.parametrize("fmt", ["nv12", "i420"])
def test_yuv_known_colours(yuv, matrix, rng, rgb, fmt):
    got = levels(_yuv_frame(*yuv), 2, format=fmt, yuv_matrix=matrix, yuv_range=rng)
    assert (got - torch.tensor(rgb, dtype=torch.float32)).abs().max() <= 2.0, got[0, 0]


def test_list_is_per_image_and_params_map_back():
    images = [pixels(30, 60, 3, seed=5), pixels(50, 20, 3, seed=6)]
    out, params = preprocess_ref(images, 32, fit="letterbox", return_params=True)
    for img, o, p in zip(images, out, params, strict=True):
        assert torch.equal(o, preprocess_ref(img, 32, fit="letterbox"))
        box = torch.tensor([1.0, 2.0, 15.0, 18.0])
        assert torch.allclose(p.to_source(p.to_output(box)), box, atol=1e-5)
    assert params[0].offset == (8, 0) and params[1].offset == (0, 9)  # 13 wide: 19 px of margin, 9 left
    crop = preprocess_params((30, 60), 32, fit="crop")
    assert crop.offset == (0, -16) and crop.resized_size == (32, 64)


def test_bgr_and_nhwc_are_permutations():
    x = pixels(2, 20, 30, 3, seed=7)
    base = preprocess_ref(x, (10, 12))
    assert torch.equal(preprocess_ref(x.flip(-1), (10, 12), format="bgr"), base)
    assert torch.equal(preprocess_ref(x, (10, 12), output_order="bgr"), base.flip(1))
    assert torch.equal(preprocess_ref(x, (10, 12), layout="nhwc"), base.permute(0, 2, 3, 1))
    cfg = PreprocessConfig(dtype=torch.float16)
    assert preprocess_ref(x, (10, 12), config=cfg).dtype == torch.float16


def test_cpu_users_never_import_triton():
    code = (
        "import sys, torch, torchopt.kernels as K;"
        "x = K.preprocess(torch.full((8, 8, 3), 7, dtype=torch.uint8), 4, mean=K.IMAGENET_MEAN, std=K.IMAGENET_STD);"
        "print(tuple(x.shape), 'triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(3,", "4,", "4)", "False"], proc.stdout
