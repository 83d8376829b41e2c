"""A simulated device-memory model for testing the batch-size search logic on CPU.

This is NOT a stand-in for CUDA: it only lets the tests control the memory curve and where allocation fails,
so that the search's decisions (probe sizes, refinement, recovery) can be checked exactly. The real thing is
tested on a GPU by the `gpu`-marked tests.
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from collections.abc import Callable, Iterator

import pytest
import torch

MiB = 2**20


class _Block:
    """Simulated device bytes, freed when the object dies (as a tensor's storage is)."""

    def __init__(self, device: SimDevice, nbytes: int):
        self.device, self.nbytes = device, nbytes

    def __del__(self) -> None:
        self.device.free(self.nbytes)


class SimDevice:
    """A memory backend plus a step whose peak memory at batch n is ``curve(n)`` bytes above the weights.

    The step allocates a fixed workspace first and the per-batch activations second, so an OOM leaves the
    workspace pinned by the traceback until the ``except`` block is left — as on a real GPU.

    Allocator model (``used_bytes`` = reserved, ``allocated_bytes`` = live):

    - `fragmentation`: holding ``live`` bytes reserves ``live × (1 + fragmentation)``, also under pressure;
    - `cache`: the allocator keeps freed blocks and grows its reserve by ``cache`` of what it needs, but only
      while that fits under ``min(capacity, limit)``: under pressure it releases the cache (``cleanup`` too);
    - an allocation fails when the reserve it needs exceeds ``min(capacity, limit)``; `limit(nbytes)` sets
      the limit for a block (the CUDA backend's per-process fraction). `SimDeviceWithoutLimit` has none:
      a budget below the capacity can then only be judged by measuring;
    - `live_peaks=False` reports no live-tensor peak (``peak_allocated_bytes() is None``), like CPU RSS.

    With the defaults (no fragmentation, no cache) reserved = live at every moment.
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
        fragmentation: float = 0.0,
        cache: float = 0.0,
        live_peaks: bool = True,
    ):
        self.capacity = capacity
        self.total = total if total is not None else capacity
        self.curve = curve
        self.workspace = workspace
        self.fragmentation = fragmentation
        self.cache = cache
        self.live_peaks = live_peaks
        self.live = 0
        self.reserved = 0
        self.peak = 0  # reserved
        self.peak_live = 0
        self.limit_bytes: int | None = None
        self.limits_entered: list[int] = []
        self.calls: list[int] = []
        self.cleanups = 0
        self.cleanups_in_except = 0
        self.live_at_cleanup: list[int] = []
        self._weights = self.alloc(weights)

    def reserved_for(self, live: int) -> int:
        return math.ceil(live * (1 + self.fragmentation))

    @property
    def ceiling(self) -> int:
        return self.capacity if self.limit_bytes is None else min(self.capacity, self.limit_bytes)

    def alloc(self, nbytes: int) -> _Block:
        need = self.reserved_for(self.live + nbytes)
        if need > self.ceiling:
            self.reserved = self.reserved_for(self.live)  # the allocator released its cache, then gave up
            raise torch.OutOfMemoryError(
                f"simulated: tried to allocate {nbytes / MiB:.1f} MiB with {self.live / MiB:.1f} MiB live,"
                f" {need / MiB:.1f} MiB to reserve of {self.ceiling / MiB:.1f} MiB allowed"
            )
        self.live += nbytes
        # Without pressure the reserve keeps growing by the cache; it never exceeds what is allowed.
        self.reserved = min(self.ceiling, max(self.reserved, math.ceil(need * (1 + self.cache))))
        self.peak = max(self.peak, self.reserved)
        self.peak_live = max(self.peak_live, self.live)
        return _Block(self, nbytes)

    def free(self, nbytes: int) -> None:
        self.live -= nbytes
        if not self.cache:  # no caching allocator: the reserve follows the live bytes
            self.reserved = self.reserved_for(self.live)

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
        """The largest n whose reserve, ``(weights + need(n)) × (1 + fragmentation)``, stays within `target`
        (by scanning: the curve is cheap). With an enforced limit at `target`, the OOM boundary."""
        base = self._weights.nbytes
        best = 0
        for n in range(1, limit):
            if self.reserved_for(base + self.need(n)) > target:
                break
            best = n
        return best

    # -- MemoryBackend ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def limit(self, nbytes: int) -> Iterator[None]:
        """Allocations fail past `nbytes` reserved (a tighter limit set before is kept); restored on exit."""
        previous = self.limit_bytes
        self.limit_bytes = nbytes if previous is None else min(previous, nbytes)
        self.limits_entered.append(nbytes)
        try:
            yield
        finally:
            self.limit_bytes = previous

    def free_bytes(self) -> int:
        return self.ceiling - self.reserved

    def used_bytes(self) -> int:
        return self.reserved

    def allocated_bytes(self) -> int:
        return self.live

    def total_bytes(self) -> int:
        return self.total

    def reset_peak(self) -> None:
        self.peak = self.reserved
        self.peak_live = self.live

    def peak_bytes(self) -> int:
        return self.peak

    def peak_allocated_bytes(self) -> int | None:
        return self.peak_live if self.live_peaks else None

    def cleanup(self) -> None:
        self.cleanups += 1
        if sys.exc_info()[0] is not None:
            self.cleanups_in_except += 1
        gc.collect(0)  # the blocks are freed by reference counting; a full collection costs ~0.15 s here
        self.reserved = self.reserved_for(self.live)  # empty_cache: only fragmentation of live blocks stays
        self.live_at_cleanup.append(self.live)

    def synchronize(self) -> None:
        pass


class SimDeviceWithoutLimit(SimDevice):
    """The same device presented without `limit`: the search must judge a budget by measuring peaks."""

    limit = None


def make_sim_device(*args, enforce: bool = True, **kwargs) -> SimDevice:
    return (SimDevice if enforce else SimDeviceWithoutLimit)(*args, **kwargs)


def make_batch(n: int) -> torch.Tensor:
    return torch.ones(n, 1)


@pytest.fixture
def sim_device() -> Callable[..., SimDevice]:
    """Factory: ``sim_device(capacity, curve, weights=..., workspace=..., total=..., fragmentation=...,
    cache=..., live_peaks=True, enforce=True)``; ``enforce=False`` presents the backend without `limit`."""
    return make_sim_device


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
