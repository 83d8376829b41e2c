"""torchopt.profile.trace: stages in the summary, known sleeps, Chrome trace validity and bound, errors."""

import gzip
import json
import time
import warnings

import pytest
import torch

import torchopt.profile as tp


class Pipeline(torch.nn.Module):
    """Stages with known costs: a 6 ms sleep in `pre`, a small matmul in `model/linear`, nothing in `post`."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 32)

    def forward(self, x):
        with tp.stage("pre"):
            time.sleep(0.006)
            x = x * 2
        with tp.stage("model"), tp.stage("linear"):
            x = self.linear(x).relu()
        with tp.stage("post"):
            return x.argmax(dim=-1)


@pytest.fixture
def pipeline_and_input(seed):
    return Pipeline(), torch.randn(4, 32)


def test_summary_names_the_stages_and_finds_the_sleep(pipeline_and_input, tmp_path):
    model, x = pipeline_and_input
    res = tp.trace(model, x, wait=1, warmup=1, active=3, trace_path=str(tmp_path / "t.json.gz"))
    assert res.steps == 3 and res.activities == ["cpu"]
    stats = {s.path: s for s in res.stages}
    assert set(stats) == {"pre", "model", "model/linear", "post"}
    for s in stats.values():
        assert s.count == 3, s
        assert s.device_ms is None  # no CUDA activity recorded
    # Only bounds that hold however slow the machine is: a sleep never returns early, and the ranking and
    # shares are checked against the recorded figures, not against what an idle machine would take.
    assert stats["pre"].mean_ms >= 6.0 and stats["pre"].p99_ms >= 6.0
    totals = [s.total_ms for s in res.slowest_stages]
    assert totals == sorted(totals, reverse=True) and "pre" in {s.path for s in res.slowest_stages}
    assert stats["pre"].total_ms == pytest.approx(3 * stats["pre"].mean_ms)
    assert 0 < stats["pre"].share <= 1.0
    assert res.step_ms >= 6.0 and res.wall_ms >= 18.0
    assert res.gpu_kernels is None and res.gpu_idle_pct is None
    assert res.top_ops_by == "self_cpu_ms"
    op_names = [o.name for o in res.top_ops]
    assert "aten::addmm" in op_names or "aten::linear" in op_names
    assert not any(n.startswith("ProfilerStep") or n in stats for n in op_names)  # annotations are not ops
    assert res.overhead_pct is not None and res.baseline_step_ms >= 6.0
    text = str(res)
    for name in ("pre", "model/linear", "post", "Slowest stages", "Top ops"):
        assert name in text


def test_chrome_trace_is_gzip_json_with_the_stages(pipeline_and_input, tmp_path):
    model, x = pipeline_and_input
    path = tmp_path / "sub" / "trace.json.gz"  # the directory is created
    res = tp.trace(model, x, active=2, trace_path=str(path))
    assert res.trace_path == str(path) and not res.trace_truncated
    raw = gzip.decompress(path.read_bytes())
    assert len(raw) / 1e6 == pytest.approx(res.trace_mb)
    data = json.loads(raw)
    names = {e.get("name") for e in data["traceEvents"]}
    assert {"pre", "model", "model/linear", "post"} <= names
    assert any(str(n).startswith("ProfilerStep") for n in names)


def test_plain_json_trace(pipeline_and_input, tmp_path):
    model, x = pipeline_and_input
    path = tmp_path / "trace.json"
    tp.trace(model, x, active=1, trace_path=str(path))
    assert json.loads(path.read_text())["traceEvents"]


@pytest.mark.parametrize("max_mb", [0.004, 0.01])
def test_chrome_trace_stays_within_its_bound(pipeline_and_input, tmp_path, max_mb):
    model, x = pipeline_and_input
    path = tmp_path / "small.json.gz"
    res = tp.trace(model, x, active=3, trace_path=str(path), max_trace_mb=max_mb)
    raw = gzip.decompress(path.read_bytes())
    assert len(raw) <= max_mb * 1e6
    data = json.loads(raw)  # still valid JSON
    assert res.trace_truncated and data["torchopt"]["truncated"]
    assert data["torchopt"]["dropped_events"] > 0
    assert any("max_trace_mb" in w for w in res.warnings)
    kept = [e for e in data["traceEvents"] if e.get("ph") == "X"]
    assert kept, "the longest events must survive truncation"


def test_block_mode_counts_only_active_steps(pipeline_and_input):
    model, x = pipeline_and_input
    with tp.trace(wait=1, warmup=1, active=2) as tracer:
        for _ in range(6):
            model(x)
            tracer.step()
            if tracer.done:
                break
    res = tracer.result
    assert res.steps == 2
    assert {s.path: s.count for s in res.stages}["pre"] == 2
    assert res.overhead_pct is None  # only function mode runs an unprofiled baseline


def test_block_mode_too_few_steps_warns_in_summary(pipeline_and_input):
    model, x = pipeline_and_input
    with tp.trace(wait=0, warmup=0, active=3) as tracer:
        model(x)
        tracer.step()
    assert tracer.result.steps == 1
    assert any("only 1 of 3 active steps" in w for w in tracer.result.warnings)
    assert any("warmup=0" in w for w in tracer.result.warnings)


def test_trace_with_shapes_and_stacks(pipeline_and_input, tmp_path):
    model, x = pipeline_and_input
    res = tp.trace(model, x, active=1, record_shapes=True, with_stack=True, measure_overhead=False)
    assert res.overhead_pct is None and res.steps == 1


def test_config_round_trip():
    cfg = tp.TraceConfig(wait=0, warmup=2, active=4, activities=["cpu"], trace_path="a/b.json.gz")
    assert tp.TraceConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"active": 0}, ValueError, "active must be > 0, got 0"),
        ({"wait": -1}, ValueError, "wait must be >= 0"),
        ({"activities": ["gpu"]}, ValueError, "activities entries must be among"),
        ({"activities": []}, ValueError, "activities must name at least one"),
        ({"trace_path": "trace.txt"}, ValueError, "trace_path must end in .json.gz or .json"),
        ({"max_trace_mb": 0}, ValueError, "max_trace_mb must be > 0"),
        ({"with_stack": "yes"}, TypeError, "with_stack must be bool"),
        ({"steps": 3}, ValueError, "unknown key 'steps'"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        tp.trace(torch.relu, torch.randn(2), **kwargs)


def test_bad_fn_and_inputs_without_fn():
    with pytest.raises(TypeError, match="fn must be callable"):
        tp.trace(42, torch.randn(2))
    with pytest.raises(TypeError, match="got inputs but no fn"):
        tp.trace(None, torch.randn(2))


def test_unwritable_trace_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="cannot be created"):
        tp.trace(torch.relu, torch.randn(2), trace_path=str(blocker / "sub" / "t.json.gz"))
    (tmp_path / "d.json").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        tp.trace(torch.relu, torch.randn(2), trace_path=str(tmp_path / "d.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_activity_without_cuda():
    with pytest.raises(ValueError, match="asks for CUDA"):
        tp.trace(torch.relu, torch.randn(2), activities=["cpu", "cuda"])


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_kernels_captured_with_stage_device_time(tmp_path):
    a = torch.randn(1024, 1024, device="cuda")

    def step(a):
        with tp.stage("mm"):
            return a @ a

    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.NoGPUKernelsWarning)
        res = tp.trace(step, a, active=3, trace_path=str(tmp_path / "t.json.gz"))
    assert res.gpu_kernels and res.gpu_kernels >= 3
    assert res.top_ops_by == "self_device_ms" and res.top_ops[0].self_device_ms > 0
    mm = next(s for s in res.stages if s.path == "mm")
    assert mm.device_ms and mm.device_ms > 0
    assert 0.0 <= res.gpu_idle_pct <= 100.0
    assert not res.warnings


@pytest.mark.gpu
def test_loud_warning_when_cuda_requested_but_no_kernel_ran():
    with pytest.warns(tp.NoGPUKernelsWarning, match="NO GPU kernel"):
        res = tp.trace(torch.relu, torch.randn(64), activities=["cpu", "cuda"], active=2)
    assert res.gpu_kernels == 0
    assert str(res).startswith("> **WARNING: CUDA activity was requested")
