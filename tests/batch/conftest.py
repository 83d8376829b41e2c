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


def format_size(nbytes: int) -> str:
    """Sizes as c10's CUDA caching allocator prints them in its OOM message (2 decimals, binary units)."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20)):
        if nbytes <= 1024 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 2**30:.2f} GiB"


def allocator_message(
    requested: int,
    allocated: int,
    reserved: int,
    *,
    private: int = 0,
    allowed: int | None = None,
    processes: tuple[tuple[int | None, int], ...] = (),
    total: int = 140 * 2**30,
    free: int = 100 * 2**30,
) -> str:
    """The out-of-memory message of c10's CUDACachingAllocator (torch 2.1+), concatenated as
    DeviceCachingAllocator::malloc does: `allocated` live bytes, `private` free bytes cached in CUDA-graph private
    pools, `reserved` all reserved bytes, `allowed` the per-process limit, `processes` NVML's (pid or None for
    this process, bytes in use) lines."""
    procs = "".join(
        f"{'Including non-PyTorch memory, this process' if pid is None else f'Process {pid}'} has"
        f" {format_size(used)} memory in use. "
        for pid, used in processes
    )
    limit = f"{format_size(allowed)} allowed; " if allowed is not None else ""
    pools = f"with {format_size(private)} allocated in private pools (e.g., CUDA Graphs), " if private else ""
    return (
        f"CUDA out of memory. Tried to allocate {format_size(requested)}. GPU 0 has a total capacity of"
        f" {format_size(total)} of which {format_size(free)} is free. {procs}{limit}Of the allocated memory"
        f" {format_size(allocated + private)} is allocated by PyTorch, {pools}and"
        f" {format_size(reserved - allocated - private)} is reserved by PyTorch but unallocated. If reserved but"
        " unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid"
        " fragmentation.  See documentation for Memory Management "
        " (https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)"
    )


class _Block:
    """Simulated device bytes, freed when the object dies (as a tensor's storage is). `fragment`: free bytes of
    its segment that stay reserved while it lives (it was carved out of a larger freed block)."""

    def __init__(self, device: SimDevice, nbytes: int, fragment: int = 0):
        self.device, self.nbytes, self.fragment = device, nbytes, fragment

    def __del__(self) -> None:
        self.device.free(self.nbytes, self.fragment)


class SimDevice:
    """A memory backend plus a step whose peak memory at batch n is ``curve(n)`` bytes above the weights.

    The step allocates a fixed workspace first and the per-batch activations second, so an OOM leaves the
    workspace pinned by the traceback until the ``except`` block is left — as on a real GPU.

    Allocator model (``used_bytes`` = reserved, ``allocated_bytes`` = live):

    - `fragmentation`: holding ``live`` bytes reserves ``live × (1 + fragmentation)``, also under pressure;
    - `split`: the step's activations fragment the cache as a transformer block's temporaries do: a temporary
      of ``curve(n) × (1/2 + split)`` bytes is freed, the next ``curve(n) / 2`` are carved out of its block,
      and the rest of that block, ``split × curve(n)``, stays reserved but unusable for the last
      ``curve(n) / 2`` (it cannot be released while its segment holds a live block). Live peaks then
      under-count what a size needs by that fraction, under pressure too;
    - `cache`: the allocator keeps freed blocks and grows its reserve by ``cache`` of what it needs, but only
      while that fits under ``min(capacity, limit)``: under pressure it releases the cache (``cleanup`` too);
    - an allocation fails when the reserve it needs exceeds ``min(capacity, limit)``; `limit(nbytes)` sets
      the limit for a block (the CUDA backend's per-process fraction). `SimDeviceWithoutLimit` has none:
      a budget below the capacity can then only be judged by measuring;
    - `live_peaks=False` reports no live-tensor peak (``peak_allocated_bytes() is None``), like CPU RSS;
    - an OOM's message gives the allocator's account in the words and number format of CUDA's caching allocator
      (requested, allocated, reserved but unallocated: what `torchopt.batch.oom.oom_report` reads);
      `reports=False` raises a message without it (another allocator, a library workspace).

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
        split: float = 0.0,
        live_peaks: bool = True,
        reports: bool = True,
    ):
        self.capacity = capacity
        self.total = total if total is not None else capacity
        self.curve = curve
        self.workspace = workspace
        self.fragmentation = fragmentation
        self.cache = cache
        self.split = split
        self.fragments = 0  # reserved, unallocated and not releasable (see `split`)
        self.live_peaks = live_peaks
        self.reports = reports
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
        need = self.reserved_for(self.live + self.fragments + nbytes)
        if need > self.ceiling:
            # The allocator released its cache, then gave up.
            self.reserved = self.reserved_for(self.live + self.fragments)
            if self.reports:
                raise torch.OutOfMemoryError(
                    f"simulated: CUDA out of memory. Tried to allocate {format_size(nbytes)}. Of the allocated"
                    f" memory {format_size(self.live)} is allocated by PyTorch, and"
                    f" {format_size(self.reserved - self.live)} is reserved by PyTorch but unallocated."
                )
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

    def carve(self, block: _Block, nbytes: int) -> _Block:
        """Free `block` and allocate `nbytes` <= its size inside it: the rest of it becomes a fragment."""
        rest = block.nbytes - nbytes
        block.nbytes = 0  # its bytes move to the carved block and the fragment; it dies freeing nothing
        self.live -= rest
        self.fragments += rest
        return _Block(self, nbytes, fragment=rest)

    def free(self, nbytes: int, fragment: int = 0) -> None:
        self.live -= nbytes
        self.fragments -= fragment
        if not self.cache:  # no caching allocator: the reserve follows the live bytes
            self.reserved = self.reserved_for(self.live + self.fragments)

    def need(self, n: int) -> int:
        """Peak bytes above the weights at batch n (to reserve; `split` fragments included)."""
        c = int(self.curve(n))
        if not self.split:
            return self.workspace + c
        first = int(c * (0.5 + self.split))
        return self.workspace + max(first, first + c - c // 2)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self.calls.append(n)
        workspace = self.alloc(self.workspace)  # noqa: F841  (held while the activations are allocated)
        c = int(self.curve(n))
        if not self.split:
            activations = self.alloc(c)  # noqa: F841
            return x.sum()
        first = self.alloc(int(c * (0.5 + self.split)))  # a temporary ...
        second = self.carve(first, c // 2)  # noqa: F841  ... freed; the next tensor is carved out of its block
        third = self.alloc(c - c // 2)  # noqa: F841  (does not fit in the fragment: a new segment)
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
        # empty_cache: only fragmentation of live blocks (and fragments of their segments) stays
        self.reserved = self.reserved_for(self.live + self.fragments)
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
    cache=..., split=..., live_peaks=True, reports=True, enforce=True)``; ``enforce=False`` presents the backend
    without `limit`."""
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
def oom_message() -> Callable[..., str]:
    """`allocator_message`: the CUDA caching allocator's OOM message for given byte counts."""
    return allocator_message


class CudaAllocations:
    """The CUDA caching allocator's live blocks, to tell which allocations outlived a piece of code."""

    @staticmethod
    def live() -> dict[int, dict]:
        """Address → block of every live allocation (with the Python frames that allocated it)."""
        blocks = {}
        for segment in torch.cuda.memory_snapshot():
            address = segment["address"]
            for block in segment["blocks"]:
                if block["state"] == "active_allocated":
                    blocks[address] = block
                address += block["size"]
        return blocks

    @classmethod
    def new_since(cls, before: dict[int, dict]) -> str:
        """The blocks alive now but not in `before`: size and where they were allocated."""
        lines = []
        for address, block in sorted(cls.live().items()):
            if address in before:
                continue
            frames = block.get("frames") or []
            where = " <- ".join(f"{f['filename']}:{f['line']} {f['name']}" for f in frames[:6]) or "no frames"
            lines.append(f"  {block['size']} bytes at {address:#x}: {where}")
        return "\n".join(lines) or "  (no new block: the difference is in blocks alive before)"


@pytest.fixture
def cuda_allocations() -> Iterator[CudaAllocations]:
    """GPU tests: record the Python stack of every CUDA allocation during the test (`CudaAllocations`)."""
    record = getattr(torch.cuda.memory, "_record_memory_history", None)
    if record is not None:
        record(enabled="all", context="alloc", stacks="python", max_entries=10_000)
    try:
        yield CudaAllocations()
    finally:
        if record is not None:
            record(enabled=None)


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
