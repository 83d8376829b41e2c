"""`torchopt.batch.oom`: which errors are out-of-memory errors, and every variant of the CUDA caching
allocator's out-of-memory message (`oom_report`).

The messages are built as c10/cuda/CUDACachingAllocator.cpp concatenates them (the `oom_message` fixture
of conftest.py) or copied from real runs; the GPU tests at the end check the account against the allocator's own
counters on a real OOM, CUDA-graph private pools included.
"""

import pytest
import torch

from torchopt.batch import CudaMemory, is_out_of_memory
from torchopt.batch.oom import OomReport, oom_report

KiB, MiB, GiB = 2**10, 2**20, 2**30


def _rounding(nbytes: int) -> float:
    """The most a size printed with 2 decimals of its unit can be off."""
    for limit, unit in ((KiB, 0), (MiB, KiB), (GiB, MiB)):
        if nbytes <= limit:
            return 0.005 * unit
    return 0.005 * GiB


@pytest.mark.parametrize("private", [0, 512, 96 * MiB, 3 * GiB + 123 * MiB], ids=["no-pools", "512B", "96MiB", "3GiB"])
@pytest.mark.parametrize("allowed", [None, 1.13 * GiB], ids=["no-limit", "allowed"])
@pytest.mark.parametrize(
    "processes",
    [(), ((None, 9 * GiB),), ((4242, 2 * GiB), (None, 9 * GiB), (77, 300 * MiB))],
    ids=["no-nvml", "this-process", "three-processes"],
)
@pytest.mark.parametrize(
    ("requested", "allocated", "fragments"),
    [
        (700 * MiB, 600 * MiB, 0),  # the GPU test's numbers
        (512, 1000, 1024),  # sizes printed in bytes (<= 1 KiB)
        (1536, 300 * KiB, 700 * KiB),  # KiB
        (int(2.21 * GiB), int(5.73 * GiB), int(2.04 * GiB)),  # GiB
        (20 * MiB, 0, 0),  # nothing live: "0 bytes"
    ],
    ids=["MiB", "bytes", "KiB", "GiB", "empty"],
)
def test_every_variant_of_the_message(oom_message, requested, allocated, fragments, private, allowed, processes):
    allowed = None if allowed is None else int(allowed)
    reserved = allocated + private + fragments
    text = oom_message(requested, allocated, reserved, private=private, allowed=allowed, processes=processes)
    report = oom_report(torch.OutOfMemoryError(text))
    assert report is not None, text
    assert abs(report.requested_bytes - requested) <= _rounding(requested)
    # Printed: allocated + private (one rounding) minus private (another).
    assert abs(report.allocated_bytes - allocated) <= _rounding(allocated + private) + _rounding(private) + 1
    assert abs(report.private_pool_bytes - private) <= _rounding(private)
    assert abs(report.fragment_bytes - fragments) <= _rounding(fragments)
    assert abs(report.demand_bytes - (requested + reserved)) <= (
        _rounding(requested) + _rounding(allocated + private) + _rounding(fragments) + 1
    )


# The H200's message under a per-process limit once CUDA graphs had run (the numbers of
# test_oom_report_of_a_real_cuda_oom below).
H200_OOM = (
    "CUDA out of memory. Tried to allocate 700.00 MiB. GPU 0 has a total capacity of 139.80 GiB of which 137.64 GiB"
    " is free. Including non-PyTorch memory, this process has 1.16 GiB memory in use. 1.13 GiB allowed; Of the"
    " allocated memory 696.00 MiB is allocated by PyTorch, with 96.00 MiB allocated in private pools (e.g., CUDA"
    " Graphs), and 2.00 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try"
    " setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory"
    " Management  (https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-"
    "alloc-conf)"
)
# Messages as they appear in logs and issues: wrapped over lines (vLLM), torch 2.1's "capacty" typo and
# max_split_size_mb hint, and the format before torch 2.1 (with and without a per-process limit).
WRAPPED_OOM = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 9.28 GiB. \nGPU 0 has a total capacity of 139.81"
    " GiB of which 7.30 GiB is free. \nProcess 2678129 has 132.50 GiB memory in use. \nOf the allocated memory"
    " 115.89 GiB is allocated by PyTorch, \nwith 2.01 GiB allocated in private pools (e.g., CUDA Graphs), \nand"
    " 10.53 GiB is reserved by PyTorch but unallocated."
)
TORCH_21_OOM = (
    "CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total capacty of 23.69 GiB of which 7.11 GiB is"
    " free. Process 2006998 has 256.00 MiB memory in use. Including non-PyTorch memory, this process has 16.31 GiB"
    " memory in use. Of the allocated memory 16.01 GiB is allocated by PyTorch, and 7.47 MiB is reserved by PyTorch"
    " but unallocated. If reserved but unallocated memory is large try setting max_split_size_mb to avoid"
    " fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
)
LEGACY_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity; 14.56 GiB already"
    " allocated; 3.44 MiB free; 14.70 GiB reserved in total by PyTorch) If reserved memory is >> allocated memory"
    " try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and"
    " PYTORCH_CUDA_ALLOC_CONF"
)
LEGACY_LIMIT_OOM = (
    "CUDA out of memory. Tried to allocate 512.00 MiB (GPU 0; 79.15 GiB total capacity; 3.50 GiB already"
    " allocated; 75.01 GiB free; 4.00 GiB allowed; 3.52 GiB reserved in total by PyTorch)"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (H200_OOM, OomReport(700 * MiB, 600 * MiB, 2 * MiB, 96 * MiB)),
        (
            WRAPPED_OOM,
            OomReport(
                round(9.28 * GiB), round(115.89 * GiB) - round(2.01 * GiB), round(10.53 * GiB), round(2.01 * GiB)
            ),
        ),
        (TORCH_21_OOM, OomReport(8 * GiB, round(16.01 * GiB), round(7.47 * MiB))),
        (LEGACY_OOM, OomReport(20 * MiB, round(14.56 * GiB), round(14.70 * GiB) - round(14.56 * GiB))),
        (LEGACY_LIMIT_OOM, OomReport(512 * MiB, round(3.50 * GiB), round(3.52 * GiB) - round(3.50 * GiB))),
    ],
    ids=["h200-private-pools-allowed", "wrapped-lines", "torch-2.1", "before-2.1", "before-2.1-allowed"],
)
def test_messages_from_real_runs(text, expected):
    assert oom_report(torch.OutOfMemoryError(text)) == expected


def test_private_pools_rounding_never_gives_negative_live_bytes(oom_message):
    # "1.00 GiB allocated by PyTorch, with 1.00 GiB in private pools": live bytes below the printed precision.
    report = oom_report(torch.OutOfMemoryError(oom_message(2 * MiB, 1000, GiB + 1000, private=GiB)))
    assert report.allocated_bytes == 0 and report.private_pool_bytes == GiB


@pytest.mark.parametrize(
    "text",
    [
        "CUDA error: out of memory",  # cudaMalloc outside the caching allocator
        "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "CUDA out of memory. Tried to allocate 2.00 MiB",  # the request without the account
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes. Error code 12",
        "Of the allocated memory 1.00 GiB is allocated by PyTorch, and 0 bytes is reserved by PyTorch but unallocated.",
    ],
)
def test_messages_without_the_allocators_account(text):
    assert oom_report(RuntimeError(text)) is None


# ---------------------------------------------------------------------------------------------------------
# GPU: the account of a real OOM while a CUDA graph's private pool holds free blocks.


def _real_oom(cuda: CudaMemory) -> tuple[torch.OutOfMemoryError, int]:
    """A real OOM: 700 MiB asked with 600 MiB held, under a limit 1 GiB above what is in use; the error and the
    live bytes at the failure."""
    with cuda.limit(cuda.used_bytes() + GiB):
        x = torch.empty(600 * MiB, dtype=torch.uint8, device="cuda")
        allocated = torch.cuda.memory_allocated()
        failure = None
        try:
            torch.empty(700 * MiB, dtype=torch.uint8, device="cuda")
        except torch.OutOfMemoryError as exc:
            failure = exc
        del x
    assert failure is not None
    return failure, allocated


@pytest.mark.gpu
def test_oom_report_with_a_cuda_graph_private_pool(memory_limit):
    cuda = CudaMemory()
    cuda.cleanup()
    static = torch.ones(2 * MiB, device="cuda")  # 8 MiB
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        (static * 2).sum()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (static * 2).sum()  # the 8 MiB temporary is freed into the graph's private pool
    torch.cuda.synchronize()
    failure, allocated = _real_oom(cuda)
    assert "private pools" in str(failure), str(failure)
    report = oom_report(failure)
    assert report is not None, str(failure)
    assert report.requested_bytes == 700 * MiB
    assert report.private_pool_bytes >= 8 * MiB  # the freed temporary (its segment may be larger)
    assert abs(report.allocated_bytes - allocated) <= 0.01 * GiB  # live bytes, the pool's free blocks taken out
    del failure, graph, out, static
    cuda.cleanup()


@pytest.mark.parametrize(
    ("message", "is_oom"),
    [
        ("CUDA error: out of memory", True),
        ("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)", True),
        ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes", True),
        ("Expected all tensors to be on the same device", False),
    ],
)
def test_oom_classification(message, is_oom):
    assert is_out_of_memory(RuntimeError(message)) is is_oom
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))  # only RuntimeErrors carry these messages
    try:
        try:
            raise torch.OutOfMemoryError("inner")
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("backend compiler failed") from exc
    except RuntimeError as outer:
        assert is_out_of_memory(outer)  # e.g. torch.compile wrapping an OOM


# Messages of CUDA's caching allocator: from the H100 runs of benchmarks/bench_batch.py (ViT-B/16 under an 8 GiB
# limit), and the size formats it prints (c10's format_size: bytes, KiB, MiB, GiB with 2 decimals).
VIT_OOM = (
    "CUDA out of memory. Tried to allocate 2.21 GiB. GPU 0 has a total capacity of 79.18 GiB of which 70.73 GiB is"
    " free. Including non-PyTorch memory, this process has 8.44 GiB memory in use. 8.00 GiB allowed; Of the"
    " allocated memory 5.73 GiB is allocated by PyTorch, and 2.04 GiB is reserved by PyTorch but unallocated. If"
    " reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to"
    " avoid fragmentation.  See documentation for Memory Management"
)


SMALL_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 8.00 GiB of which 0 bytes is"
    " free. Of the allocated memory 7.51 GiB is allocated by PyTorch, and 512 bytes is reserved by PyTorch but"
    " unallocated."
)


def test_oom_report_reads_the_caching_allocators_account():
    vit = oom_report(torch.OutOfMemoryError(VIT_OOM))
    assert vit == OomReport(round(2.21 * GiB), round(5.73 * GiB), round(2.04 * GiB))
    assert vit.demand_bytes == round(2.21 * GiB) + round(5.73 * GiB) + round(2.04 * GiB)
    small = oom_report(torch.OutOfMemoryError(SMALL_OOM))
    assert small == OomReport(20 * MiB, round(7.51 * GiB), 512)
    try:  # wrapped, e.g. by torch.compile: the account is found along the cause chain
        try:
            raise torch.OutOfMemoryError(SMALL_OOM.replace("20.00 MiB", "1.50 KiB"))
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("backend compiler failed") from exc
    except RuntimeError as outer:
        assert oom_report(outer).requested_bytes == 1536
    for other in ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA out of memory. Tried to allocate"):
        assert oom_report(RuntimeError(other)) is None


@pytest.mark.gpu
def test_oom_report_of_a_real_cuda_oom(memory_limit):
    """The account read from a real OOM matches the allocator's own counters at the failure."""
    cuda = CudaMemory()
    cuda.cleanup()
    failure, allocated = _real_oom(cuda)
    report = oom_report(failure)
    assert report is not None, str(failure)
    assert report.requested_bytes == 700 * MiB
    assert abs(report.allocated_bytes - allocated) <= 0.01 * GiB  # printed with 2 decimals of its unit
    assert report.fragment_bytes <= 0.01 * GiB + 2 * MiB  # the allocator freed its cache before failing
    del failure
    cuda.cleanup()
