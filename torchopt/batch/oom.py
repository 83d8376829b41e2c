"""Out-of-memory errors: which errors are allocation failures, and the CUDA caching allocator's account of one.

An allocation failure is recognized by type (``torch.OutOfMemoryError``) or, where a library bypasses the
caching allocator, by message; any other error is a real failure of the step and must never be taken for
"too large". `oom_report` reads what the allocator said when it failed (live bytes, fragments, the request).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch

__all__ = ["OOM_MESSAGES", "OomReport", "exception_chain", "is_out_of_memory", "oom_report"]

# Allocation failures that bypass the caching allocator (cuBLAS/cuDNN handles and workspaces, raw cudaMalloc,
# the CPU allocator) surface as plain RuntimeErrors with these messages instead of torch.OutOfMemoryError.
OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "DEVICE_ALLOCATION_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
)


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc`, then the error it was raised from (``__cause__``, else ``__context__``), and so on: at most 8 (the
    chain is short; the bound guards against cycles)."""
    for _ in range(8):
        if exc is None:
            return
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` (or one it was raised from, e.g. inside torch.compile) is an allocation failure.

    ``torch.OutOfMemoryError`` is recognized by type; `OOM_MESSAGES` covers the library paths that raise a
    plain RuntimeError. Any other error is a real failure of the step and must not be taken for "too large".
    """
    for e in exception_chain(exc):
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES):
            return True
    return False


_UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = r"([0-9]+(?:\.[0-9]+)?)\s+(bytes|KiB|MiB|GiB|TiB)"


def _message_pattern(words: str) -> re.Pattern[str]:
    """A pattern for part of the allocator's message: `words` with any run of whitespace between them (logs
    wrap the message), `{size}` standing for a printed size."""
    return re.compile(r"\s+".join(words.split(" ")).replace("{size}", _SIZE), re.DOTALL)


_REQUEST = _message_pattern("Tried to allocate {size}")
# torch >= 2.1 (c10/cuda/CUDACachingAllocator.cpp, DeviceCachingAllocator::malloc): "Of the allocated memory
# A is allocated by PyTorch, [with P allocated in private pools (e.g., CUDA Graphs), ]and F is reserved by
# PyTorch but unallocated." A counts P, the free blocks cached in CUDA-graph private pools; F does not.
_ACCOUNT = _message_pattern(
    r"{size} is allocated by PyTorch, (?:with {size} allocated in private pools(?: \([^)]*\))?, )?and {size} is"
    " reserved by PyTorch but unallocated"
)
# torch < 2.1: "(GPU 0; T total capacity; A already allocated; F free; [L allowed; ]R reserved in total by
# PyTorch)": no private-pool split; reserved R counts the live bytes A.
_LEGACY_ACCOUNT = _message_pattern(r"{size} already allocated; .*? {size} reserved in total by PyTorch")


@dataclasses.dataclass(frozen=True)
class OomReport:
    """The caching allocator's account of one failed allocation (from its out-of-memory message).

    At the failure the allocator has already freed every cached block it could, so what stays reserved but
    unallocated are fragments (free parts of segments that also hold live blocks) and the free blocks cached
    by CUDA-graph private pools, which only their graphs can use. The allocation failed because
    ``allocated + private pools + fragments + requested`` exceeded what it was allowed to reserve.
    """

    requested_bytes: int  # the allocation that failed (rounded up by the allocator)
    allocated_bytes: int  # live tensor bytes at that moment (torch.cuda.memory_allocated)
    fragment_bytes: int  # reserved by PyTorch but unallocated, after the allocator released its cache
    private_pool_bytes: int = 0  # free blocks held by CUDA-graph private pools (reserved, unusable here)

    @property
    def demand_bytes(self) -> int:
        """Reserved bytes the failed allocation needed: everything reserved at the failure, plus the request."""
        return self.requested_bytes + self.allocated_bytes + self.private_pool_bytes + self.fragment_bytes


def _bytes(number: str, unit: str) -> int:
    return round(float(number) * _UNITS[unit])


def _read_account(text: str) -> OomReport | None:
    request = _REQUEST.search(text)
    if request is None:
        return None
    requested = _bytes(*request.groups())
    account = _ACCOUNT.search(text)
    if account is not None:
        groups = account.groups()
        allocated = _bytes(*groups[0:2])
        private = _bytes(*groups[2:4]) if groups[2] is not None else 0
        # The printed "allocated by PyTorch" includes the private pools' free blocks: take them out, so that
        # allocated_bytes is the live bytes (both were rounded to 2 decimals: never below zero).
        return OomReport(requested, max(0, allocated - private), _bytes(*groups[4:6]), private)
    legacy = _LEGACY_ACCOUNT.search(text)
    if legacy is not None:
        allocated, reserved = _bytes(*legacy.groups()[0:2]), _bytes(*legacy.groups()[2:4])
        return OomReport(requested, allocated, max(0, reserved - allocated))
    return None


def oom_report(exc: BaseException) -> OomReport | None:
    """What the CUDA caching allocator reported when it raised `exc` (or an error `exc` was raised from); None
    when no error in the chain carries its account (another allocator, a library workspace, a CPU OOM).

    Reads every variant of c10's CUDACachingAllocator message (sizes printed as ``N bytes`` up to 1 KiB, then
    KiB / MiB / GiB with 2 decimals): ``Tried to allocate X`` and, since torch 2.1, ``A is allocated by
    PyTorch, [with P allocated in private pools (e.g., CUDA Graphs), ]and F is reserved by PyTorch but
    unallocated`` (A includes P); before 2.1, ``A already allocated; ...; R reserved in total by PyTorch``.
    The lines that may come between (``Process N has X memory in use``, ``Including non-PyTorch memory ...``,
    ``L allowed;`` under a per-process limit) and the hint after are not needed; line breaks are accepted.
    """
    for e in exception_chain(exc):
        report = _read_account(str(e))
        if report is not None:
            return report
    return None
