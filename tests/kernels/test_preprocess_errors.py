"""Bad input to `preprocess` / `preprocess_ref` raises a TypeError/ValueError naming the argument, before any
kernel is launched; `PreprocessConfig` validates, round-trips through JSON and is immutable."""

import dataclasses
import importlib
import inspect
import json

import pytest
import torch

from torchopt.kernels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    preprocess,
    preprocess_params,
    preprocess_ref,
)

PP = importlib.import_module("torchopt.kernels.preprocess_op")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def img(*shape: int, dtype=torch.uint8) -> torch.Tensor:
    return torch.randint(1, 255, shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)


@pytest.fixture
def no_launch(monkeypatch):
    """Fail if a bad call reaches the kernel (the error must come from the argument checks)."""
    if DEVICE == "cpu" and not PP._INTERPRET:
        return
    monkeypatch.setattr(PP._kernels(), "launch", lambda *a, **k: pytest.fail("kernel launched on bad input"))


def _meta(*shape):
    return torch.empty(shape, dtype=torch.uint8, device="meta")


BAD_INPUTS = {
    "float_images": (lambda: img(8, 8, 3, dtype=torch.float32), 4, {}, TypeError, r"images must be uint8.*float32"),
    "four_channels": (lambda: img(8, 8, 4), 4, {}, ValueError, r"images must have 3 channels.*got 4.*alpha"),
    "one_channel": (lambda: img(2, 8, 8, 1), 4, {}, ValueError, r"images must have 3 channels.*got 1"),
    "chw": (lambda: img(3, 20, 30), 4, {}, ValueError, r"images looks like CHW.*permute\(1, 2, 0\)"),
    "nchw": (lambda: img(2, 3, 20, 30), 4, {}, ValueError, r"images looks like CHW.*permute\(0, 2, 3, 1\)"),
    "2d_rgb": (lambda: img(8, 8), 4, {}, ValueError, r"images must be a \(H, W, 3\) or \(N, H, W, 3\)"),
    "zero_height": (lambda: img(0, 8, 3), 4, {}, ValueError, r"images has a zero-size dimension"),
    "empty_batch": (lambda: img(0, 8, 8, 3), 4, {}, ValueError, r"images has a zero-size dimension"),
    "numpy": (lambda: img(8, 8, 3).cpu().numpy(), 4, {}, TypeError, r"images must be a uint8 tensor.*ndarray"),
    "empty_list": (lambda: [], 4, {}, ValueError, r"images is an empty list"),
    "list_non_tensor": (lambda: [img(8, 8, 3), "frame"], 4, {}, TypeError, r"images\[1\] must be a torch.Tensor"),
    "list_bad_item": (lambda: [img(8, 8, 3), img(8, 8, 4)], 4, {}, ValueError, r"images\[1\] must have 3 channels"),
    "list_mixed_devices": (lambda: [img(8, 8, 3), _meta(8, 8, 3)], 4, {}, ValueError, r"images\[1\] is on meta"),
    "size_zero": (lambda: img(8, 8, 3), 0, {}, ValueError, r"size must be positive"),
    "size_negative": (lambda: img(8, 8, 3), (4, -1), {}, ValueError, r"size must be positive"),
    "size_str": (lambda: img(8, 8, 3), "224", {}, TypeError, r"size must be an int or a \(height, width\)"),
    "size_three": (lambda: img(8, 8, 3), (1, 2, 3), {}, ValueError, r"size must be an int or \(height, width\)"),
    "size_float": (lambda: img(8, 8, 3), (2.5, 3), {}, TypeError, r"size\[0\] must be int"),
    "mean_length": (lambda: img(8, 8, 3), 4, {"mean": (0.5, 0.5)}, ValueError, r"mean needs 3 values.*got 2"),
    "std_zero": (lambda: img(8, 8, 3), 4, {"std": (0.2, 0.0, 0.2)}, ValueError, r"std must not contain 0"),
    "std_str": (lambda: img(8, 8, 3), 4, {"std": "0.2"}, TypeError, r"std must be a number or a sequence"),
    "nv12_odd_width": (lambda: img(30, 21), 4, {"format": "nv12"}, ValueError, r"images: nv12 needs even.*odd"),
    "nv12_odd_height": (lambda: img(31, 20), 4, {"format": "nv12"}, ValueError, r"images: nv12 needs even"),
    "i420_odd_list": (lambda: [img(30, 20), img(6, 3)], 4, {"format": "i420"}, ValueError, r"images\[1\]: i420"),
    "i420_unpacked": (lambda: img(30, 40)[:, ::2], 4, {"format": "i420"}, ValueError, r"i420 planes must be packed"),
    "nv12_given_rgb": (lambda: img(8, 8, 3), 4, {"format": "nv12"}, ValueError, r"looks like HWC RGB"),
    "unknown_option": (
        lambda: img(8, 8, 3),
        4,
        {"interpolaton": "nearest"},
        TypeError,
        r"unexpected option 'interpolaton' \(did you mean 'interpolation'\?\)",
    ),
    "bad_interpolation": (
        lambda: img(8, 8, 3),
        4,
        {"interpolation": "bicubic"},
        ValueError,
        r"interpolation must be one of \['bilinear', 'nearest'\], got 'bicubic'",
    ),
    "antialias_nearest": (
        lambda: img(8, 8, 3),
        4,
        {"interpolation": "nearest", "antialias": True},
        ValueError,
        r"antialias=True needs interpolation='bilinear'",
    ),
    "bad_layout": (lambda: img(8, 8, 3), 4, {"layout": "CHW"}, ValueError, r"layout must be one of \['NCHW', 'NHWC'\]"),
    "bad_dtype": (lambda: img(8, 8, 3), 4, {"dtype": torch.int8}, ValueError, r"dtype must be one of.*'int8'"),
    "bad_pad": (lambda: img(8, 8, 3), 4, {"pad_value": 300}, ValueError, r"pad_value is in pixel units"),
    "bad_crop_pct": (lambda: img(8, 8, 3), 4, {"crop_pct": 0}, ValueError, r"crop_pct must be in \(0, 1\]"),
    "bad_format": (lambda: img(8, 8, 3), 4, {"format": "yuyv"}, ValueError, r"format must be one of"),
    "bad_backend": (lambda: img(8, 8, 3), 4, {"backend": "cuda"}, ValueError, r"backend must be one of"),
}


@pytest.mark.parametrize("fn", [preprocess, preprocess_ref], ids=["preprocess", "preprocess_ref"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case, fn, no_launch):
    make, size, options, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        fn(make(), size, **options)


BAD_OUT = {
    "shape": (lambda: torch.empty(2, 3, 4, 5, device=DEVICE), ValueError, r"out must have shape \(2, 3, 4, 4\)"),
    "dtype": (lambda: torch.empty(2, 3, 4, 4, dtype=torch.float16, device=DEVICE), TypeError, r"out has dtype"),
    "device": (lambda: torch.empty(2, 3, 4, 4, device="meta"), ValueError, r"out is on meta"),
    "not_tensor": (lambda: [[0.0]], TypeError, r"out must be a torch.Tensor"),
    "aliased": (lambda: torch.empty(1, 3, 4, 4, device=DEVICE).expand(2, 3, 4, 4), ValueError, r"zero stride"),
    "missing_batch": (lambda: torch.empty(3, 4, 4, device=DEVICE), ValueError, r"out must have shape"),
}


@pytest.mark.parametrize("fn", [preprocess, preprocess_ref], ids=["preprocess", "preprocess_ref"])
@pytest.mark.parametrize("case", list(BAD_OUT))
def test_bad_out_names_out(case, fn, no_launch):
    make, exc, match = BAD_OUT[case]
    with pytest.raises(exc, match=match):
        fn(img(2, 8, 8, 3), 4, out=make())


def test_triton_backend_on_cpu_without_interpreter_says_how(monkeypatch):
    monkeypatch.setattr(PP, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match=r"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1"):
        preprocess(torch.zeros(4, 4, 3, dtype=torch.uint8), 2, backend="triton")
    # auto falls back to the reference on CPU
    x = torch.randint(0, 256, (4, 4, 3), dtype=torch.uint8)
    assert torch.equal(preprocess(x, 2), preprocess_ref(x, 2))


def test_config_round_trips_and_is_immutable():
    cfg = PreprocessConfig(
        format="NV12",
        mean=IMAGENET_MEAN,
        std=list(IMAGENET_STD),
        dtype=torch.bfloat16,
        layout="nhwc",
        pad_value=0,
        fit="letterbox",
        yuv_matrix="BT709",
    )
    assert (cfg.format, cfg.layout, cfg.dtype, cfg.pad_value, cfg.yuv_matrix) == (
        "nv12",
        "NHWC",
        "bfloat16",
        (0.0, 0.0, 0.0),
        "bt709",
    )
    again = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError, match="immutable.*replace"):
        cfg.dtype = "float16"
    assert dataclasses.replace(cfg, dtype="float16").dtype == "float16" and cfg.dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"unknown key 'no_such'.*valid keys"):
        PreprocessConfig.from_dict({"no_such": 1})
    with pytest.raises(TypeError, match=r"config must be a PreprocessConfig"):
        preprocess(img(8, 8, 3), 4, config={"dtype": "float16"})


@pytest.mark.parametrize("fn", [preprocess, preprocess_ref], ids=["preprocess", "preprocess_ref"])
def test_signature_lists_the_config_fields(fn):
    sig = inspect.signature(fn)
    assert list(sig.parameters)[:5] == ["images", "size", "config", "out", "return_params"]
    assert set(PreprocessConfig.field_names()) <= set(sig.parameters)
    sig.bind(None, size=4, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float16, layout="NCHW")
    with pytest.raises(TypeError, match="no_such_option"):
        sig.bind(None, size=4, no_such_option=1)


def test_preprocess_params_checks_its_arguments():
    assert preprocess_params((1080, 1920), 640, fit="letterbox").offset == (140, 0)
    with pytest.raises(TypeError, match=r"image_size must be \(height, width\)"):
        preprocess_params(1080, 640)
    with pytest.raises(ValueError, match=r"image_size must be two positive ints"):
        preprocess_params((1080, 0), 640)
    with pytest.raises(ValueError, match="size must be positive"):
        preprocess_params((1080, 1920), 0)
