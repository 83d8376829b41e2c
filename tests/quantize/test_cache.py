"""Calibration cache: mto.save / mto.restore keyed by model, options and data; bit-identical after restore."""

import copy
import os

import pytest
import torch

import torchopt.quantize as tq
from torchopt.quantize.cache import model_fingerprint


def _run(model, digits, tmp_path, **options):
    return tq.quantize(
        copy.deepcopy(model), "int8", digits.calib(4), cache_dir=str(tmp_path), progress=False, **options
    )


@pytest.mark.parametrize(
    "options",
    [
        {"method": "max"},
        {"method": "entropy", "entropy_stride": 16},  # the histogram path: amax loaded by torchopt
        {"method": "percentile", "keep": [{"pattern": "conv1", "precision": "fp16"}]},
    ],
)
def test_restore_is_bit_identical_and_skips_calibration(cnn, digits, tmp_path, options):
    first = _run(cnn, digits, tmp_path, **options)
    assert first.torchopt_quant.cache.startswith("miss: saved")
    assert len(list(tmp_path.glob("*.pth"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1

    calls = []
    counting = copy.deepcopy(cnn)
    counting.register_forward_pre_hook(lambda m, a: calls.append(1))
    second = tq.quantize(counting, "int8", digits.calib(4), cache_dir=str(tmp_path), progress=False, **options)
    assert second.torchopt_quant.cache.startswith("hit")
    assert len(calls) == 1  # only the shape check of batch 0: no calibration forwards
    assert second.torchopt_quant.calib_fingerprint == first.torchopt_quant.calib_fingerprint
    with torch.no_grad():
        for x in digits.test_batches():
            assert torch.equal(first(x), second(x))
    assert tq.summary(second).rows == tq.summary(first).rows


@pytest.mark.parametrize(
    "change",
    ["data", "method", "keep", "weights"],
)
def test_anything_that_changes_the_result_misses(cnn, digits, tmp_path, change):
    _run(cnn, digits, tmp_path)
    model, calib, options = copy.deepcopy(cnn), digits.calib(4), {}
    if change == "data":
        calib = digits.calib(3)
    elif change == "method":
        options = {"method": "percentile"}
    elif change == "keep":
        options = {"keep": ["head"]}
    else:
        with torch.no_grad():
            model.head.bias[0] += 1e-6
    q = tq.quantize(model, "int8", calib, cache_dir=str(tmp_path), progress=False, **options)
    assert q.torchopt_quant.cache.startswith("miss")
    assert len(list(tmp_path.glob("*.pth"))) == 2


def test_model_fingerprint(cnn):
    fp = model_fingerprint(cnn)
    assert fp == model_fingerprint(copy.deepcopy(cnn))
    with torch.no_grad():
        cnn.fc1.weight[0, 0] += 1e-7
    assert model_fingerprint(cnn) != fp


def test_callable_calibration_skips_the_cache(cnn, digits, tmp_path):
    batches = digits.calib(2)
    q = tq.quantize(cnn, "int8", lambda m: [m(x) for x in batches], cache_dir=str(tmp_path), progress=False)
    assert q.torchopt_quant.cache.startswith("skipped: a callable calib_data")
    assert not list(tmp_path.glob("*.pth"))


def test_corrupt_entry_names_the_file(cnn, digits, tmp_path):
    _run(cnn, digits, tmp_path)
    (entry,) = tmp_path.glob("*.pth")
    entry.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=rf"calibration cache entry '{entry}' cannot be restored.*delete it"):
        _run(cnn, digits, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_cache_dir(cnn, digits, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match=r"cache_dir .* is not writable"):
        tq.quantize(cnn, "int8", digits.calib(1), cache_dir=str(locked), progress=False)


def test_cache_dir_that_is_a_file(cnn, digits, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"cache_dir .* cannot be created"):
        tq.quantize(cnn, "int8", digits.calib(1), cache_dir=str(f), progress=False)
