"""Triton kernels (installed as `torchopt.kernels`).

Importing this package does not import triton: each op's launcher imports its kernels on first launch, and
on CPU tensors the torch reference runs (Triton's interpreter when TRITON_INTERPRET=1 is set).

    from torchopt.kernels import preprocess, IMAGENET_MEAN, IMAGENET_STD
    x = preprocess(frames_u8, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float16)
"""

from torchopt.kernels.captured import CapturedPreprocess
from torchopt.kernels.preprocess_op import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessConfig,
    PreprocessParams,
    preprocess,
    preprocess_params,
    preprocess_ref,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CapturedPreprocess",
    "PreprocessConfig",
    "PreprocessParams",
    "preprocess",
    "preprocess_params",
    "preprocess_ref",
]
