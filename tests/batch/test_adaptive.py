"""AdaptiveBatchSizer: shrink on OOM, grow back after successes within memory headroom, thread safety."""

import contextlib
import itertools
import json
import sys
import threading

import pytest
import torch

from torchopt.batch import AdaptiveBatchConfig, AdaptiveBatchSizer, CudaMemory
from torchopt.batch.memory_backends import release_memory

MiB = 2**20
GiB = 2**30


def oom_above(limit):
    def step(n):
        if n > limit:
            raise torch.OutOfMemoryError(f"simulated: {n} > {limit}")
        return n

    return step


def test_shrinks_on_oom_and_grows_back_below_the_ceiling():
    sizer = AdaptiveBatchSizer(100, grow_after=3)
    assert sizer.on_oom(100) == 75
    assert sizer.ceiling == 100
    for _ in range(2):
        assert sizer.on_success(75) == 75
    assert sizer.on_success(75) == 87  # ceil(75 * 1.25) = 94, but at most halfway to the failure at 100
    for _ in range(3 * 6):
        sizer.on_success()
    assert sizer.size == 99  # bisected up to one below the size that failed, never to it
    sizer.reset_ceiling()
    for _ in range(3):
        sizer.on_success()
    assert sizer.size == 124
    events = [(e.event, e.size, e.new_size) for e in sizer.history]
    assert events == [
        ("shrink", 100, 75),
        ("grow", 75, 87),
        ("grow", 87, 93),
        ("grow", 93, 96),
        ("grow", 96, 98),
        ("grow", 98, 99),
        ("reset_ceiling", 99, 99),
        ("grow", 99, 124),
    ]


def test_bisects_to_the_limit_instead_of_oscillating():
    sizer = AdaptiveBatchSizer(64, grow_after=5)
    sizes = [sizer.run(oom_above(48)) for _ in range(60)]
    assert sizes == [48] * 60  # every call ran at a size that fits
    # After the first OOM, each growth goes halfway to the last failure and falls back to the known-good 48.
    tried = [e.new_size for e in sizer.history if e.event == "grow"]
    assert tried == [56, 52, 50, 49]
    assert sizer.ceiling == 49 and sizer.ooms == 5
    shrinks = [e.new_size for e in sizer.history if e.event == "shrink"]
    assert shrinks == [48] * 5


def test_known_good_size_is_forgotten_when_it_fails():
    sizer = AdaptiveBatchSizer(40, grow_after=1)
    assert sizer.on_success(40) == 50
    sizer.on_oom(50)  # the grown size fails: back to the known-good 40, not to 0.75 * 50 = 37
    assert sizer.size == 40
    sizer.on_oom(40)  # now 40 fails too (memory held elsewhere): shrink by the factor
    assert sizer.size == 30


def test_run_retries_smaller_until_it_fits():
    sizer = AdaptiveBatchSizer(100, shrink_factor=0.5)
    assert sizer.run(oom_above(30)) == 25  # 100 -> 50 -> 25
    assert sizer.size == 25 and sizer.ooms == 2 and sizer.successes == 1
    assert [e.new_size for e in sizer.history] == [50, 25]


def test_run_reraises_the_oom_at_min_size():
    sizer = AdaptiveBatchSizer(4, min_size=2, shrink_factor=0.5)
    with pytest.raises(torch.OutOfMemoryError, match="simulated") as info:
        sizer.run(oom_above(1))
    assert any("min_size=2" in n for n in info.value.__notes__)
    assert sizer.size == 2 and sizer.ooms == 2


def test_run_gives_up_after_max_retries():
    sizer = AdaptiveBatchSizer(1000, max_retries=1)
    with pytest.raises(torch.OutOfMemoryError):
        sizer.run(oom_above(10))
    assert sizer.ooms == 2 and sizer.size == 562  # 1000 -> 750 -> 562


def test_run_propagates_other_errors_unchanged():
    sizer = AdaptiveBatchSizer(16)

    def step(n):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(ZeroDivisionError) as info:
        sizer.run(step)
    assert any("batch size 16" in n for n in info.value.__notes__)
    assert sizer.size == 16 and sizer.ooms == 0


def test_stale_oom_does_not_shrink_twice():
    sizer = AdaptiveBatchSizer(200)
    sizer.on_oom(200)  # -> 150
    sizer.on_oom(200)  # another thread that had run 200 reports late
    assert sizer.size == 150
    assert [e.event for e in sizer.history] == ["shrink", "oom"]


def test_max_size_bounds_growth():
    sizer = AdaptiveBatchSizer(10, max_size=12, grow_after=1)
    sizer.on_success()
    sizer.on_success()
    assert sizer.size == 12


def test_growth_is_limited_by_memory_headroom(sim_device, curves):
    # 10 MiB per item on a 1 GiB device with 100 MiB of weights: with 10 % headroom, at most 82 items fit.
    sim = sim_device(GiB, curves["linear"](10 * MiB), weights=100 * MiB)
    sizer = AdaptiveBatchSizer(40, grow_after=2, headroom_fraction=0.1, memory=sim)

    def step(n):
        return sim.step(torch.ones(n, 1))

    for _ in range(40):
        sizer.run(step)
    allowed = 0.9 * GiB
    assert sizer.ooms == 0
    assert 100 * MiB + sizer.size * 10 * MiB <= allowed
    assert sizer.size >= 70, sizer.history  # grew from 40 towards the limit
    assert sim.cleanups_in_except == 0


def _contend(threads: int, calls: int) -> None:
    sizer = AdaptiveBatchSizer(64, grow_after=3, shrink_factor=0.8)
    step = oom_above(37)
    attempts = [0] * threads
    failures = []

    def worker(k):
        for _ in range(calls):
            n = sizer.size
            attempts[k] += 1
            try:
                step(n)
            except torch.OutOfMemoryError:
                failed = True
            else:
                failed = False
            if failed:
                failures.append(n)
                sizer.on_oom(n)
            else:
                sizer.on_success(n)

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert sizer.successes + sizer.ooms == sum(attempts)
    assert sizer.ooms == len(failures)
    assert sizer.size <= 37 and sizer.ceiling == min(failures)
    changes = [e for e in sizer.history if e.event in ("shrink", "grow")]
    for before, after in itertools.pairwise(changes):
        assert after.size == before.new_size, "the history must follow the size changes in order"
    assert changes[-1].new_size == sizer.size


def test_thread_safety_under_contention():
    """Many threads share one sizer; counters and the history of size changes stay consistent.

    Without the lock one round breaks an invariant about a quarter of the time; eight rounds catch it
    nearly always, in ~0.2 s.
    """
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to provoke races
    try:
        for _ in range(8):
            _contend(threads=8, calls=300)
    finally:
        sys.setswitchinterval(interval)


def test_run_is_thread_safe():
    sizer = AdaptiveBatchSizer(50, grow_after=2)
    results = []

    def worker():
        for _ in range(50):
            results.append(sizer.run(oom_above(20)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 200 and max(results) <= 20
    assert sizer.successes == 200


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"shrink_factor": 1.0}, ValueError, r"shrink_factor must be in \(0, 1\)"),
        ({"grow_factor": 0.9}, ValueError, "grow_factor must be > 1"),
        ({"min_size": 0}, ValueError, "min_size must be >= 1"),
        ({"max_size": 4}, ValueError, r"initial \(8\) must be in \[min_size, max_size\]"),
        ({"grow_after": 0}, ValueError, "grow_after must be > 0"),
        ({"headroom_fraction": 1.0}, ValueError, "headroom_fraction must be in"),
        ({"grow_every": 3}, ValueError, "unknown key 'grow_every'"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        AdaptiveBatchSizer(8, **options)


def test_bad_initial_and_step():
    with pytest.raises(ValueError, match="initial must be >= 1"):
        AdaptiveBatchSizer(0)
    with pytest.raises(TypeError, match="step must be a callable"):
        AdaptiveBatchSizer(4).run(42)


def _state(sizer):
    """Everything a report can change (public counters, the history and the private bookkeeping)."""
    return (
        sizer.size,
        sizer.ceiling,
        sizer.successes,
        sizer.ooms,
        [(e.event, e.size, e.new_size) for e in sizer.history],
        sizer._good,
        sizer._streak,
        dict(sizer._peaks),
    )


@pytest.mark.parametrize(
    ("report", "error", "match"),
    [
        (
            lambda s: s.on_oom("eight"),
            TypeError,
            r"AdaptiveBatchSizer.on_oom: size must be an int batch size >= 1 \(None: the current size\),"
            r" got str 'eight'",
        ),
        (lambda s: s.on_oom(7.5), TypeError, r"on_oom: size must be an int batch size .*got float 7.5"),
        (lambda s: s.on_oom(True), TypeError, r"on_oom: size must be an int batch size .*got bool True"),
        (lambda s: s.on_oom(0), ValueError, r"on_oom: size must be a batch size >= 1 .*got 0"),
        (lambda s: s.on_success("8"), TypeError, r"on_success: size must be an int batch size .*got str '8'"),
        (lambda s: s.on_success(-2), ValueError, r"on_success: size must be a batch size >= 1 .*got -2"),
        (
            lambda s: s.on_success(8, peak_bytes="1 GiB"),
            TypeError,
            r"on_success: peak_bytes must be an int number of bytes >= 0 \(or None\), got str '1 GiB'",
        ),
        (lambda s: s.on_success(8, peak_bytes=-1), ValueError, r"on_success: peak_bytes must be >= 0 .*got -1"),
    ],
    ids=[
        "oom-str",
        "oom-float",
        "oom-bool",
        "oom-zero",
        "success-str",
        "success-negative",
        "peak-str",
        "peak-negative",
    ],
)
def test_bad_reports_raise_before_changing_anything(report, error, match):
    sizer = AdaptiveBatchSizer(16, grow_after=2)
    sizer.on_oom(16)  # some state to keep: a ceiling, an OOM, a shrink event, a streak and a peak
    sizer.on_success(12, peak_bytes=3 * MiB)
    before = _state(sizer)
    with pytest.raises(error, match=match):
        report(sizer)
    assert _state(sizer) == before
    assert sizer.on_success() == 14  # and it still works: the streak of 2 grows halfway to the ceiling


def test_reports_take_numpy_sizes():
    np = pytest.importorskip("numpy")
    sizer = AdaptiveBatchSizer(16)
    assert sizer.on_oom(np.int64(16)) == 12
    assert sizer.ceiling == 16 and type(sizer.ceiling) is int


def test_bad_memory_backend():
    with pytest.raises(TypeError, match=r"memory must be a MemoryBackend .*got str 'cuda', which lacks used_bytes\(\)"):
        AdaptiveBatchSizer(8, memory="cuda")


def test_cuda_limit_checks_nbytes_before_touching_the_device():
    cuda = CudaMemory.__new__(CudaMemory)  # no CUDA here: the checks must come before any torch.cuda call
    cuda.device = torch.device("cuda", 0)
    bad_type = r"CudaMemory.limit: nbytes must be an int number of bytes > 0, got str '1GiB'"
    with pytest.raises(TypeError, match=bad_type), cuda.limit("1GiB"):
        pass
    with pytest.raises(ValueError, match=r"CudaMemory.limit: nbytes must be > 0 .*got 0"), cuda.limit(0):
        pass


def test_config_round_trip():
    cfg = AdaptiveBatchConfig(min_size=2, max_size=512, grow_after=5)
    assert AdaptiveBatchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert AdaptiveBatchSizer(64, config=cfg).config == cfg


@pytest.mark.gpu
def test_real_ooms_on_gpu_shrink_and_memory_is_released(memory_limit, cuda_allocations):
    """Real OOMs shrink the size, and the sizer holds no device memory afterwards.

    The baseline is taken after torch's own first-use work for this step (a first reduction and ``.item()``,
    a first OOM under the limit) ran outside the sizer: state that torch and the CUDA libraries create once
    per process is not what this test measures. Every call of the sizer comes after the baseline, so memory it
    kept per run, per OOM or per sizer still shows; the blocks that stayed are then listed with the Python
    frames that allocated them.
    """
    dev = torch.device("cuda")
    memory_limit(GiB)

    def step(n):
        a = torch.empty(n, 2**18, device=dev)  # 1 MiB per item: about 1000 items fit under the limit
        return float(a.sum())

    step(8)
    with contextlib.suppress(torch.OutOfMemoryError):
        step(4096)
    release_memory(dev)
    before_blocks = cuda_allocations.live()
    before = torch.cuda.memory_allocated(dev)
    sizer = AdaptiveBatchSizer(4096, grow_after=2, memory=CudaMemory(dev))
    for _ in range(20):
        sizer.run(step)
    after = torch.cuda.memory_allocated(dev)
    assert sizer.ooms >= 1 and sizer.size < 1024
    assert after == before, (
        f"{after - before} bytes still allocated after the runs:\n{cuda_allocations.new_since(before_blocks)}"
    )
    assert all(e.new_size < 1024 for e in sizer.history if e.event == "grow")
