"""find_optimal_batch: picks the right size on steps with a known latency per batch size.

The sweeps run on a deterministic latency model (the `timer=` injection point) rather than on sleeps: a sleep
only bounds a latency from below, and on a loaded host the sweep's decisions then depend on the machine's speed.
"""

import json

import pytest
import torch
from matplotlib.figure import Figure

from torchopt.batch import OptimalBatchConfig, find_optimal_batch
from torchopt.inputs import InputSpec
from torchopt.profile import LatencyResult

# Short timing windows for the few tests that measure a real module.
FAST = {"warmup": 2, "iters": 10, "max_time_s": 0.2}


def modelled(latency_ms):
    """A timer with the signature of `torchopt.profile.latency` whose every sample is `latency_ms(batch, n)`
    milliseconds, `n` counting the earlier measurements of that batch size. It runs the step once, so the
    step's own errors (out of memory, bugs) surface as they would when measured."""
    seen: dict[int, int] = {}

    def timer(call, *args, batch_size, device, **options):
        call(*args)
        n = seen.get(batch_size, 0)
        seen[batch_size] = n + 1
        samples = [float(latency_ms(batch_size, n))] * 10
        return LatencyResult.from_samples(samples, device=device, batch_size=batch_size, stable=True)

    return timer


def per_size(latency_ms):
    """A model whose latency depends on the batch size alone."""
    return modelled(lambda n, _: latency_ms(n))


def identity(x):
    return x


def batch(n):
    return torch.ones(n, 1)


def test_latency_budget_picks_the_largest_size_within_it():
    # 4 ms + 0.05 ms per item: throughput keeps rising, so the budget decides. p50 <= 8.75 ms ⇔ batch <= 95;
    # the doubling sweep stops at 128 (10.4 ms) and bisection tries 96 (8.8 ms, over) then 80 (8.0 ms).
    res = find_optimal_batch(
        identity, batch, latency_budget_ms=8.75, percentile=50, timer=per_size(lambda n: 4 + 0.05 * n), progress=False
    )
    assert res.size == 80, str(res)
    assert res.stop_reason == "latency_budget"
    assert [p.size for p in res.latest] == [1, 2, 4, 8, 16, 32, 64, 80, 96, 128]
    # Each miss is timed twice before it counts; the refinement bisects between 64 and 128.
    assert [(p.size, p.phase) for p in res.points[7:]] == [
        (128, "sweep"),
        (128, "recheck"),
        (96, "refine"),
        (96, "recheck"),
        (80, "refine"),
    ]
    assert res.latency_ms <= 8.75 and res.best_point.meets_budget
    assert res.latency_ms == pytest.approx(8.0) and res.throughput == pytest.approx(80 / 8.0e-3)


def test_plateau_stops_the_sweep():
    # The device is "underused" below 16 items (2 ms per call whatever the batch), then time grows linearly:
    # the throughput plateaus at 16 and the sweep stops two doublings later (patience 2).
    res = find_optimal_batch(identity, batch, timer=per_size(lambda n: max(2.0, 0.125 * n)), progress=False)
    assert res.stop_reason == "plateau", str(res)
    assert max(p.size for p in res.points) <= 1024  # far below the 65536 limit the sweep would go to
    assert [p.size for p in res.points] == [1, 2, 4, 8, 16, 32, 64]
    assert res.size >= 16  # not in the underused range
    assert res.size == 16  # 32 and 64 tie with it (same throughput): the smallest, lowest latency, wins
    best = max(p.throughput for p in res.points)
    assert res.throughput >= 0.9 * best


@pytest.mark.parametrize("recheck", [True, False])
def test_a_miss_is_rechecked_before_it_ends_the_sweep(recheck):
    def latency_ms(n, measured_before):
        # The first measurement at 32 items is slow (another process was busy), later ones are not.
        return 10.0 if n == 32 and measured_before == 0 else 1.0 + 0.03 * n

    res = find_optimal_batch(
        identity,
        batch,
        latency_budget_ms=4.0,
        percentile=50,
        max_batch=64,
        timer=modelled(latency_ms),
        recheck_misses=recheck,
        progress=False,
    )
    if recheck:
        assert [p.phase for p in res.points if p.size == 32] == ["sweep", "recheck"]
        assert res.size == 64 and res.stop_reason == "max_batch"
    else:
        assert res.stop_reason == "latency_budget" and res.size < 32  # the stray slow window ended the sweep


def test_max_batch_caps_the_sweep_and_is_swept():
    res = find_optimal_batch(identity, batch, max_batch=12, timer=per_size(lambda n: 2 + 0.01 * n), progress=False)
    assert [p.size for p in res.points] == [1, 2, 4, 8, 12]
    assert res.stop_reason == "max_batch" and res.size in (8, 12)
    assert res.size == 12  # 12 / 2.12 ms beats 8 / 2.08 ms by 46 %


def test_out_of_memory_ends_the_sweep_and_is_refined():
    def step(x):
        if x.shape[0] > 20:
            raise torch.OutOfMemoryError("simulated: too large")
        return x

    # 20 items: +24 % throughput over 16.
    res = find_optimal_batch(step, batch, timer=per_size(lambda n: 5 + 0.01 * n), progress=False)
    assert res.stop_reason == "oom"
    statuses = {p.size: p.status for p in res.points}
    assert statuses[32] == "oom" and statuses[24] == "oom" and statuses[20] == "ok"
    assert res.size == 20


def test_non_oom_error_is_reraised_with_the_batch_size():
    def step(x):
        if x.shape[0] >= 8:
            raise IndexError("index 7 is out of bounds")

    with pytest.raises(IndexError, match="out of bounds") as info:
        find_optimal_batch(step, batch, timer=per_size(lambda n: 1.0), progress=False)
    assert any("batch size 8" in n for n in info.value.__notes__)


def test_no_size_meets_the_budget():
    with pytest.raises(ValueError, match=r"no batch size meets latency_budget_ms=1.0 at p99.*batch 1"):
        find_optimal_batch(identity, batch, latency_budget_ms=1.0, timer=per_size(lambda n: 3.0), progress=False)


def test_input_specs_and_a_module():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    spec = InputSpec("x", min=(1, 8), opt=(2, 8), max=(4, 8))
    res = find_optimal_batch(model, spec, max_batch=8, latency=FAST, progress=False)
    assert res.size in (1, 2, 4, 8) and res.device == "cpu"


def test_result_figure_and_json():
    res = find_optimal_batch(
        identity, batch, latency_budget_ms=50, max_batch=16, timer=per_size(lambda n: 2 + 0.1 * n), progress=False
    )
    fig = res.plot()
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    data = json.loads(res.to_json())
    assert data["size"] == res.size and len(data["points"]) == len(res.points)
    assert f"optimal batch {res.size}" in str(res)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"percentile": 101}, ValueError, r"percentile must be in \[0, 100\]"),
        ({"latency_budget_ms": -1.0}, ValueError, "latency_budget_ms must be > 0"),
        ({"max_batch": 0}, ValueError, "max_batch must be >= 1"),
        ({"max_batch": "64"}, TypeError, "max_batch must be int"),
        ({"latency": {"batch_size": 4}}, ValueError, "latency.batch_size is set per swept size"),
        ({"latency": {"iters": 0}}, ValueError, "iters must be > 0"),
        ({"refine": 2}, ValueError, "unknown key 'refine'"),
        ({"timer": 5.0}, TypeError, "timer must be callable like torchopt.profile.latency, got float"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        find_optimal_batch(identity, batch, progress=False, **{"timer": per_size(lambda n: 1.0), **options})


def test_make_inputs_with_the_wrong_batch_size():
    with pytest.raises(ValueError, match=r"make_inputs\(1\) returned argument 0 with 2 items"):
        find_optimal_batch(identity, lambda n: torch.ones(n + 1, 3), timer=per_size(lambda n: 1.0), progress=False)


def test_config_round_trip_keeps_the_sweep_latency_defaults():
    cfg = OptimalBatchConfig.from_dict({"latency_budget_ms": 20.0, "latency": {"iters": 7}})
    assert cfg.latency.iters == 7 and cfg.latency.warmup == OptimalBatchConfig().latency.warmup
    assert OptimalBatchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.gpu
def test_sweep_on_gpu():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU()).cuda().half().eval()
    make = lambda n: torch.randn(n, 3, 64, 64, device="cuda", dtype=torch.float16)  # noqa: E731
    res = find_optimal_batch(model, make, latency_budget_ms=5.0, max_batch=512, progress=False)
    assert res.device.startswith("cuda") and res.best_point.meets_budget
    assert res.latency_ms <= 5.0 and res.size >= 1


@pytest.mark.multi_gpu
def test_search_on_cuda_1_runs_and_times_on_device_1():
    dev = torch.device("cuda", 1)
    torch.cuda.reset_peak_memory_stats(0)
    torch.cuda.reset_peak_memory_stats(1)
    before_0 = torch.cuda.memory_allocated(0)
    model = torch.nn.Linear(1024, 1024).to(dev)
    res = find_optimal_batch(model, lambda n: torch.randn(n, 1024, device=dev), max_batch=64, latency_budget_ms=1e3)
    assert res.device == "cuda:1" and res.best_point.latency_ms > 0
    assert torch.cuda.max_memory_allocated(1) > 0
    assert torch.cuda.max_memory_allocated(0) == before_0 == torch.cuda.memory_allocated(0)
