"""find_optimal_batch: picks the right size on steps with a known latency per batch size."""

import json
import time

import pytest
import torch
from matplotlib.figure import Figure

from torchopt.batch import OptimalBatchConfig, find_optimal_batch
from torchopt.inputs import InputSpec

# Few, short timing windows: the steps below sleep a known time, so there is little noise to average out.
FAST = {"warmup": 2, "iters": 10, "max_time_s": 0.2}


def sleeper(latency_ms):
    """A step that takes `latency_ms(batch)` milliseconds (sleeps: no CPU contention between tests)."""

    def step(x):
        time.sleep(latency_ms(x.shape[0]) / 1000)
        return x

    return step


def batch(n):
    return torch.ones(n, 1)


def test_latency_budget_picks_the_largest_size_within_it():
    # 4 ms + 0.05 ms per item: throughput keeps rising, so the budget decides. p50 <= 8.75 ms ⇔ batch <= 95;
    # the doubling sweep stops at 128 (10.4 ms) and bisection tries 96 (8.8 ms, over: sleeps only overshoot)
    # then 80 (8.0 ms: 0.75 ms of margin for scheduling noise).
    res = find_optimal_batch(
        sleeper(lambda n: 4 + 0.05 * n), batch, latency_budget_ms=8.75, percentile=50, latency=FAST, progress=False
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
    assert 80 / 10e-3 < res.throughput < 80 / 8.0e-3


def test_plateau_stops_the_sweep():
    # The device is "underused" below 16 items (2 ms per call whatever the batch), then time grows linearly:
    # the throughput plateaus at 16 and the sweep stops two doublings later, a few more where sleep jitter on a
    # loaded host makes a point of the flat plateau look faster (seen on a 2-core CI machine: 512).
    res = find_optimal_batch(sleeper(lambda n: max(2.0, 0.125 * n)), batch, latency=FAST, progress=False)
    assert res.stop_reason == "plateau", str(res)
    assert max(p.size for p in res.points) <= 1024  # far below the 65536 limit the sweep would go to
    assert res.size >= 16  # not in the underused range
    best = max(p.throughput for p in res.points)
    assert res.throughput >= 0.9 * best


@pytest.mark.parametrize("recheck", [True, False])
def test_a_miss_is_rechecked_before_it_ends_the_sweep(recheck):
    calls = {"n": 0}

    def step(x):
        # The first 15 calls at 32 items are slow (another process was busy), the rest are not.
        slow = x.shape[0] == 32 and calls["n"] < 15
        calls["n"] += x.shape[0] == 32
        time.sleep((10.0 if slow else 1.0 + 0.03 * x.shape[0]) / 1000)

    res = find_optimal_batch(
        step,
        batch,
        latency_budget_ms=4.0,
        percentile=50,
        max_batch=64,
        latency=FAST,
        recheck_misses=recheck,
        progress=False,
    )
    if recheck:
        assert [p.phase for p in res.points if p.size == 32] == ["sweep", "recheck"]
        assert res.size == 64 and res.stop_reason == "max_batch"
    else:
        assert res.stop_reason == "latency_budget" and res.size < 32  # the stray slow window ended the sweep


def test_max_batch_caps_the_sweep_and_is_swept():
    res = find_optimal_batch(sleeper(lambda n: 2 + 0.01 * n), batch, max_batch=12, latency=FAST, progress=False)
    assert [p.size for p in res.points] == [1, 2, 4, 8, 12]
    assert res.stop_reason == "max_batch" and res.size in (8, 12)


def test_out_of_memory_ends_the_sweep_and_is_refined():
    def step(x):
        if x.shape[0] > 20:
            raise torch.OutOfMemoryError("simulated: too large")
        time.sleep((5 + 0.01 * x.shape[0]) / 1000)  # 20 items: +24 % throughput over 16

    res = find_optimal_batch(step, batch, latency=FAST, progress=False)
    assert res.stop_reason == "oom"
    statuses = {p.size: p.status for p in res.points}
    assert statuses[32] == "oom" and statuses[24] == "oom" and statuses[20] == "ok"
    assert res.size == 20


def test_non_oom_error_is_reraised_with_the_batch_size():
    def step(x):
        if x.shape[0] >= 8:
            raise IndexError("index 7 is out of bounds")

    with pytest.raises(IndexError, match="out of bounds") as info:
        find_optimal_batch(step, batch, latency=FAST, progress=False)
    assert any("batch size 8" in n for n in info.value.__notes__)


def test_no_size_meets_the_budget():
    with pytest.raises(ValueError, match=r"no batch size meets latency_budget_ms=1.0 at p99.*batch 1"):
        find_optimal_batch(sleeper(lambda n: 3.0), batch, latency_budget_ms=1.0, latency=FAST, progress=False)


def test_input_specs_and_a_module():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    spec = InputSpec("x", min=(1, 8), opt=(2, 8), max=(4, 8))
    res = find_optimal_batch(model, spec, max_batch=8, latency=FAST, progress=False)
    assert res.size in (1, 2, 4, 8) and res.device == "cpu"


def test_result_figure_and_json():
    res = find_optimal_batch(
        sleeper(lambda n: 2 + 0.1 * n), batch, latency_budget_ms=50, max_batch=16, latency=FAST, progress=False
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
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        find_optimal_batch(sleeper(lambda n: 1.0), batch, progress=False, **options)


def test_make_inputs_with_the_wrong_batch_size():
    with pytest.raises(ValueError, match=r"make_inputs\(1\) returned argument 0 with 2 items"):
        find_optimal_batch(sleeper(lambda n: 1.0), lambda n: torch.ones(n + 1, 3), progress=False)


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
