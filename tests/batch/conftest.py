"""A simulated device-memory model for testing the batch-size search logic on CPU.

This is NOT a stand-in for CUDA: it only lets the tests control the memory curve and where allocation fails,
so that the search's decisions (probe sizes, refinement, recovery) can be checked exactly. The real thing is
tested on a GPU by the `gpu`-marked tests.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Callable

import pytest
import torch

MiB = 2**20


class _Block:
    """Simulated device bytes, freed when the object dies (as a tensor's storage is)."""

    def __init__(self, device: SimDevice, nbytes: int):
        self.device, self.nbytes = device, nbytes

    def __del__(self) -> None:
        self.device.live -= self.nbytes


class SimDevice:
    """A memory backend plus a step whose peak memory at batch n is ``curve(n)`` bytes above the weights.

    The step allocates a fixed workspace first and the per-batch activations second, so an OOM leaves the
    workspace pinned by the traceback until the ``except`` block is left — as on a real GPU.
    """

    name = "simulated"
    baseline_slack = 0

    def __init__(
        self,
        capacity: int,
        curve: Callable[[int], float],
        *,
        weights: int = 100 * MiB,
        workspace: int = 0,
        total: int | None = None,
    ):
        self.capacity = capacity
        self.total = total if total is not None else capacity
        self.curve = curve
        self.workspace = workspace
        self.live = 0
        self.peak = 0
        self.calls: list[int] = []
        self.cleanups = 0
        self.cleanups_in_except = 0
        self.live_at_cleanup: list[int] = []
        self._weights = self.alloc(weights)

    def alloc(self, nbytes: int) -> _Block:
        if self.live + nbytes > self.capacity:
            raise torch.OutOfMemoryError(
                f"simulated: tried to allocate {nbytes / MiB:.1f} MiB with {self.live / MiB:.1f} of"
                f" {self.capacity / MiB:.1f} MiB in use"
            )
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return _Block(self, nbytes)

    def need(self, n: int) -> int:
        """Peak bytes above the weights at batch n."""
        return self.workspace + int(self.curve(n))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self.calls.append(n)
        workspace = self.alloc(self.workspace)  # noqa: F841  (held while the activations are allocated)
        activations = self.alloc(int(self.curve(n)))  # noqa: F841
        return x.sum()

    def true_max(self, target: int, limit: int = 1 << 20) -> int:
        """The largest n whose peak (weights + need) stays within `target` (by scanning: the curve is cheap)."""
        base = self._weights.nbytes
        best = 0
        for n in range(1, limit):
            if base + self.need(n) > target:
                break
            best = n
        return best

    # -- MemoryBackend ---------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return self.capacity - self.live

    def used_bytes(self) -> int:
        return self.live

    def allocated_bytes(self) -> int:
        return self.live

    def total_bytes(self) -> int:
        return self.total

    def reset_peak(self) -> None:
        self.peak = self.live

    def peak_bytes(self) -> int:
        return self.peak

    def peak_allocated_bytes(self) -> int | None:
        return self.peak

    def cleanup(self) -> None:
        self.cleanups += 1
        if sys.exc_info()[0] is not None:
            self.cleanups_in_except += 1
        gc.collect(0)  # the blocks are freed by reference counting; a full collection costs ~0.15 s here
        self.live_at_cleanup.append(self.live)

    def synchronize(self) -> None:
        pass


def make_batch(n: int) -> torch.Tensor:
    return torch.ones(n, 1)


@pytest.fixture
def sim_device() -> Callable[..., SimDevice]:
    """Factory: ``sim_device(capacity, curve, weights=..., workspace=..., total=...)``."""
    return SimDevice


@pytest.fixture
def sim_inputs() -> Callable[[int], torch.Tensor]:
    return make_batch


def linear(per_item: int) -> Callable[[int], float]:
    return lambda n: per_item * n


def superlinear(per_item: int, knee: int) -> Callable[[int], float]:
    """Linear, then growing faster (an allocator that starts fragmenting): the fit under-predicts."""
    return lambda n: per_item * n + per_item * max(0, n - knee) ** 1.5 / math.sqrt(knee)


@pytest.fixture
def memory_limit():
    """GPU tests: cap this process's CUDA memory (the allocator then raises real OOMs past it); restored after."""
    limits = []

    def set_limit(nbytes: int) -> None:
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(nbytes / total)
        limits.append(nbytes)

    yield set_limit
    if limits:
        torch.cuda.set_per_process_memory_fraction(1.0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def curves():
    return {"linear": linear, "superlinear": superlinear}
