"""Memory backends: `CudaMemory` sees the per-process limit and enforces its own (`gpu` marker)."""

import pytest
import torch

from torchopt.batch import CudaMemory

MiB, GiB = 2**20, 2**30


@pytest.mark.gpu
def test_cuda_backend_sees_the_per_process_limit(memory_limit):
    memory_limit(2 * GiB)
    cuda = CudaMemory()
    capacity = cuda.used_bytes() + cuda.free_bytes()
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):
        assert abs(capacity - 2 * GiB) <= 4 * MiB
    before = cuda.allocated_bytes()
    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    cuda.reset_peak()
    y = x + 1
    assert cuda.peak_bytes() >= 512 * MiB and cuda.peak_allocated_bytes() >= before + 512 * MiB
    del x, y
    cuda.cleanup()
    assert cuda.allocated_bytes() == before


@pytest.mark.gpu
def test_cuda_limit_raises_oom_past_it_and_restores_the_previous_fraction(memory_limit):
    if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
        pytest.skip("torch < 2.8 cannot read the per-process memory fraction back")
    memory_limit(4 * GiB)  # the fraction in force before the limit
    cuda = CudaMemory()
    cuda.cleanup()
    before = torch.cuda.get_per_process_memory_fraction()
    used = cuda.used_bytes()
    with cuda.limit(used + GiB):
        assert cuda.used_bytes() + cuda.free_bytes() <= used + GiB  # the backend sees the limit too
        x = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")  # within the limit
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(768 * MiB, dtype=torch.uint8, device="cuda")  # 1.25 GiB above `used`: past it
        del x
    assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(before, abs=1e-6)
    y = torch.empty(2 * GiB, dtype=torch.uint8, device="cuda")  # fits again under the previous 4 GiB
    del y
    with pytest.raises(KeyError, match="not an OOM"), cuda.limit(used + GiB):
        raise KeyError("not an OOM")
    assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(before, abs=1e-6)
    with cuda.limit(8 * GiB):  # looser than the fraction set before: the tighter one stays
        assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(before, abs=1e-6)
    cuda.cleanup()
