"""Calibration data named on the command line: image folders, tensor files and callables, cut into batches."""

import numpy as np
import pytest
import torch

from torchopt.calib_source import load_calib_data
from torchopt.inputs import InputSpec

IMAGES = InputSpec("x", min=(1, 3, 12, 10), opt=(2, 3, 12, 10), max=(4, 3, 12, 10))


def test_image_folder_is_resized_scaled_and_batched(tmp_path):
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(20, 30), (7, 9), (12, 10)]):
        pixels = rng.integers(1, 255, (*size, 3), dtype=np.uint8)
        image.fromarray(pixels).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    batches = load_calib_data(str(tmp_path), [IMAGES])
    assert [tuple(b.shape) for b in batches] == [(2, 3, 12, 10), (1, 3, 12, 10)]
    assert all(b.dtype == torch.float32 and b.min() >= 0 and b.max() <= 1 for b in batches)
    # The image already at the target size keeps its pixels (RGB, HWC -> CHW).
    assert torch.equal(batches[1][0], torch.from_numpy(np.array(image.open(tmp_path / "2.png"))).permute(2, 0, 1) / 255)


def test_npy_file_is_cut_into_opt_sized_batches(tmp_path):
    np.save(tmp_path / "s.npy", np.arange(5 * 6, dtype=np.float64).reshape(5, 6))
    spec = InputSpec("x", min=(1, 6), opt=(2, 6), max=(4, 6))
    batches = load_calib_data(str(tmp_path / "s.npy"), [spec])
    assert [tuple(b.shape) for b in batches] == [(2, 6), (2, 6), (1, 6)]
    assert batches[0].dtype == torch.float32 and batches[2][0, 0].item() == 24.0


def test_callable_returns_its_batches(tmp_path):
    (tmp_path / "data.py").write_text("import torch\ndef batches():\n    return [torch.ones(2, 6)]\n")
    got = load_calib_data(f"{tmp_path / 'data.py'}:batches", [InputSpec("x", shape=(2, 6))])
    assert len(got) == 1 and torch.equal(got[0], torch.ones(2, 6))


@pytest.mark.parametrize(
    ("make", "specs", "error", "match"),
    [
        (lambda d: d / "missing.pt", [IMAGES], ValueError, r"--calib '.*missing.pt' does not exist; expected a folder"),
        (lambda d: d, [IMAGES], ValueError, r"holds no images"),
        (lambda d: d / "a.csv", [IMAGES], ValueError, r"unsupported suffix '.csv'"),
        (lambda d: d / "ints.pt", [IMAGES], TypeError, r"samples are torch.int64, input 'x' is float32"),
        (lambda d: d / "dict.pt", [IMAGES], TypeError, r"must hold one tensor of samples, got dict"),
        (
            lambda d: d / "ints.pt",
            [IMAGES, InputSpec("y", shape=(1, 2))],
            ValueError,
            r"a .pt file feeds one input, the model has 2 \(\['x', 'y'\]\)",
        ),
    ],
)
def test_bad_sources(tmp_path, make, specs, error, match):
    (tmp_path / "a.csv").write_text("1,2")
    torch.save(torch.ones(2, 3, 12, 10, dtype=torch.int64), tmp_path / "ints.pt")
    torch.save({"x": torch.ones(1)}, tmp_path / "dict.pt")
    with pytest.raises(error, match=match):
        load_calib_data(str(make(tmp_path)), specs)
