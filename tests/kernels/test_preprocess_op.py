"""The Triton preprocessing kernel (on CPU through Triton's interpreter, on the GPU when there is one) against
`preprocess_ref` and exact properties: nearest picks the same pixels, the letterbox border is the normalized
pad value bit for bit, a list in one launch equals per-image calls, every output element is written."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from torchopt.kernels import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, preprocess, preprocess_ref

PP = importlib.import_module("torchopt.kernels.preprocess_op")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and not PP._INTERPRET:
    pytestmark = pytest.mark.skip(
        reason="no GPU, and TRITON_INTERPRET=1 was not set before torchopt.kernels was imported (tests/conftest.py"
        " sets it), so the kernel cannot run here"
    )

# Output tolerance against the fp32 reference, normalized units (issue 7). None: 1 bf16 ulp of the reference,
# checked exactly in `assert_matches` (the kernel rounds to nearest even, so 1 ulp covers fp32 noise at ties).
TOL = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: None}
NORM = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded random uint8 pixels (never a constant image, which would hide wrong taps)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def to_device(images):
    if isinstance(images, list):
        return [t.to(DEVICE) for t in images]
    return images.to(DEVICE)


def run(images, size, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output on CPU, reference output): the kernel writes into a NaN-poisoned `out`."""
    ref = preprocess_ref(images, size, **options)
    out = torch.full(ref.shape, math.nan, dtype=ref.dtype, device=DEVICE)
    got = preprocess(to_device(images), size, out=out, backend="triton", **options)
    assert got is out
    return got.cpu(), ref


def assert_matches(got: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    unwritten = torch.isnan(got.float())
    assert not unwritten.any(), f"{what}: {int(unwritten.sum())} output elements never written, first at " + str(
        unwritten.nonzero()[0].tolist()
    )
    tol = TOL[got.dtype]
    if tol is None:  # bf16: |got - ref| <= one ulp of ref (frexp: |x| = m 2^e, m in [0.5, 1) -> ulp 2^(e-8))
        ulp = torch.ldexp(torch.ones_like(ref.float()), torch.frexp(ref.float()).exponent - 8)
        bad = (got.float() - ref.float()).abs() > ulp
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} bf16 values off by more than 1 ulp, first at {bad.nonzero()[0]}"
        )
    else:
        torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=0, msg=lambda m: f"{what}: {m}")


# (source H, W) -> (output h, w): odd sizes, downscale, upscale, 1x1 in and out, identity (the copy path).
SHAPES = [
    ((37, 53), (16, 24)),
    ((123, 457), (31, 64)),
    ((13, 9), (123, 457)),
    ((5, 7), (1, 1)),
    ((1, 1), (3, 5)),
    ((20, 28), (20, 28)),
]
MODES = {
    "bilinear": {},
    "nearest": {"interpolation": "nearest"},
    "antialias": {"antialias": True},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("src", "size"), SHAPES, ids=lambda v: "x".join(map(str, v)))
def test_resize_matches_reference(mode, src, size):
    n = 2
    if mode == "antialias":  # the interpreter runs every tap of every program: keep its cases small
        n, size = 1, (40, 70) if size == (123, 457) else size
    got, ref = run(pixels(n, *src, 3), size, **MODES[mode], **NORM)
    assert_matches(got, ref, f"{mode} {src}->{size}")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_layouts(dtype, layout):
    got, ref = run(pixels(2, 37, 53, 3, seed=1), (16, 24), dtype=dtype, layout=layout, **NORM)
    assert got.shape == ((2, 3, 16, 24) if layout == "NCHW" else (2, 16, 24, 3))
    assert_matches(got, ref, f"{dtype} {layout}")


@pytest.mark.parametrize(("src", "size"), [((123, 457), (31, 64)), ((13, 9), (40, 70)), ((16, 16), (32, 32))])
def test_nearest_picks_exactly_the_reference_pixels(src, size):
    x = pixels(2, *src, 3, seed=2)
    got = preprocess(to_device(x), size, interpolation="nearest", backend="triton").cpu()  # x / 255
    picked = (got * 255).round().to(torch.uint8)
    expected = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="nearest")  # uint8, no arithmetic
    assert torch.equal(picked, expected), f"{int((picked != expected).sum())} pixels differ"


def _pad_mask(params, size) -> torch.Tensor:
    (top, left), (nh, nw) = params.offset, params.resized_size
    inside = torch.zeros(size, dtype=torch.bool)
    inside[max(top, 0) : top + nh, max(left, 0) : left + nw] = True
    return ~inside


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("src", "size"), [((20, 60), (32, 32)), ((61, 19), (24, 40)), ((31, 31), (17, 30))])
def test_letterbox_border_is_exactly_the_normalized_pad(src, size, dtype):
    pad = (114.0, 0.0, 255.0)
    x = pixels(2, *src, 3, seed=3)
    ref, params = preprocess_ref(x, size, fit="letterbox", pad_value=pad, dtype=dtype, return_params=True, **NORM)
    out = torch.full(ref.shape, math.nan, dtype=dtype, device=DEVICE)
    got, got_params = preprocess(
        to_device(x),
        size,
        fit="letterbox",
        pad_value=pad,
        dtype=dtype,
        out=out,
        return_params=True,
        backend="triton",
        **NORM,
    )
    assert got_params == params
    assert_matches(got.cpu(), ref, "letterbox")
    # The border: (pad / 255 - mean) / std in fp32, cast once to the output dtype, bit for bit.
    expect = (torch.tensor(pad) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    mask = _pad_mask(params[0], size)
    assert mask.any() and not mask.all()
    for c in range(3):
        border = got.cpu()[:, c][:, mask]
        assert torch.equal(border, torch.full_like(border, expect[c].item()).to(dtype).expand_as(border)), c


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize(("src", "size"), [((37, 53), (16, 16)), ((53, 37), (16, 24))])
def test_center_crop_matches_reference(src, size, crop_pct):
    got, ref = run(pixels(2, *src, 3, seed=4), size, fit="crop", crop_pct=crop_pct, **NORM)
    assert_matches(got, ref, "crop")


@pytest.mark.parametrize(
    ("name", "h", "w", "crop_pct", "antialias", "dtype"),
    [
        ("china.jpg", 300, 451, 0.875, False, torch.float32),  # long side int(384.85) = 384
        ("flower.jpg", 451, 300, 0.95, False, torch.float16),  # short side floor(235.8) = 235
        ("flower.jpg", 481, 257, 0.95, True, torch.float32),
    ],
)
def test_crop_is_the_torchvision_eval_transform_on_photos(name, h, w, crop_pct, antialias, dtype, photo, tv2):
    """Resize(floor(224 / crop_pct)) + CenterCrop(224) + normalize, torchvision's own transforms, on real photos."""
    x = photo(name, h, w)
    img = x.permute(2, 0, 1).float()  # float pixels: torchvision resizes with F.interpolate, no uint8 rounding
    tv = tv2.CenterCrop(224)(tv2.Resize(math.floor(224 / crop_pct), antialias=antialias)(img))
    expected = (tv / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.full((3, 224, 224), math.nan, dtype=dtype, device=DEVICE)
    options = {"fit": "crop", "crop_pct": crop_pct, "antialias": antialias, "dtype": dtype}
    got = preprocess(to_device(x), 224, out=out, backend="triton", **options, **NORM)
    assert_matches(got.cpu(), expected.to(dtype), f"{name} {h}x{w} crop_pct={crop_pct}")


@pytest.mark.parametrize("fmt", ["rgb", "bgr"])
@pytest.mark.parametrize("output_order", ["rgb", "bgr"])
def test_channel_orders(fmt, output_order):
    x = pixels(2, 37, 53, 3, seed=5)
    got, ref = run(x, (16, 24), format=fmt, output_order=output_order, **NORM)
    assert_matches(got, ref, f"{fmt}->{output_order}")
    # BGR input is RGB input with the channels reversed: the same output, bit for bit.
    if fmt == "bgr":
        same = preprocess(to_device(x.flip(-1)), (16, 24), output_order=output_order, backend="triton", **NORM)
        assert torch.equal(got, same.cpu())


def _views():
    big = pixels(3, 50, 70, 4, seed=6)
    return {
        "crop": big[:, 3:40, 5:60, :3],
        "crop_rgb24": pixels(3, 50, 70, 3, seed=12)[:, 4:45, 8:61],  # 3-byte pixels, 8-byte aligned start
        "rgba_slice": big[..., :3],
        "transposed": pixels(2, 53, 37, 3, seed=7).transpose(1, 2),
        "batch_step": big[::2, :, :, 1:],
        "broadcast_batch": big[:1, :, :, :3].expand(3, -1, -1, -1),
        "single_image": big[1, 2:30, 1:50, :3],
    }


@pytest.mark.parametrize("view", list(_views()))
def test_non_contiguous_inputs(view):
    x = _views()[view]
    assert not x.is_contiguous()
    got, ref = run(x, (16, 24), **NORM)
    assert got.dim() == (3 if view == "single_image" else 4)
    assert_matches(got, ref, view)


def test_strided_out_is_written_only_in_its_view():
    x = pixels(2, 37, 53, 3, seed=8)
    big = torch.full((2, 3, 20, 40), math.nan, device=DEVICE)
    view = big[:, :, 2:18, 5:29]
    preprocess(to_device(x), (16, 24), out=view, backend="triton", **NORM)
    assert_matches(view.cpu(), preprocess_ref(x, (16, 24), **NORM), "out view")
    outside = big.clone()
    outside[:, :, 2:18, 5:29] = 0
    assert torch.isnan(outside).sum() == big.numel() - view.numel(), "wrote outside the out view"


@pytest.mark.parametrize("fit", ["stretch", "letterbox"])
def test_list_of_sizes_is_one_launch_equal_to_per_image_calls(fit, monkeypatch):
    images = [pixels(37, 53, 3, seed=9), pixels(20, 11, 3, seed=10), pixels(64, 48, 4, seed=11)[::2, :, 1:]]
    k = PP._kernels()
    launches = []
    real = k.launch
    monkeypatch.setattr(k, "launch", lambda *a, **kw: (launches.append(1), real(*a, **kw))[1])
    got, ref = run(images, (16, 24), fit=fit, **NORM)
    assert len(launches) == 1, f"{len(launches)} launches for one list"
    assert_matches(got, ref, "list")
    for i, img in enumerate(images):
        alone = preprocess(to_device(img), (16, 24), fit=fit, backend="triton", **NORM).cpu()
        assert torch.equal(got[i], alone), f"images[{i}] differs from its own call"


@pytest.mark.parametrize("fmt", ["rgb", "bgr"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_list_of_rgb24_images_at_every_alignment(mode, fmt):
    """3-byte pixels read as 64-bit words (RGB24): rows and images start at every byte offset mod 8."""
    big = pixels(60, 70, 3, seed=14)
    images = [big[4:45, 8:61], big[1:30, 1:40], pixels(23, 41, 3, seed=15), big[:7, 3:4]]
    got, ref = run(images, (16, 24), format=fmt, **MODES[mode], **NORM)
    assert_matches(got, ref, f"{fmt} {mode} list")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("fmt", ["rgb", "bgr"])
def test_copy_of_aligned_rgb24_rows(fmt, layout, monkeypatch):
    """Normalize + layout of 3-byte pixels in 8-byte aligned rows (COPY8: 8 pixels from 3 words per thread),
    whole and cropped (a partial last group of 8 pixels)."""
    k = PP._kernels()
    interps = []
    real = k.launch
    monkeypatch.setattr(k, "launch", lambda *a, **kw: (interps.append(kw["interp"]), real(*a, **kw))[1])
    x = pixels(2, 19, 56, 3, seed=16)
    for view in (x, x[:, 2:, 8:45]):
        h, w = view.shape[1:3]
        got, ref = run(view, (h, w), format=fmt, layout=layout, **NORM)
        assert_matches(got, ref, f"{fmt} {layout} {tuple(view.shape)}")
    if DEVICE == "cpu":  # on the GPU the cropped view arrives as a contiguous copy (unaligned rows)
        assert interps == [k.COPY8, k.COPY8], interps


YUV_CASES = [
    ("nv12", "bt601", "limited", {}),
    ("nv12", "bt709", "full", {}),
    ("i420", "bt601", "full", {}),
    ("i420", "bt709", "limited", {}),
    ("nv12", "bt709", "limited", {"interpolation": "nearest"}),
    ("i420", "bt601", "limited", {"antialias": True}),
    ("nv12", "bt601", "limited", {"fit": "letterbox"}),
]


@pytest.mark.parametrize(("fmt", "matrix", "rng", "extra"), YUV_CASES)
def test_yuv_matches_reference(fmt, matrix, rng, extra):
    frames = pixels(2, 36, 40, seed=12)  # (N, H*3/2, W): 24x40 luma
    got, ref = run(frames, (16, 24), format=fmt, yuv_matrix=matrix, yuv_range=rng, **extra, **NORM)
    assert_matches(got, ref, f"{fmt} {matrix} {rng} {extra}")


def test_yuv_with_row_pitch_and_list():
    pitched = pixels(2, 36, 48, seed=13)[:, :, :40]  # decoder buffers with a 48-byte pitch
    for fmt in ("nv12", "i420"):
        got, ref = run(pitched, (16, 24), format=fmt)
        assert_matches(got, ref, f"{fmt} pitched")
    frames = [pixels(36, 40, seed=14), pixels(12, 22, seed=15)]
    got, ref = run(frames, (8, 8), format="nv12")
    assert_matches(got, ref, "nv12 list")


@pytest.mark.parametrize("fmt", ["nv12", "i420"])
def test_yuv_bt601_limited_matches_opencv(fmt):
    cv2 = pytest.importorskip("cv2")
    frame = pixels(54, 46, seed=16)  # 36x46 luma
    got = preprocess(to_device(frame), (36, 46), format=fmt, layout="NHWC", backend="triton").cpu() * 255
    code = cv2.COLOR_YUV2RGB_NV12 if fmt == "nv12" else cv2.COLOR_YUV2RGB_I420
    expected = torch.from_numpy(cv2.cvtColor(frame.numpy(), code)).float()
    diff = (got - expected).abs()
    assert diff.max() <= 2, f"max {diff.max():.2f} levels from OpenCV at {diff.argmax()}"


@pytest.mark.parametrize(("src", "size"), [((37, 53), (16, 24)), ((64, 64), (20, 13)), ((30, 40), (45, 70))])
def test_antialias_within_one_level_of_torchvision(src, size, tvf):
    x = pixels(*src, 3, seed=17)
    got = preprocess(to_device(x), size, antialias=True, backend="triton").cpu() * 255  # pixel units
    tv = tvf.resize(x.permute(2, 0, 1), list(size), antialias=True).float()  # uint8 result, rounded
    # torchvision rounds to uint8 (twice on CPU: after each pass), so compare our rounded pixels.
    assert (got.round() - tv).abs().max() <= 1, f"{(got.round() - tv).abs().max()} levels"
    assert (got - tv).abs().max() < 1.5 and (got - tv).abs().mean() < 0.35


def test_params_map_boxes_back():
    x = pixels(30, 60, 3, seed=18)
    _, params = preprocess(to_device(x), 32, fit="letterbox", return_params=True, backend="triton")
    (p,) = params
    assert p.resized_size == (16, 32) and p.offset == (8, 0) and p.scale == (16 / 30, 32 / 60)
    boxes = torch.tensor([[0.0, 0.0, 60.0, 30.0], [10.0, 5.0, 20.0, 25.0]])
    assert torch.allclose(p.to_output(boxes)[0], torch.tensor([0.0, 8.0, 32.0, 24.0]))
    assert torch.allclose(p.to_source(p.to_output(boxes)), boxes, atol=1e-5)


def test_config_object_equals_keywords_and_plans_are_reused(monkeypatch):
    monkeypatch.setattr(PP, "_plans", {})
    x = to_device(pixels(2, 37, 53, 3, seed=19))
    cfg = PreprocessConfig(fit="letterbox", dtype="float16", **NORM, backend="triton")
    a = preprocess(x, (16, 24), config=cfg)
    n_plans = len(PP._plans)
    b = preprocess(x, (16, 24), fit="letterbox", dtype=torch.float16, backend="triton", **NORM)
    assert torch.equal(a, b)
    assert len(PP._plans) == n_plans, "the same layout built a second launch plan"
    preprocess(x[:, :, :50], (16, 24), config=cfg)  # another stride: a new plan
    assert len(PP._plans) == n_plans + 1


@pytest.mark.gpu
def test_gpu_full_hd_batch_and_list_match_reference():
    x = pixels(4, 1080, 1920, 3, seed=20).cuda()
    for opts in ({}, {"antialias": True}, {"fit": "letterbox", "dtype": torch.float16}):
        got = preprocess(x, 224, **opts, **NORM)
        assert_matches(got.cpu(), preprocess_ref(x, 224, **opts, **NORM).cpu(), str(opts))
    frames = [x[0], x[1, :720, :1280], x[2, ::2, ::2]]
    assert_matches(preprocess(frames, 224, **NORM).cpu(), preprocess_ref(frames, 224, **NORM).cpu(), "list")


@pytest.mark.gpu
def test_gpu_no_allocation_after_warmup_with_out():
    x = pixels(8, 480, 640, 3, seed=21).cuda()
    out = torch.empty(8, 3, 224, 224, dtype=torch.float16, device="cuda")
    preprocess(x, 224, out=out, dtype=torch.float16)  # builds and caches the launch plan
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(10):
        preprocess(x, 224, out=out, dtype=torch.float16)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
