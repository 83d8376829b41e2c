"""torchopt.profile.timing (`latency`): known sleeps, the stability verdict, round trips, errors."""

import json

import pytest
import torch

import torchopt.profile as tp
from torchopt.profile.stats import summarize


def test_known_sleep_lands_in_the_right_percentile():
    # Every 10th call takes 15 ms on the injected clock, the others 1 ms: p50 sees the fast calls, p95/p99/max
    # the slow ones.
    clock = {"ns": 0, "n": 0}

    def fn():
        clock["n"] += 1
        clock["ns"] += 15_000_000 if clock["n"] % 10 == 0 else 1_000_000

    res = tp.latency(fn, warmup=1, iters=50, max_iters=50, timer=lambda: clock["ns"])
    assert clock["n"] == 51 and res.iters == 50
    assert res.min_ms == 1.0 and res.p50_ms == 1.0, res
    assert res.p95_ms == 15.0 and res.p99_ms == 15.0 and res.max_ms == 15.0, res
    assert sum(s == 15.0 for s in res.samples_ms) == 5
    assert res.device == "cpu"
    assert res.throughput == pytest.approx(1000.0 / res.mean_ms)


def test_stats_fields_agree_with_samples():
    x = torch.randn(64, 64)
    res = tp.latency(torch.mm, x, x, warmup=2, iters=30, batch_size=64)
    assert res.iters == len(res.samples_ms) >= 30
    ref = summarize(res.samples_ms)
    assert res.p50_ms == ref["p50"] and res.p99_ms == ref["p99"] and res.mean_ms == ref["mean"]
    assert res.min_ms <= res.p50_ms <= res.p90_ms <= res.p95_ms <= res.p99_ms <= res.max_ms
    assert res.throughput == pytest.approx(64 * 1000.0 / res.mean_ms)
    assert res.throughput_unit == "items/s"


class _FakeClock:
    """Nanoseconds that advance only inside the timed function: latencies without wall-clock jitter."""

    def __init__(self):
        self.now = 0

    def __call__(self) -> int:
        return self.now


def test_unstable_run_extends_until_budget():
    # Latency that grows every call never stabilizes: more windows run until max_iters, verdict False.
    calls = {"n": 0}
    clock = _FakeClock()

    def fn():
        calls["n"] += 1
        clock.now += 200_000 * calls["n"]  # 0.2 ms more every call

    res = tp.latency(fn, warmup=1, iters=9, max_iters=18, stability_pct=5.0, timer=clock)
    assert not res.stable
    assert res.iters == 18
    assert res.stability_spread_pct > 5.0


def test_stable_run_does_not_extend():
    # On the fake clock: a wall-clock sleep of 2 ms was seen to jitter past 50 % on a loaded 2-core host.
    clock = _FakeClock()
    res = tp.latency(
        lambda: setattr(clock, "now", clock.now + 2_000_000), warmup=1, iters=9, stability_pct=50.0, timer=clock
    )
    assert res.stable and res.iters == 9
    assert res.stability_spread_pct <= 50.0


def test_warmup_by_time():
    calls = {"n": 0}

    def fn():
        calls["n"] += 1

    res = tp.latency(fn, warmup=1, warmup_s=0.05, iters=5, max_iters=5)
    assert res.warmup == calls["n"] - 5 > 1


def test_tiny_counts_are_cheap():
    # The engine calls latency(model, *inputs, warmup=3, iters=10) on CPU.
    # Cheap is counted in calls (the engine's 3 + 10, at most 100 timed while unstable), not timed: a timing
    # depends on the machine's load.
    linear = torch.nn.Linear(16, 4)
    calls = []

    def model(x):
        calls.append(1)
        return linear(x)

    res = tp.latency(model, torch.randn(2, 16), warmup=3, iters=10)
    assert 10 <= res.iters <= 100 and res.warmup == 3
    assert len(calls) == res.warmup + res.iters


def test_cold_l2_runs_on_cpu():
    x = torch.randn(32, 32)
    res = tp.latency(torch.relu, x, warmup=1, iters=5, l2="cold", l2_flush_mb=1)
    assert res.l2 == "cold" and res.iters >= 5


def test_config_and_result_round_trip():
    cfg = tp.LatencyConfig(warmup=2, iters=7, batch_size=3, l2="cold", device="cpu")
    assert tp.LatencyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    res = tp.latency(torch.relu, torch.randn(4), config=cfg, iters=6)  # overrides win over the config
    assert res.batch_size == 3 and res.iters >= 6
    again = tp.LatencyResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again == res
    assert "samples_ms" not in res.to_dict(samples=False)
    assert "p99" in str(res)


def test_infer_device():
    assert tp.infer_device(torch.relu, (torch.randn(2),)).type == "cpu"
    assert tp.infer_device(torch.nn.Linear(2, 2), ()).type == "cpu"
    assert tp.infer_device(lambda: None, ()).type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"iters": 0}, ValueError, "iters must be > 0, got 0"),
        ({"iters": -3}, ValueError, "iters must be > 0"),
        ({"warmup": 0}, ValueError, "warmup must be > 0, got 0"),
        ({"iters": 2.5}, TypeError, "iters must be int, got float"),
        ({"iters": True}, TypeError, "iters must be int"),
        ({"l2": "warm"}, ValueError, r"l2 must be one of \['hot', 'cold'\], got 'warm'"),
        ({"batch_size": 0}, ValueError, "batch_size must be > 0"),
        ({"max_iters": 3, "iters": 5}, ValueError, "max_iters must be >= iters"),
        ({"stability_pct": 0}, ValueError, "stability_pct must be > 0"),
        ({"device": "gpu0"}, ValueError, "device must be a device string"),
        ({"iter": 5}, ValueError, r"unknown key 'iter'.*did you mean 'iters'"),
        ({"cuda_graph": True}, ValueError, r"cuda_graph=True needs the call to run on CUDA.*runs on cpu"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        tp.latency(torch.relu, torch.randn(3), **kwargs)


@pytest.mark.parametrize("fn", [3, "model", None, torch.randn(2)])
def test_non_callable_fn(fn):
    with pytest.raises(TypeError, match="fn must be callable"):
        tp.latency(fn, torch.randn(3))


def test_bad_config_type():
    with pytest.raises(TypeError, match="config must be LatencyConfig"):
        tp.latency(torch.relu, torch.randn(3), config={"iters": 3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        tp.latency(torch.relu, torch.randn(3), device="cuda")


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_events_time_the_kernel_not_the_host():
    # torch.cuda._sleep spins the GPU; the host returns at once. CUDA-event timing must see the GPU time.
    x = torch.randn(8, device="cuda")
    cycles = 4_000_000  # ~2 ms at the H100's ~1.98 GHz; the reference below measures the same spin
    ref_start, ref_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)
    ref_start.record()
    torch.cuda._sleep(cycles)
    ref_end.record()
    torch.cuda.synchronize()
    ref_ms = ref_start.elapsed_time(ref_end)
    res = tp.latency(lambda t: torch.cuda._sleep(cycles), x, warmup=2, iters=20)
    assert res.device.startswith("cuda")
    assert res.p50_ms == pytest.approx(ref_ms, rel=0.2), (res, ref_ms)


@pytest.mark.gpu
def test_cuda_graph_matches_eager_on_gpu_bound_work():
    a = torch.randn(2048, 2048, device="cuda")
    eager = tp.latency(torch.mm, a, a, warmup=5, iters=30)
    graph = tp.latency(torch.mm, a, a, warmup=5, iters=30, cuda_graph=True)
    assert graph.cuda_graph
    assert graph.p50_ms == pytest.approx(eager.p50_ms, rel=0.15)


@pytest.mark.gpu
def test_cuda_graph_with_a_synchronizing_function_explains():
    x = torch.randn(16, device="cuda")
    with pytest.raises(ValueError, match=r"synchroniz.*cuda_graph=False"):
        tp.latency(lambda t: (t * 2).sum().item(), x, warmup=1, iters=3, cuda_graph=True)


@pytest.mark.gpu
def test_cold_l2_flushes_between_reps():
    # A p50 comparison of cold against hot is not reliable for small kernels (seen on an H200: the flush kernel
    # keeps clocks up and cold timed 13 us against 18 us hot), so check the mechanism: cold mode allocates the
    # flush buffer and writes it before every rep, hot mode does not.
    x = torch.randn(4 * 2**20, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.max_memory_allocated()
    hot = tp.latency(torch.neg, x, warmup=5, iters=50)
    hot_peak = torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    cold = tp.latency(torch.neg, x, warmup=5, iters=50, l2="cold", l2_flush_mb=256)
    cold_peak = torch.cuda.max_memory_allocated() - base
    assert cold_peak >= 256 * 2**20 > hot_peak
    assert cold.l2 == "cold" and hot.l2 == "hot" and cold.p50_ms > 0 and hot.p50_ms > 0


def _device_ms(fn, device, n=5):
    """Median milliseconds of `fn()` between events on `device`'s stream (the reference for the tests below)."""
    with torch.cuda.device(device):
        ms = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end))
    return sorted(ms)[n // 2]


@pytest.mark.multi_gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_latency_on_cuda_1_times_device_1_work_and_allocates_there_only(cuda_graph):
    dev = torch.device("cuda", 1)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    work = lambda x: [x @ x for _ in range(8)][-1]
    torch.cuda.reset_peak_memory_stats(0)
    before_0 = torch.cuda.memory_allocated(0)
    res = tp.latency(work, a, device="cuda:1", warmup=3, iters=20, cuda_graph=cuda_graph, l2="cold")
    assert res.device == "cuda:1"
    # events on cuda:0 around work queued on cuda:1 would measure the launches (a few microseconds)
    assert res.p50_ms > 0.5 * _device_ms(lambda: work(a), dev)
    assert torch.cuda.max_memory_allocated(0) == before_0 == torch.cuda.memory_allocated(0)


@pytest.mark.multi_gpu
def test_compare_latency_on_cuda_1_times_device_1_work():
    dev = torch.device("cuda", 1)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    slow = lambda x: [x @ x for _ in range(8)][-1]
    fast = lambda x: x @ x
    cmp = tp.compare_latency({"slow": slow, "fast": fast}, a, rounds=3, iters=10, warmup=3)
    assert cmp.results["slow"].p50_ms > 0.5 * _device_ms(lambda: slow(a), dev)
    assert cmp.speedups["fast"].median > 3
