"""optimize(): the recipe engine end to end on small models (CPU), the accuracy guard, errors, save/load."""

import copy

import pytest
import torch

import torchopt
import torchopt.recipes.validate as validate_step
from torchopt import AccuracyError, InputSpec, Recipe
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig

QUICK = {"measure_latency": True, "warmup": 1, "iters": 3}


class SmallConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, ids, scale):
        h = self.emb(ids).mean(1) * scale
        return {"logits": self.proj(h), "hidden": h}


def _spec(lo=1, opt=4, hi=8):
    return [InputSpec("x", min=(lo, 3, 12, 12), opt=(opt, 3, 12, 12), max=(hi, 3, 12, 12))]


def _recipe(backend="eager", dtype="float32", **validate):
    return Recipe([CastConfig(dtype=dtype), CompileConfig(backend=backend), ValidateConfig(**{**QUICK, **validate})])


@pytest.fixture
def model(seed):
    m = SmallConvNet()
    m.bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial BN statistics
    return m


def test_eager_recipe_matches_and_reports(model):
    fast = torchopt.optimize(model, _recipe(), inputs=_spec(), progress=False)
    x = torch.randn(5, 3, 12, 12)
    # channels_last (auto for convs) changes the convolution algorithm: float32 rounding differs slightly.
    torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    rep = fast.report
    assert rep.backend == "eager" and rep.precision == "float32" and rep.accuracy_passed
    assert rep.latency_before["p50_ms"] > 0 and rep.latency_after["p50_ms"] > 0 and rep.speedup > 0
    assert [s.step for s in rep.steps] == ["cast", "compile", "validate"]
    assert "eager" in str(rep) and rep.to_markdown().startswith("|")


def test_user_module_left_unchanged(model):
    model.train()
    before = copy.deepcopy(model.state_dict())
    torchopt.optimize(model, _recipe(dtype="bfloat16"), inputs=_spec(), progress=False)
    assert model.training, "optimize must not flip the user's module to eval"
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_accuracy_guard_refuses_and_leaves_module(model):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AccuracyError, match=r"misses its accuracy tolerances .*SQNR .* < 200.0 dB") as info:
        torchopt.optimize(model, _recipe(dtype="bfloat16", min_sqnr_db=200.0), inputs=_spec(), progress=False)
    assert info.value.report.accuracy_passed is False and info.value.report.accuracy["sqnr_db"] < 200
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bf16_cast_outputs_float32(model):
    fast = torchopt.optimize(model, _recipe(dtype="bfloat16"), inputs=_spec(), progress=False)
    out = fast(torch.randn(2, 3, 12, 12))
    assert out.dtype == torch.float32
    assert fast.report.precision == "bfloat16" and fast.report.accuracy["sqnr_db"] > 15


def test_out_of_profile_checked_before_backend(model):
    fast = torchopt.optimize(model, _recipe(), inputs=_spec(), progress=False)
    with pytest.raises(ValueError, match=r"input 'x' dim 0 is 9, outside the profile range \[1, 8\]"):
        fast(torch.randn(9, 3, 12, 12))
    with pytest.raises(ValueError, match=r"input 'x' dim 2 is 13"):
        fast(torch.randn(2, 3, 13, 12))
    with pytest.raises(TypeError, match="missing inputs"):
        fast()


def test_multi_input_dict_output(seed):
    m = TwoHeads()
    specs = [
        InputSpec("ids", dtype="int64", min=(1, 4), opt=(2, 8), max=(4, 16), value_range=(0, 50)),
        InputSpec("scale", min=(1, 1), opt=(2, 1), max=(4, 1)),
    ]
    fast = torchopt.optimize(m, _recipe(), inputs=specs, progress=False)
    ids, scale = torch.randint(0, 50, (3, 10)), torch.rand(3, 1)
    out = fast(ids, scale=scale)
    torch.testing.assert_close(out, m(ids, scale), rtol=0, atol=0)


def test_auto_backend_records_why(model):
    recipe = Recipe([CompileConfig(backend="auto"), ValidateConfig(measure_latency=False)])
    fast = torchopt.optimize(model, recipe, inputs=_spec(), progress=False)
    reason = fast.report.backend_reason
    assert reason.startswith("auto:") and "tensorrt unavailable" in reason


def test_bad_arguments(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got function"):
        torchopt.optimize(lambda x: x, "eager-fp32", inputs=_spec())
    # Names are checked where they say which of several arguments an input is (one input binds by position).
    with pytest.raises(ValueError, match=r"inputs\[0\] is named 'scale' but TwoHeads.forward's argument 0 is 'ids'"):
        torchopt.optimize(
            TwoHeads(), "eager-fp32", inputs=[InputSpec("scale", shape=(1, 1)), InputSpec("ids", shape=(1, 4))]
        )
    with pytest.raises(ValueError, match="unknown recipe 'fastest'"):
        torchopt.optimize(model, "fastest", inputs=_spec())
    with pytest.raises(TypeError, match="recipe must be"):
        torchopt.optimize(model, 3, inputs=_spec())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            torchopt.optimize(model, "eager-fp32", inputs=_spec(), device="cuda")


def test_calibration_batches_used_for_validation(model):
    batches = [torch.randn(3, 3, 12, 12) for _ in range(2)] + [torch.randn(5, 3, 12, 12)]
    fast = torchopt.optimize(model, _recipe(batches=2), inputs=_spec(), calib_data=batches, progress=False)
    assert fast.report.accuracy["samples"] == 6  # the first two calibration batches, 3 rows each


def test_save_load_round_trip(model, tmp_path):
    fast = torchopt.optimize(model, _recipe(), inputs=_spec(), progress=False)
    fast.save(tmp_path / "m")
    loaded = torchopt.load(tmp_path / "m")
    x = torch.randn(3, 3, 12, 12)
    torch.testing.assert_close(loaded(x), fast(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outside the profile range"):
        loaded(torch.randn(9, 3, 12, 12))
    with pytest.raises(ValueError, match="not a saved torchopt module"):
        torchopt.load(tmp_path)


def test_inductor_profile_runs_every_size_without_recompiling(seed):
    from torch._dynamo.utils import counters

    mlp = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Linear(32, 3))
    spec = [InputSpec("input", min=(1, 6), opt=(4, 6), max=(12, 6))]
    recipe = _recipe(backend="inductor")
    fast = torchopt.optimize(mlp, recipe, inputs=spec, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    for b in range(1, 13):
        x = torch.randn(b, 6)
        torch.testing.assert_close(fast(x), mlp(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs, "a size inside the profile recompiled"
    assert fast.report.steps[1].details["graphs"] >= 1


def test_optimized_module_is_inference_only(model):
    fast = torchopt.optimize(model, _recipe(), inputs=_spec(), progress=False)
    inner = copy.deepcopy(fast.module.state_dict())
    x = torch.randn(4, 3, 12, 12)
    y = fast(x)
    assert fast.training is False and fast.module.training is False
    assert fast.eval() is fast and fast.train(False) is fast
    with pytest.raises(
        RuntimeError, match=r"OptimizedModule \(recipe 'custom'\) is an inference module .*run torchopt"
    ):
        fast.train()
    with pytest.raises(TypeError, match="mode must be bool, got str 'yes'"):
        fast.train("yes")
    assert fast.training is False and not any(m.training for m in fast.modules())
    for _ in range(3):
        torch.testing.assert_close(fast(x), y, rtol=0, atol=0)  # BatchNorm keeps its running statistics
    for k, v in fast.module.state_dict().items():
        assert torch.equal(v, inner[k]), f"inference changed {k}"


class _DeepConvNet(torch.nn.Module):
    """~10-20 ms a call on CPU: the wrapper's ~20 µs per call is far inside the timing spread."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(*[torch.nn.Conv2d(16 if i else 3, 16, 3, padding=1) for i in range(6)])
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


_FAKE_NS = [0]  # module level: optimize's deep copies of the model all advance this one clock


class _ClockedConvNet(_DeepConvNet):
    """Each forward advances a fake clock by 10 ms: the measurement's arithmetic, free of machine speed."""

    def forward(self, x):
        _FAKE_NS[0] += 10_000_000
        return super().forward(x)


def test_eager_fp32_against_itself_reads_one_within_its_spread(seed, monkeypatch):
    # optimize times the original and the optimized module in alternating rounds; on a clock that only the
    # model's own work advances, the baseline against itself must read exactly 1.00x, spread included.
    measure = validate_step.compare_latency
    monkeypatch.setattr(validate_step, "compare_latency", lambda *a, **kw: measure(*a, **kw, timer=lambda: _FAKE_NS[0]))
    spec = [InputSpec("x", min=(1, 3, 96, 96), opt=(2, 3, 96, 96), max=(2, 3, 96, 96))]
    fast = torchopt.optimize(_ClockedConvNet(), "eager-fp32", inputs=spec, progress=False)
    sp = fast.report.latency_speedup
    assert sp["low"] == sp["median"] == sp["high"] == 1.0, fast.report.speedup_text()
    assert fast.report.speedup == sp["median"]
    assert fast.report.latency_before["p50_ms"] == fast.report.latency_after["p50_ms"] == 10.0
    assert "1.00x (1.00–1.00)" in fast.report.speedup_text() and "rounds" in fast.report.speedup_text()


def _fake_timing(eager_ms: float, compiled_ms: float, calls: list):
    """A compare_latency that times fake callables on a fake clock: eager_ms vs compiled_ms per call."""
    from torchopt.profile import compare_latency

    now = [0]

    def fake(fns, *inputs, **kwargs):
        calls.append(list(fns))

        def run(ms):
            return lambda *a: now.__setitem__(0, now[0] + int(ms * 1e6))

        fakes = {name: run(eager_ms if name == "eager" else compiled_ms) for name in fns}
        return compare_latency(fakes, **{**kwargs, "timer": lambda: now[0]})

    return fake


@pytest.mark.parametrize("compiled_ms, kept", [(1.0, "inductor"), (1.98, "eager")])
def test_auto_on_cpu_decides_with_a_margin_and_load_restores_it(seed, monkeypatch, tmp_path, compiled_ms, kept):
    import torchopt.recipes.compile as compile_step

    mlp = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.GELU(), torch.nn.Linear(32, 3))
    spec = [InputSpec("input", min=(1, 6), opt=(4, 6), max=(8, 6))]
    recipe = Recipe([CompileConfig(backend="auto"), ValidateConfig(measure_latency=False)])
    calls = []
    monkeypatch.setattr(compile_step, "compare_latency", _fake_timing(2.0, compiled_ms, calls))
    fast = torchopt.optimize(mlp, recipe, inputs=spec, device="cpu", progress=False)
    assert calls == [["eager", "inductor"]] and fast.report.backend == kept
    details = fast.report.steps[0].details["auto_latency"]
    assert details["speedup"]["inductor"]["median"] == pytest.approx(2.0 / compiled_ms)
    if kept == "eager":  # 1.01x: inside the margin, the simpler backend stays and the report says why
        assert "eager kept on CPU, inductor not clearly faster" in fast.report.backend_reason
        assert "1.01x (1.01–1.01)" in fast.report.backend_reason
    # The report describes what runs: the Inductor build's notes only when Inductor is kept.
    assert any(n.startswith("torch.compile(") for n in fast.report.notes) == (kept == "inductor")
    fast.save(tmp_path / "m")
    calls.clear()
    loaded = torchopt.load(tmp_path / "m")
    assert calls == [], "load must restore the saved backend, not time eager against inductor again"
    assert loaded.report.backend == kept and loaded.report.backend_reason.startswith("restored from")
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), fast(x), rtol=1e-5, atol=1e-5)


def test_top1_reported_for_classifier_logits_only(model, seed):
    fast = torchopt.optimize(model, _recipe(measure_latency=False), inputs=_spec(), progress=False)
    assert fast.report.accuracy["task"] == "classify" and fast.report.accuracy["top1_agreement"] == 1.0
    embedder = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.LayerNorm(32))
    spec = [InputSpec("input", min=(1, 6), opt=(4, 6), max=(8, 6))]
    fast = torchopt.optimize(embedder, _recipe(measure_latency=False, min_top1=0.9), inputs=spec, progress=False)
    assert fast.report.accuracy["task"] == "embed" and fast.report.accuracy["top1_agreement"] is None
    assert "top-1" not in str(fast.report).split("accuracy", 1)[1].split("\n", 1)[0]
    assert any("min_top1 not checked" in n for n in fast.report.notes)
    forced = torchopt.optimize(embedder, _recipe(measure_latency=False, task="classify"), inputs=spec, progress=False)
    assert forced.report.accuracy["top1_agreement"] == 1.0


def test_validate_task_errors():
    with pytest.raises(ValueError, match=r"validate.task must be one of \['auto', 'classify', 'embed'\], got 'logits'"):
        ValidateConfig(task="logits")
    with pytest.raises(ValueError, match="validate.min_top1=0.9 needs top-1 agreement, which task 'embed' does not"):
        ValidateConfig(task="embed", min_top1=0.9)
    with pytest.raises(ValueError, match="validate.rounds must be > 0, got 0"):
        ValidateConfig(rounds=0)
