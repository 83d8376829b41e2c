"""find_max_batch: the search logic on a simulated device-memory model (CPU), the CPU RSS path, bad input,
and real out-of-memory errors on a GPU (`gpu` marker). The OOM classification and
the backends themselves are tested in test_oom.py and test_memory_backends.py."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from torchopt.batch import MaxBatchConfig, find_max_batch
from torchopt.batch._calls import as_step, run_guarded
from torchopt.batch.memory_backends import CpuRssMemory, CudaMemory

MiB = 2**20
GiB = 2**30

# (capacity, bytes per item, fixed workspace): small and large maxima, workspace-dominated small batches.
LINEAR_CASES = [
    (16 * GiB, 5 * MiB, 0),
    (16 * GiB, 5 * MiB, 300 * MiB),
    (8 * GiB, 100 * MiB, 50 * MiB),
    (4 * GiB, 1 * MiB, 2000 * MiB),
    (80 * GiB, 3 * MiB, 1 * GiB),
    (24 * GiB, 700 * MiB, 10 * MiB),
]


def _search(sim, make, **options):
    return find_max_batch(sim.step, make, memory=sim, progress=False, **options)


def _check_tested_and_clean(res, sim, baseline):
    assert res.tested
    assert res.size in sim.calls, "the returned size must have been run"
    last_run = [p for p in res.probes if p.size == res.size][-1]
    assert last_run.ok and last_run.peak_bytes <= res.target_bytes
    assert sim.cleanups_in_except == 0, "memory must be recovered outside the except block"
    assert sim.live == baseline and res.memory_returned


@pytest.mark.parametrize(("capacity", "per_item", "workspace"), LINEAR_CASES)
@pytest.mark.parametrize("headroom", [0, 256 * MiB])
@pytest.mark.parametrize("enforce", [True, False])
def test_linear_memory_few_probes_close_to_true_max(
    sim_device, sim_inputs, curves, capacity, per_item, workspace, headroom, enforce
):
    sim = sim_device(capacity, curves["linear"](per_item), workspace=workspace, enforce=enforce)
    baseline = sim.live
    res = _search(sim, sim_inputs, headroom=headroom)
    true_max = sim.true_max(res.target_bytes)
    assert res.enforced is enforce and res.fitted_to == "live"
    assert res.target_bytes == capacity - headroom
    assert res.num_probes <= 4, [(p.size, p.status) for p in res.probes]
    assert res.size <= true_max
    assert res.size >= 0.95 * true_max, (res.size, true_max)
    assert res.limited_by == "memory"
    _check_tested_and_clean(res, sim, baseline)


def test_superlinear_memory_survives_ooms(sim_device, sim_inputs, curves):
    sim = sim_device(16 * GiB, curves["superlinear"](5 * MiB, 1000), workspace=100 * MiB)
    baseline = sim.live
    res = _search(sim, sim_inputs, headroom=0)
    true_max = sim.true_max(res.target_bytes)
    assert res.num_ooms >= 1  # the linear fit over-predicts: real failures happened and were survived
    assert 0.9 * true_max <= res.size <= true_max
    _check_tested_and_clean(res, sim, baseline)
    # Recovery after each OOM saw only the weights left: nothing was pinned by a traceback.
    assert all(live == baseline for live in sim.live_at_cleanup)


def test_the_simulator_models_a_pinned_traceback(sim_device, sim_inputs, curves):
    """Negative control: cleaning up inside `except` would free nothing (so the test above can fail)."""
    sim = sim_device(GiB, curves["linear"](10 * MiB), workspace=100 * MiB)
    baseline = sim.live
    try:
        sim.step(sim_inputs(1000))
    except torch.OutOfMemoryError:
        sim.cleanup()
        assert sim.live == baseline + 100 * MiB  # the workspace is still held by the failed frame
    assert sim.cleanups_in_except == 1
    assert sim.live == baseline


def test_repeated_runs_agree(sim_device, sim_inputs, curves):
    sizes = set()
    for _ in range(3):
        sim = sim_device(12 * GiB, curves["superlinear"](3 * MiB, 2000), workspace=64 * MiB)
        sizes.add(_search(sim, sim_inputs).size)
    assert len(sizes) == 1


def test_max_batch_caps_the_search(sim_device, sim_inputs, curves):
    sim = sim_device(64 * GiB, curves["linear"](MiB), workspace=0)
    res = _search(sim, sim_inputs, max_batch=100)
    assert res.size == 100 and res.limited_by == "max_batch"
    assert max(sim.calls) == 100


def test_budget_below_the_device_counts_runs_over_it_as_failures(sim_device, sim_inputs, curves):
    """A backend without `limit`: the budget is judged by measuring each run's peak."""
    sim = sim_device(40 * GiB, curves["linear"](10 * MiB), workspace=0, enforce=False)
    budget = 6 * GiB
    res = _search(sim, sim_inputs, memory_budget=budget, headroom=64 * MiB)
    assert res.budget_bytes == budget and res.target_bytes == budget - 64 * MiB
    assert res.num_ooms == 0  # the device never failed; the budget is enforced by measuring
    peak = [p.peak_bytes for p in res.probes if p.ok and p.size == res.size][-1]
    assert peak <= res.target_bytes
    assert res.size >= 0.95 * sim.true_max(res.target_bytes)


def test_budget_below_the_device_is_enforced_by_the_limit(sim_device, sim_inputs, curves):
    """The same budget with `limit`: every probe runs with the device capped at the target."""
    sim = sim_device(40 * GiB, curves["superlinear"](10 * MiB, 300), workspace=0, fragmentation=0.02, cache=0.3)
    limits = []

    def step(x):
        limits.append(sim.limit_bytes)
        return sim.step(x)

    budget = 6 * GiB
    res = find_max_batch(step, sim_inputs, memory=sim, memory_budget=budget, headroom=64 * MiB, progress=False)
    assert res.enforced and limits and set(limits) == {res.target_bytes}
    assert res.num_ooms >= 1  # the capped device failed for real (the curve bends: the fit over-predicts)
    assert all(p.peak_bytes <= res.target_bytes for p in res.probes if p.peak_bytes is not None)
    assert 0.95 * sim.true_max(res.target_bytes) <= res.size <= sim.true_max(res.target_bytes)
    assert sim.limit_bytes is None


# An allocator like CUDA's: without pressure it caches 30 % more than it needs (so reserved peaks over-count),
# under pressure it frees the cache, and its blocks fragment by 1-3 %. The curves bend mildly near the
# maximum ("superlinear": the knee at 90 % of the linear maximum), so the first prediction overshoots.
ALLOCATOR_CASES = [
    (16 * GiB, "linear", (5 * MiB,), 300 * MiB),
    (8 * GiB, "linear", (100 * MiB,), 50 * MiB),
    (4 * GiB, "linear", (1 * MiB,), 2000 * MiB),
    (80 * GiB, "linear", (3 * MiB,), 1 * GiB),
    (16 * GiB, "superlinear", (5 * MiB, 2900), 100 * MiB),
    (8 * GiB, "superlinear", (2 * MiB, 3400), 500 * MiB),
    (24 * GiB, "superlinear", (20 * MiB, 1100), 0),
]


@pytest.mark.parametrize(("capacity", "curve", "args", "workspace"), ALLOCATOR_CASES)
@pytest.mark.parametrize("fragmentation", [0.01, 0.02, 0.03])
@pytest.mark.parametrize("headroom", [0, 256 * MiB])
def test_caching_fragmenting_allocator_close_to_the_boundary_under_the_limit(
    sim_device, sim_inputs, curves, capacity, curve, args, workspace, fragmentation, headroom
):
    sim = sim_device(capacity, curves[curve](*args), workspace=workspace, fragmentation=fragmentation, cache=0.3)
    baseline = sim.live
    res = _search(sim, sim_inputs, headroom=headroom)
    true_max = sim.true_max(res.target_bytes)  # the OOM boundary under the limit, fragmentation included
    assert res.enforced and res.fitted_to == "live"
    assert sim.limits_entered == [res.target_bytes] and sim.limit_bytes is None  # the limit is gone again
    # A fixed workspace of half the device makes the one-point estimate useless: one more planning probe.
    probes = 5 if workspace > capacity / 4 else 4
    assert res.num_probes <= probes, [(p.size, p.status) for p in res.probes]
    assert 0.95 * true_max <= res.size <= true_max, (res.size, true_max)
    # The reserved peaks over-counted (the cache), the live peaks are what the model was fitted to.
    first = res.probes[1]
    assert first.peak_bytes > 1.2 * first.peak_allocated_bytes
    assert res.allowance_bytes == sim.used_bytes() - sim.allocated_bytes() + math.ceil(
        MaxBatchConfig().fragmentation * res.target_bytes
    )
    _check_tested_and_clean(res, sim, baseline)


def test_fitting_cached_reserved_peaks_undershoots(sim_device, sim_inputs, curves):
    """Negative control: the same allocator seen only through its reserved peaks (no live-tensor peaks) makes
    the fit over-count bytes per item: the search lands lower and spends more probes (confirmation steps
    climbing from far below the boundary) — what the live fit fixes."""
    kw = {"workspace": 300 * MiB, "fragmentation": 0.02, "cache": 0.3}
    fair = _search(sim_device(16 * GiB, curves["linear"](5 * MiB), **kw), sim_inputs, headroom=0)
    sim = sim_device(16 * GiB, curves["linear"](5 * MiB), live_peaks=False, **kw)
    res = _search(sim, sim_inputs, headroom=0)
    assert res.fitted_to == "peak" and res.allowance_bytes == 0
    true_max = sim.true_max(res.target_bytes)
    assert res.size < fair.size <= true_max and 0.95 * true_max <= fair.size
    assert res.num_probes > fair.num_probes


# A transformer-like allocator: temporaries split the cache's blocks, so `split` of the activations stays
# reserved but unusable, under pressure too (ViT-B/16 on an H100: reserved ~25-32 % above live at the limit).
# The live-bytes fit then overshoots by that fraction; each OOM's account (live + fragments + requested) says
# by how much. (capacity, bytes per item of a linear curve)
SPLIT_CASES = [
    (8 * GiB, 4 * MiB),
    (24 * GiB, 20 * MiB),
    (16 * GiB, 5 * MiB),
    (4 * GiB, 1 * MiB),
    (80 * GiB, 3 * MiB),
]


@pytest.mark.parametrize(("capacity", "per_item"), SPLIT_CASES)
@pytest.mark.parametrize("split", [0.15, 0.25, 0.32])
@pytest.mark.parametrize("headroom", [0, 256 * MiB])
def test_fragments_that_persist_under_pressure_are_read_from_the_oom(
    sim_device, sim_inputs, curves, capacity, per_item, split, headroom
):
    sim = sim_device(capacity, curves["linear"](per_item), split=split, cache=0.3)
    baseline = sim.live
    res = _search(sim, sim_inputs, headroom=headroom)
    true_max = sim.true_max(res.target_bytes)
    assert res.num_probes <= 4, [(p.size, p.status) for p in res.probes]
    assert 0.95 * true_max <= res.size <= true_max, (res.size, true_max)
    ooms = [p for p in res.probes if p.status == "oom"]
    assert ooms and all(p.oom is not None and p.oom.fragment_bytes > 0.1 * split * p.oom.allocated_bytes for p in ooms)
    _check_tested_and_clean(res, sim, baseline)

    # Negative control: the same device whose OOMs carry no account. The live fit alone steps down from the
    # overshoot by the fragmentation allowance and bisects: more probes, and it may run out of them.
    blind = sim_device(capacity, curves["linear"](per_item), split=split, cache=0.3, reports=False)
    res_blind = _search(blind, sim_inputs, headroom=headroom)
    assert all(p.oom is None for p in res_blind.probes)
    assert res_blind.num_probes > res.num_probes


def test_a_bound_disproved_by_a_success_is_ignored(sim_device, sim_inputs, curves):
    """Memory that bends upward and fragments (the account of an OOM far above the boundary scales down too
    far): confirmation runs climb above the bound, which is then ignored; the search still returns a size it
    ran, within its bracket."""
    sim = sim_device(8 * GiB, curves["superlinear"](2 * MiB, 2000), workspace=500 * MiB, split=0.25)
    baseline = sim.live
    res = _search(sim, sim_inputs, headroom=0, max_probes=12)
    true_max = sim.true_max(res.target_bytes)
    assert res.limited_by == "memory" and 0.95 * true_max <= res.size <= true_max, (res.size, true_max)
    _check_tested_and_clean(res, sim, baseline)


def test_cpu_rss_style_backend_keeps_the_measuring_rule(sim_device, sim_inputs, curves):
    """No `limit` and no live-tensor peaks (like CpuRssMemory): runs over the target are "over_budget"."""
    sim = sim_device(40 * GiB, curves["superlinear"](10 * MiB, 300), enforce=False, live_peaks=False)
    baseline = sim.live
    res = _search(sim, sim_inputs, memory_budget=6 * GiB, headroom=64 * MiB)
    assert not res.enforced and res.fitted_to == "peak" and res.allowance_bytes == 0
    assert res.num_ooms == 0 and res.num_probes <= 4
    assert any(p.status == "over_budget" for p in res.probes)  # measured, not prevented
    assert 0.95 * sim.true_max(res.target_bytes) <= res.size <= sim.true_max(res.target_bytes)
    _check_tested_and_clean(res, sim, baseline)


def test_the_limit_is_restored_after_the_search_and_after_an_error(sim_device, sim_inputs, curves):
    sim = sim_device(16 * GiB, curves["linear"](5 * MiB))
    with sim.limit(12 * GiB):  # a limit set before (on CUDA: a per-process memory fraction)
        res = _search(sim, sim_inputs, headroom=256 * MiB)
        assert res.budget_bytes == 12 * GiB  # the search sees the limit as its capacity
        assert sim.limits_entered[-1] == 12 * GiB - 256 * MiB and sim.limit_bytes == 12 * GiB

        def step(x):
            if x.shape[0] > 50:
                raise KeyError("feature 'mask' missing")
            return sim.step(x)

        with pytest.raises(KeyError, match="feature 'mask' missing"):
            find_max_batch(step, sim_inputs, memory=sim, headroom=GiB, progress=False)
        assert sim.limits_entered[-1] == 11 * GiB and sim.limit_bytes == 12 * GiB
    assert sim.limit_bytes is None


def test_budget_above_free_memory_is_clamped_with_a_note(sim_device, sim_inputs, curves):
    sim = sim_device(8 * GiB, curves["linear"](10 * MiB), total=80 * GiB)  # other processes hold the rest
    res = _search(sim, sim_inputs, memory_budget=20 * GiB)
    assert res.budget_bytes == 8 * GiB
    assert any("exceeds what this process can get" in n for n in res.notes)


def test_probe_limit_returns_a_tested_size(sim_device, sim_inputs, curves):
    sim = sim_device(16 * GiB, curves["superlinear"](5 * MiB, 200), workspace=0)
    res = _search(sim, sim_inputs, max_probes=2)
    assert res.num_probes == 2 and res.limited_by == "max_probes"
    assert res.tested and any("max_probes=2" in n for n in res.notes)


def test_result_figure_and_json(sim_device, sim_inputs, curves):
    sim = sim_device(16 * GiB, curves["superlinear"](5 * MiB, 1000), workspace=100 * MiB)
    res = _search(sim, sim_inputs)
    fig = res.plot()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "budget" in labels and "out of memory" in labels
    assert "live-tensor" in ax.get_ylabel()  # the points are what the model was fitted to
    fitted = {(p.size, p.peak_allocated_bytes / GiB) for p in res.probes if p.ok}
    plotted = {tuple(xy) for c in ax.collections for xy in c.get_offsets().tolist()}
    assert fitted <= plotted
    data = json.loads(res.to_json())
    assert data["size"] == res.size and data["num_probes"] == res.num_probes
    assert len(data["probes"]) == len(res.probes)
    assert "max batch" in str(res)


def test_non_oom_error_is_reraised_unchanged_with_the_batch_size(sim_device, sim_inputs, curves):
    sim = sim_device(16 * GiB, curves["linear"](5 * MiB))
    failed_at = []

    def step(x):
        if x.shape[0] > 50:
            failed_at.append(x.shape[0])
            raise KeyError("feature 'mask' missing")
        return sim.step(x)

    with pytest.raises(KeyError, match="feature 'mask' missing") as info:
        find_max_batch(step, sim_inputs, memory=sim, progress=False)
    assert type(info.value) is KeyError
    notes = getattr(info.value, "__notes__", [])
    assert any(f"batch size {failed_at[0]}" in n for n in notes), notes


def test_runtime_errors_that_are_not_oom_propagate(sim_device, sim_inputs):
    sim = sim_device(GiB, lambda n: 0)

    def step(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        find_max_batch(step, sim_inputs, memory=sim, progress=False)
    assert any("batch size 2" in n for n in info.value.__notes__)


def test_make_inputs_with_the_wrong_batch_size(sim_device, curves):
    sim = sim_device(GiB, curves["linear"](MiB))
    with pytest.raises(ValueError, match=r"make_inputs\(2\) returned argument 0 with 3 items along dim 0"):
        find_max_batch(sim.step, lambda n: torch.ones(n + 1, 4), memory=sim, progress=False)
    with pytest.raises(ValueError, match=r"input 'mask' with 1 items"):
        find_max_batch(
            sim.step, lambda n: {"x": torch.ones(n, 4), "mask": torch.ones(1, 4)}, memory=sim, progress=False
        )
    with pytest.raises(TypeError, match="must return a tensor"):
        find_max_batch(sim.step, lambda n: n, memory=sim, progress=False)
    with pytest.raises(TypeError, match="make_inputs must be a callable"):
        find_max_batch(sim.step, 42, memory=sim, progress=False)
    assert sim.calls == []  # nothing ran


def test_budget_larger_than_the_device(sim_device, sim_inputs, curves):
    sim = sim_device(8 * GiB, curves["linear"](MiB), total=8 * GiB)
    with pytest.raises(ValueError, match=r"memory_budget=\d+ bytes \(9.00 GiB\) is larger than the device"):
        _search(sim, sim_inputs, memory_budget=9 * GiB)
    assert sim.calls == []


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "max_batch must be >= 1"),
        (-4, ValueError, "max_batch must be >= 1"),
        (2.5, TypeError, "max_batch must be int"),
    ],
)
def test_bad_max_batch(sim_device, sim_inputs, curves, value, error, match):
    sim = sim_device(GiB, curves["linear"](MiB))
    with pytest.raises(error, match=match):
        _search(sim, sim_inputs, max_batch=value)


def test_bad_options():
    with pytest.raises(ValueError, match="start .* must be <= max_batch"):
        MaxBatchConfig(start=10, max_batch=4)
    with pytest.raises(ValueError, match="tolerance must be in"):
        MaxBatchConfig(tolerance=1.5)
    with pytest.raises(ValueError, match=r"fragmentation must be in \[0, 1\), got 1"):
        MaxBatchConfig(fragmentation=1)
    with pytest.raises(TypeError, match="fragmentation must be int or float, got str"):
        MaxBatchConfig(fragmentation="2%")
    with pytest.raises(ValueError, match="unknown key 'budget'"):
        find_max_batch(torch.nn.Identity(), lambda n: torch.ones(n), budget=3)
    with pytest.raises(TypeError, match="fn_or_model must be an nn.Module or a callable"):
        find_max_batch("resnet50", lambda n: torch.ones(n))


def test_headroom_leaving_nothing(sim_device, sim_inputs, curves):
    sim = sim_device(GiB, curves["linear"](MiB))
    with pytest.raises(ValueError, match="leaves nothing"):
        _search(sim, sim_inputs, headroom=GiB)


def test_step_that_does_not_fit_at_the_warmup_size(sim_device, sim_inputs, curves):
    sim = sim_device(GiB, curves["linear"](600 * MiB))
    with pytest.raises(ValueError, match="does not fit even at the warm-up batch size start=2"):
        _search(sim, sim_inputs, headroom=0)
    assert sim.cleanups_in_except == 0
    assert sim.limit_bytes is None


def test_config_round_trip():
    cfg = MaxBatchConfig(memory_budget=20 * GiB, headroom=0, max_batch=4096, tolerance=0.01)
    assert MaxBatchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_no_cuda_and_no_budget_is_a_clear_error():
    model = torch.nn.Linear(8, 2)
    with pytest.raises(ValueError, match="CUDA-only unless a budget is given.*memory_budget="):
        find_max_batch(model, lambda n: torch.randn(n, 8), progress=False)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_cpu_search_against_peak_rss():
    """The real CPU path: no simulation, the process's peak RSS against a stated budget."""
    rss = CpuRssMemory()
    item = 2**16  # floats: 256 KiB per item, twice (a and its product are alive together)

    def step(x):
        a = torch.ones(x.shape[0], item)
        return (a * 2).sum()

    budget = rss.used_bytes() + 160 * MiB
    res = find_max_batch(step, lambda n: torch.zeros(n, 1), memory_budget=budget, headroom=8 * MiB, progress=False)
    expected = (res.target_bytes - res.baseline_bytes) / (2 * item * 4)  # items that fit above the baseline
    assert res.backend == "cpu-rss" and res.tested
    assert 0.85 * expected <= res.size <= 1.05 * expected, (res.size, expected)
    assert res.num_probes <= 4
    assert res.memory_returned


# ---------------------------------------------------------------------------------------------------------
# GPU: real out-of-memory errors from the CUDA caching allocator (`memory_limit` caps it: see conftest.py).


@pytest.mark.gpu
def test_real_ooms_are_survived_and_memory_returns_to_baseline(memory_limit):
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    memory_limit(3 * GiB)

    def step(x):
        n = x.shape[0]
        a = torch.empty(n, 2**18, device=dev)  # 1 MiB per item
        b = torch.empty(n * n // 32 + 1, 2**18, device=dev)  # superlinear: the linear fit overshoots
        return a.sum() + b.sum()

    before = torch.cuda.memory_allocated(dev)
    sizes = []
    for _ in range(2):
        res = find_max_batch(step, lambda n: torch.zeros(n, 1, device=dev), headroom=0, progress=False)
        sizes.append(res.size)
        assert res.tested and res.memory_returned
        assert torch.cuda.memory_allocated(dev) == before
        step(torch.zeros(res.size, 1, device=dev))  # the returned size really runs, outside the search too
    assert max(sizes) - min(sizes) <= max(1, 0.05 * max(sizes)), sizes


@pytest.mark.gpu
def test_real_model_on_gpu_close_to_the_oom_boundary(memory_limit):
    dev = torch.device("cuda")
    model = (
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3, padding=1)
        )
        .to(dev)
        .half()
        .eval()
    )
    torch.cuda.empty_cache()
    memory_limit(2 * GiB)
    make = lambda n: torch.randn(n, 3, 128, 128, device=dev, dtype=torch.float16)  # noqa: E731
    # cuDNN's workspaces make this small net's live bytes per item fall with the batch (the fit over-counts):
    # the search climbs by confirmation steps, so it gets the probes to prove its bracket (the probe-count goal
    # is judged on real models in benchmarks/bench_batch.py).
    res = find_max_batch(model, make, headroom=32 * MiB, max_probes=16, progress=False)
    print(res, file=sys.stderr)
    assert res.tested and res.memory_returned and res.limited_by == "memory"
    assert res.enforced and res.fitted_to == "live"
    _assert_within_5_percent_of_the_boundary(model, make, res)


def _assert_within_5_percent_of_the_boundary(fn_or_model, make, res) -> None:
    """A batch 5 % larger than the result fails: another search from the result stops below it (same headroom),
    and two calls at that size run out of memory with the allocator capped at the result's target."""
    bigger = int(res.size * 1.05) + 1
    check = find_max_batch(
        fn_or_model, make, headroom=res.headroom_bytes, start=res.size, max_batch=bigger, progress=False
    )
    assert check.size < bigger, (res.size, check.size)
    assert _fails_under_the_limit(fn_or_model, make, bigger, res.target_bytes), (res.size, bigger)


def _fails_under_the_limit(fn_or_model, make, size: int, target: int) -> bool:
    """Whether two calls at `size` run out of memory with the allocator capped at `target` (the boundary)."""
    cuda = CudaMemory()
    step = as_step(fn_or_model, "test")

    def attempt():
        batch = make(size)
        args = batch if isinstance(batch, tuple) else (batch,)
        for _ in range(2):
            step(*args)
        cuda.synchronize()

    cuda.cleanup()
    with cuda.limit(target):
        _, failure = run_guarded(attempt, size, "test", cuda.cleanup)
    cuda.cleanup()
    return failure is not None


@pytest.mark.gpu
def test_training_step_on_gpu_close_to_the_oom_boundary(memory_limit):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()  # momentum buffers appear at the first step (the warm-up)
        return loss.detach()

    def make(n):
        return torch.randn(n, 3, 64, 64, device=dev), torch.randint(0, 10, (n,), device=dev)

    torch.cuda.empty_cache()
    memory_limit(2 * GiB)
    res = find_max_batch(train_step, make, headroom=32 * MiB, progress=False)
    assert res.tested and res.memory_returned and res.num_probes <= 6
    assert res.enforced and res.fitted_to == "live"
    _assert_within_5_percent_of_the_boundary(train_step, make, res)
    print(res, file=sys.stderr)


@pytest.mark.multi_gpu
def test_search_on_cuda_1_measures_and_limits_device_1_only():
    dev = torch.device("cuda", 1)
    torch.cuda.reset_peak_memory_stats(0)
    before_0 = torch.cuda.memory_allocated(0)
    fraction_0 = torch.cuda.get_per_process_memory_fraction(0)
    seen = set()

    def step(x):
        seen.add(x.device)
        return torch.empty(x.shape[0], 2**18, device=x.device).sum()  # 1 MiB per item

    res = find_max_batch(step, lambda n: torch.ones(n, 4, device=dev), memory_budget=512 * 2**20, max_batch=4096)
    assert seen == {dev} and res.backend == "CudaMemory(cuda:1)"
    assert res.size > 100 and torch.cuda.max_memory_allocated(1) > 100 * 2**20
    assert torch.cuda.max_memory_allocated(0) == before_0 == torch.cuda.memory_allocated(0)
    assert torch.cuda.get_per_process_memory_fraction(0) == fraction_0
