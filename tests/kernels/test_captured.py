"""`CapturedPreprocess`: one preprocess call recorded as a CUDA graph over a static input buffer."""

import pytest
import torch

from torchopt.kernels import IMAGENET_MEAN, IMAGENET_STD, CapturedPreprocess, preprocess, preprocess_ref

NORM = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded random uint8 pixels (never a constant image, which would hide wrong taps)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def test_captured_preprocess_needs_one_cuda_tensor():
    with pytest.raises(TypeError, match="needs one tensor as its static source"):
        CapturedPreprocess([pixels(1, 8, 8, 3)], 4)
    with pytest.raises(ValueError, match="must be on a CUDA device, got cpu"):
        CapturedPreprocess(pixels(1, 8, 8, 3), 4)


@pytest.mark.gpu
def test_gpu_captured_preprocess_replays_the_same_kernel():
    x = pixels(1, 1080, 1920, 3, seed=22).cuda()
    pre = CapturedPreprocess(x, 224, dtype=torch.float16, **NORM)
    assert torch.equal(pre(), preprocess(x, 224, dtype=torch.float16, **NORM))
    other = pixels(1, 1080, 1920, 3, seed=23).cuda()
    got = pre(other).clone()  # copied into the static input, then replayed
    assert torch.equal(got, preprocess(other, 224, dtype=torch.float16, **NORM))
    ref = preprocess_ref(other, 224, dtype=torch.float16, **NORM)
    # the float16 tolerance of tests/kernels/test_preprocess_op.py's table
    torch.testing.assert_close(got.cpu().float(), ref.cpu().float(), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="must match the captured input"):
        pre(other[:, :720])
