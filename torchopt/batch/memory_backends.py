"""Memory backends for the batch-size search: one device's memory in the units the search budgets in.

- `CudaMemory`: the caching allocator's *reserved* bytes (what the driver sees, fragmentation included), its
  peak via ``torch.cuda.max_memory_reserved`` after ``reset_peak_memory_stats``, and what this process can
  still get from ``torch.cuda.mem_get_info`` (so other processes count) capped by
  ``torch.cuda.set_per_process_memory_fraction`` when one is set. Its live-tensor peak
  (``max_memory_allocated``) is what the search fits, and its `limit` makes the allocator enforce a budget.
- `CpuRssMemory`: this process's resident set size (``VmRSS``), its peak (``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs``) and ``MemAvailable``. Linux only. The CPU has no allocator that fails at a
  budget, so on CPU a size "fails" when its measured peak exceeds the budget.

Any object with the same methods works (`MemoryBackend`); the tests drive the search with a simulated one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import numbers
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from torchopt.config import check_type, resolve_device

__all__ = ["CpuRssMemory", "CudaMemory", "MemoryBackend", "memory_backend", "release_memory"]


def release_memory(device: torch.device | None = None) -> None:
    """Free what dead tensors held: collect reference cycles, then return CUDA's cached blocks.

    Call it after leaving an ``except`` block, never inside one (the traceback keeps the tensors alive).
    """
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@runtime_checkable
class MemoryBackend(Protocol):
    """What the search needs from a device: sizes in bytes, a resettable peak and a cleanup.

    Optional: ``limit(nbytes)``, a context manager under which the device refuses to hold more than `nbytes`
    (in the units of `used_bytes`) and raises a real out-of-memory error instead, as `CudaMemory.limit` does.
    The search then runs its probes under ``limit(target)``: a probe either fits the target for real (the
    allocator frees its cache under pressure, as in production) or fails. Backends without it (`CpuRssMemory`)
    are searched by measuring: a run whose peak exceeds the target counts as a failure. ``limit`` is not a
    protocol member so that ``isinstance(backend, MemoryBackend)`` holds for both kinds.
    """

    name: str
    # Bytes `allocated_bytes()` may stay above its baseline after a search and still count as returned.
    baseline_slack: int

    def free_bytes(self) -> int:
        """Bytes this process could still obtain (other processes and limits count)."""

    def used_bytes(self) -> int:
        """Bytes this process holds now, in the units of `peak_bytes` (so capacity = used + free)."""

    def allocated_bytes(self) -> int:
        """Bytes held by live tensors now (the baseline check compares this before and after)."""

    def total_bytes(self) -> int:
        """Size of the device (a budget above it is an error)."""

    def reset_peak(self) -> None: ...

    def peak_bytes(self) -> int:
        """Peak of `used_bytes()` since `reset_peak()`."""

    def peak_allocated_bytes(self) -> int | None:
        """Peak of live tensor bytes since `reset_peak()`, when it differs from `peak_bytes` (else None)."""

    def cleanup(self) -> None:
        """Return freed memory (call outside any ``except`` block: a live traceback pins the tensors)."""

    def synchronize(self) -> None: ...


class CudaMemory:
    """One CUDA device through the caching allocator (see the module docstring)."""

    name = "cuda"
    baseline_slack = 0

    def __init__(self, device: torch.device | str | int | None = None):
        self.device = resolve_device("CudaMemory: device", "cuda" if device is None else device, kinds=("cuda",))

    def __repr__(self) -> str:
        return f"CudaMemory({self.device})"

    def _fraction(self) -> float:
        """The per-process memory fraction now (1.0 before torch 2.8, which cannot read it back)."""
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.8
        return float(get_fraction(self.device)) if get_fraction is not None else 1.0

    def free_bytes(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        # The allocator refuses to reserve past fraction * total even when the driver has more.
        return max(0, min(free, int(self._fraction() * total) - reserved))

    @contextlib.contextmanager
    def limit(self, nbytes: int) -> Iterator[None]:
        """Make the caching allocator refuse to reserve more than `nbytes` (reserved bytes) inside the block.

        Past the limit the allocator first frees its cached blocks and retries, then raises
        ``torch.OutOfMemoryError``: exactly what happens at a real budget. A tighter fraction set before is
        kept, and the previous fraction is restored on exit, also when the block raises.
        """
        # Checked before the fraction changes (this runs when the block is entered).
        check_type("CudaMemory.limit: nbytes", nbytes, numbers.Integral, "an int number of bytes > 0")
        if nbytes <= 0:
            raise ValueError(
                f"CudaMemory.limit: nbytes must be > 0 (the bytes the allocator may reserve), got {nbytes}"
            )
        total = torch.cuda.mem_get_info(self.device)[1]
        previous = self._fraction()
        torch.cuda.set_per_process_memory_fraction(min(previous, nbytes / total), self.device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(previous, self.device)

    def used_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def total_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def peak_allocated_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)

    def cleanup(self) -> None:
        release_memory(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")


def _proc_kib(path: Path, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", path.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{path} has no {key} line")
    return int(match.group(1)) * 1024


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    lib = ctypes.CDLL(name) if name else None
    return getattr(lib, "malloc_trim", None)


class CpuRssMemory:
    """This process's resident memory on Linux (see the module docstring)."""

    name = "cpu-rss"
    # RSS moves with the interpreter's own heap and glibc arenas; a few MiB of drift is not a leak.
    baseline_slack = 32 * 2**20

    def __init__(self) -> None:
        try:
            _proc_kib(_STATUS, "VmHWM")
            _CLEAR_REFS.write_text("5")
        except OSError as exc:
            raise ValueError(
                "the CPU memory search reads this process's peak RSS from /proc/self/status and resets it"
                f" through /proc/self/clear_refs (Linux); that failed here ({exc}). Run the search on CUDA."
            ) from None

    def __repr__(self) -> str:
        return "CpuRssMemory()"

    def free_bytes(self) -> int:
        return _proc_kib(_MEMINFO, "MemAvailable")

    def used_bytes(self) -> int:
        return _proc_kib(_STATUS, "VmRSS")

    allocated_bytes = used_bytes

    def total_bytes(self) -> int:
        return _proc_kib(_MEMINFO, "MemTotal")

    def reset_peak(self) -> None:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (VmHWM) to the current RSS

    def peak_bytes(self) -> int:
        return _proc_kib(_STATUS, "VmHWM")

    def peak_allocated_bytes(self) -> int | None:
        return None

    def cleanup(self) -> None:
        release_memory()
        trim = _malloc_trim()
        if trim is not None:
            trim(0)  # give glibc's freed arena pages back so RSS reflects live memory

    def synchronize(self) -> None:
        pass


def memory_backend(device: torch.device, memory_budget: int | None) -> MemoryBackend:
    """The backend for `device`; on CPU only with an explicit budget (the search is CUDA-first)."""
    if device.type == "cuda":
        return CudaMemory(device)
    if device.type == "cpu":
        if memory_budget is None:
            cuda = "is available" if torch.cuda.is_available() else "is not available on this machine"
            raise ValueError(
                "the memory search measures device memory and is CUDA-only unless a budget is given: the step"
                f" runs on cpu (CUDA {cuda}). Move the model and inputs to a CUDA device, or pass"
                " memory_budget=<bytes> to search against this process's peak resident memory (RSS) on CPU."
            )
        return CpuRssMemory()
    raise ValueError(
        f"the memory search supports CUDA devices (and CPU with memory_budget), but the step runs on {device}"
    )
