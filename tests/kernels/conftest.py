"""Fixtures of the kernel tests. Triton's interpreter is switched on for CPU-only machines by tests/conftest.py,
before anything imports triton."""

import pytest


@pytest.fixture
def tvf():
    """`torchvision.transforms.v2.functional` (through torchopt's CPU-torch workaround), or skip."""
    from torchopt._compat import import_torchvision

    try:
        import_torchvision()
    except ImportError as exc:
        pytest.skip(f"needs torchvision: {exc}")
    from torchvision.transforms.v2 import functional

    return functional


@pytest.fixture
def photo():
    """`photo(name, h, w)`: a real photo (scikit-learn's "china.jpg" / "flower.jpg", 427 x 640) cropped to
    (h, w) uint8 HWC, transposed first where h > 427; or skip."""
    datasets = pytest.importorskip("sklearn.datasets")
    import torch

    def crop(name: str, h: int, w: int) -> torch.Tensor:
        img = torch.from_numpy(datasets.load_sample_image(name).copy())  # read-only array
        if h > img.shape[0]:
            img = img.transpose(0, 1)
        assert h <= img.shape[0] and w <= img.shape[1], (name, h, w)
        return img[:h, :w].contiguous()

    return crop


@pytest.fixture
def tv2(tvf):
    """`torchvision.transforms.v2` (through torchopt's CPU-torch workaround), or skip."""
    from torchvision.transforms import v2

    return v2
