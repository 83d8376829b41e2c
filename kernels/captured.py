"""`CapturedPreprocess`: one `preprocess` call recorded as a CUDA graph, replayed per frame.

At batch 1 the kernel runs for ~2 us and the call is host-bound: a direct `preprocess` call costs ~17 us of host
time on the H100's host (our plan lookup and checks, then Triton's launcher), a graph replay ~4 us. The graph
reads fixed addresses, so the source is a static buffer: the caller (a decoder, `torchopt.FrameFeeder`, a
``copy_``) writes each frame into ``captured.input``, then calls it; ``captured.output`` is overwritten by each
replay.

    frame_buf = torch.empty(1080, 1920, 3, dtype=torch.uint8, device="cuda")
    pre = CapturedPreprocess(frame_buf, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float16)
    for frame in frames:
        pre.input.copy_(frame, non_blocking=True)   # or decode straight into pre.input
        x = pre()                                   # replay: the same kernel, ~4 us of host time
"""

from __future__ import annotations

from typing import Any

import torch

from torchopt.kernels._preprocess_common import resolve_config
from torchopt.kernels.preprocess_op import preprocess

__all__ = ["CapturedPreprocess"]


class CapturedPreprocess:
    """`preprocess(images, size, **options)` captured once as a CUDA graph over `images` (kept as ``input``).

    Args:
        images: the static source, a uint8 CUDA tensor laid out as `preprocess` accepts (one image or a batch;
            a list is not supported: its images' addresses would all be baked into the graph).
        size, config, options: as for `preprocess` (the Triton path is used: ``backend`` must not be
            "reference").

    Calling the object replays the graph and returns ``output``; ``captured(frames)`` first copies `frames`
    (same shape and dtype) into ``input`` on the current stream.
    """

    def __init__(self, images: torch.Tensor, size: int | tuple[int, int], *, config=None, **options: Any):
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                "CapturedPreprocess needs one tensor as its static source (a list's addresses would be baked into"
                f" the graph), got {type(images).__name__}"
            )
        if not images.is_cuda:
            raise ValueError(
                f"CapturedPreprocess records a CUDA graph: images must be on a CUDA device, got {images.device}"
            )
        cfg = resolve_config(config, options)
        if cfg.backend == "reference":
            raise ValueError("CapturedPreprocess captures the Triton kernel; backend='reference' cannot be captured")
        self.input = images
        self.config = cfg
        self.size = size
        # The first call checks the input, builds the launch plan (descriptors on the device), compiles the kernel
        # and allocates the output; capture then records only the launch.
        with torch.cuda.device(images.device):
            self.output = preprocess(images, size, config=cfg)
            torch.cuda.synchronize()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                preprocess(images, size, config=cfg, out=self.output)
            torch.cuda.synchronize()

    def __call__(self, images: torch.Tensor | None = None) -> torch.Tensor:
        if images is not None:
            want = (self.input.shape, self.input.dtype)
            if not (isinstance(images, torch.Tensor) and (images.shape, images.dtype) == want):
                got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images)
                raise ValueError(
                    f"images must match the captured input ({tuple(self.input.shape)} {self.input.dtype}), got {got}"
                )
            self.input.copy_(images, non_blocking=True)
        self._graph.replay()
        return self.output

    def __repr__(self) -> str:
        shapes = f"input={tuple(self.input.shape)}, size={self.size}, output={tuple(self.output.shape)}"
        return f"CapturedPreprocess({shapes})"
