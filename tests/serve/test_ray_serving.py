"""`torchopt.serve.ray_serving` without a Ray cluster: the deployment plan (batch cap, wait, request limit) from
a saved artifact, the replica's model (`ServedModel`: item checks, batching, chunking), `RayPredictor` called
on batches the way `map_batches` calls it, and the batch size sweep on a deterministic latency model.
The same code on a real Ray is tested in tests/serve/ray_cluster/."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import torchopt
from torchopt import Recipe
from torchopt.kernels import preprocess_ref
from torchopt.profile import LatencyResult
from torchopt.recipes import CompileConfig, ValidateConfig
from torchopt.serve import RayPredictor, RayServeConfig, plan_ray_serving, ray_batch_size, ray_deployment
from torchopt.serve.ray_serving import ServedModel, derive_batch_wait_s

RECIPE = Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)])


class TwoHeads(torch.nn.Module):
    """A tuple output, to check that each output becomes its own column."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 4), torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.a(x), self.b(x).relu()


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()


def _save(model, spec, path):
    fast = torchopt.optimize(model, RECIPE, inputs=[spec], device="cpu", progress=False)
    return fast.save(path)


@pytest.fixture(scope="module")
def artifact(mlp, tmp_path_factory):
    spec = torchopt.InputSpec("x", min=(2, 16), opt=(8, 16), max=(32, 16))
    return _save(mlp, spec, tmp_path_factory.mktemp("ray_unit") / "mlp.torchopt")


def _with_latency(artifact, tmp_path, p50_ms, p99_ms):
    """A copy of the artifact's meta.json whose report holds a latency measured at the opt batch (8)."""
    meta = json.loads((artifact / "meta.json").read_text())
    meta["report"]["latency_after"] = {"p50_ms": p50_ms, "p99_ms": p99_ms, "batch_size": 8}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


# ------------------------------------------------------------------------------------------------ the plan


def test_plan_defaults_come_from_the_profile(artifact):
    plan = plan_ray_serving(artifact)
    assert plan.max_batch_size == plan.profile_max_batch == 32
    assert plan.max_ongoing_requests == 64  # one batch runs while the next fills: above Ray's default of 5
    assert plan.batch_wait_timeout_s == 0.01  # nothing measured in this artifact: Ray's own default
    assert "no latency measured" in str(plan)


def test_max_batch_size_above_the_profile_is_refused(artifact):
    with pytest.raises(ValueError, match=r"max_batch_size=64 is above the artifact's profile max batch 32"):
        plan_ray_serving(artifact, max_batch_size=64)
    assert plan_ray_serving(artifact, max_batch_size=16).max_ongoing_requests == 32


def test_the_wait_is_the_budget_minus_two_full_batches_p99(artifact, tmp_path):
    measured = _with_latency(artifact, tmp_path, p50_ms=0.5, p99_ms=1.0)  # batch 8; batch 32 ≈ 4x
    plan = plan_ray_serving(measured, latency_budget_ms=10)
    assert plan.batch_wait_timeout_s == pytest.approx((10 - 2 * 4.0) / 1e3)  # the batch in flight and its own
    # No budget: a full batch's p50.
    assert plan_ray_serving(measured).batch_wait_timeout_s == pytest.approx(2.0 / 1e3)
    # A smaller cap shortens the full batch: batch 16 ≈ 2x.
    assert plan_ray_serving(measured, latency_budget_ms=10, max_batch_size=16).batch_wait_timeout_s == pytest.approx(
        (10 - 2 * 2.0) / 1e3
    )
    # Two full batches above the budget, one below it: no wait.
    assert plan_ray_serving(measured, latency_budget_ms=6).batch_wait_timeout_s == 0.0


def test_a_budget_below_a_full_batch_is_refused_with_the_numbers(artifact, tmp_path):
    measured = _with_latency(artifact, tmp_path, p50_ms=0.5, p99_ms=1.0)
    with pytest.raises(ValueError, match=r"latency_budget_ms=3 cannot be met with max_batch_size=32.*p99 4\.00 ms"):
        plan_ray_serving(measured, latency_budget_ms=3)


def test_derived_waits_are_capped():
    wait, _ = derive_batch_wait_s(32, 8, {"p50_ms": 500.0, "p99_ms": 600.0}, None)
    assert wait == 0.1
    wait, why = derive_batch_wait_s(32, 8, None, 40.0)
    assert wait == 0.02 and "half the 40.0 ms budget" in why


def test_an_explicit_wait_is_kept(artifact):
    assert plan_ray_serving(artifact, batch_wait_timeout_s=0.005).batch_wait_timeout_s == 0.005


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"num_replicas": 0}, ValueError, r"num_replicas must be > 0, got 0"),
        ({"max_batch_size": 2.5}, TypeError, r"max_batch_size"),
        ({"autoscaling": 3}, TypeError, r"autoscaling"),
        ({"constructor_retries": 0}, ValueError, r"constructor_retries must be > 0, got 0"),
        ({"replicas": 2}, ValueError, r"unknown key 'replicas' in ray_deployment options.*num_replicas"),
    ],
)
def test_bad_options_name_the_option(artifact, options, error, message):
    with pytest.raises(error, match=message):
        plan_ray_serving(artifact, **options)


def test_a_missing_artifact_is_named_before_ray_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"saved_path '.*nothing\.torchopt' does not exist"):
        plan_ray_serving(tmp_path / "nothing.torchopt")
    with pytest.raises(ValueError, match=r"is not a saved torchopt module \(no meta\.json\)"):
        plan_ray_serving(tmp_path)


def test_without_ray_the_error_names_the_extra(artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError, as when it is not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(ImportError, match=r"pip install 'torchopt-infer\[ray\]'"):
        ray_deployment(artifact)


def test_config_round_trips():
    cfg = RayServeConfig(max_batch_size=8, autoscaling={"min_replicas": 1, "max_replicas": 4})
    assert RayServeConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------------ the replica's model


def test_served_model_runs_items_in_chunks_in_order(artifact, mlp):
    served = ServedModel(artifact, device="cpu")
    assert served.warm_up() == 5  # min, min+1, opt, max-1, max
    calls = []
    call_flat = served.model.call_flat
    served.model.call_flat = lambda *t: calls.append(t[0].shape[0]) or call_flat(*t)
    xs = torch.randn(70, 16)
    outs = served.run([served.item(x.tolist()) for x in xs])
    assert calls == [32, 32, 6]
    torch.testing.assert_close(torch.stack(outs), mlp(xs).detach())
    # One item is below the profile's min batch (2): padded for the call, the copy dropped.
    (one,) = served.run([served.item(xs[0])])
    assert calls[-1] == 2
    torch.testing.assert_close(one, mlp(xs[:1])[0].detach())


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        ([1.0, 2.0], ValueError, r"input 'x': one item has shape \(2,\).*x: \(16,\)\.\.\(16,\)"),
        ({"y": [0.0] * 16}, ValueError, r"request inputs \['y'\] do not match the model's inputs \['x'\]"),
        ("text", TypeError, r"input 'x' must be a \(nested\) list of numbers"),
    ],
)
def test_a_bad_item_names_the_input_and_what_is_expected(artifact, item, error, message):
    served = ServedModel(artifact, device="cpu")
    with pytest.raises(error, match=message):
        served.item(item)


def test_a_replica_without_the_artifact_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"torchopt artifact '.*gone\.torchopt' not found on"):
        ServedModel(tmp_path / "gone.torchopt")


# ------------------------------------------------------------------------------------------------ RayPredictor


def test_predictor_on_a_numpy_batch_passes_other_columns_through(artifact, mlp):
    predictor = RayPredictor(artifact)
    xs = np.random.default_rng(0).standard_normal((75, 16)).astype(np.float32)
    out = predictor({"id": np.arange(75), "x": xs})
    assert sorted(out) == ["id", "output"]
    np.testing.assert_array_equal(out["id"], np.arange(75))
    np.testing.assert_allclose(out["output"], mlp(torch.from_numpy(xs)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_predictor_on_a_pandas_batch_and_a_single_unnamed_column(artifact, mlp):
    pd = pytest.importorskip("pandas")
    xs = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    frame = pd.DataFrame({"data": list(xs)})  # a column of per-row arrays, as Ray's pandas format gives it
    out = RayPredictor(artifact, output_column="logits")(frame)
    np.testing.assert_allclose(out["logits"], mlp(torch.from_numpy(xs)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_predictor_names_the_missing_column(artifact):
    with pytest.raises(KeyError, match=r"the batch has columns \['a', 'b'\]; the model's inputs \['x'\]"):
        RayPredictor(artifact)({"a": np.zeros((2, 16)), "b": np.zeros((2, 16))})


def test_predictor_writes_tuple_outputs_as_columns(tmp_path):
    model = TwoHeads().eval()
    path = _save(model, torchopt.InputSpec("x", min=(1, 16), max=(8, 16)), tmp_path / "two.torchopt")
    xs = np.random.default_rng(2).standard_normal((10, 16)).astype(np.float32)
    out = RayPredictor(path)({"x": xs})
    a, b = model(torch.from_numpy(xs))
    np.testing.assert_allclose(out["output_0"], a.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["output_1"], b.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_predictor_preprocesses_uint8_images(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    spec = torchopt.InputSpec("image", min=(1, 3, 8, 8), opt=(4, 3, 8, 8), max=(8, 3, 8, 8))
    path = _save(model, spec, tmp_path / "conv.torchopt")
    norm = {"mean": (120.0, 110.0, 100.0), "std": (60.0, 50.0, 40.0)}
    images = np.random.default_rng(4).integers(0, 256, (11, 13, 10, 3), dtype=np.uint8)
    out = RayPredictor(path, preprocess=norm)({"image": images})
    expected = model(preprocess_ref(torch.from_numpy(images), (8, 8), **norm)).detach().numpy()
    np.testing.assert_allclose(out["output"], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"preprocess expects column 'image' to hold uint8 images \(N, H, W, 3\)"):
        RayPredictor(path, preprocess=norm)({"image": images.astype(np.float32)})


# ------------------------------------------------------------------------------------------------ batch size


def _latency_model(latency_ms):
    """A timer like `torchopt.profile.latency` whose samples are `latency_ms(batch)`; records the sizes."""
    sizes = []

    def timer(call, *args, batch_size, device, **options):
        call(*args)
        sizes.append(batch_size)
        samples = [float(latency_ms(batch_size))] * 10
        return LatencyResult.from_samples(samples, device=device, batch_size=batch_size, stable=True)

    timer.sizes = sizes
    return timer


def test_ray_batch_size_sweeps_the_loaded_artifact_within_the_budget(artifact):
    timer = _latency_model(lambda n: 2 + 0.25 * n)  # batch 16 takes 6 ms, 17 and above more
    assert ray_batch_size(artifact, latency_budget_ms=6, device="cpu", timer=timer) == 16
    timer = _latency_model(lambda n: 1.0)  # always faster per item: the sweep stops at the profile's max
    assert ray_batch_size(artifact, device="cpu", timer=timer) == 32
    assert max(timer.sizes) == 32
    assert ray_batch_size(artifact, measure=False) == 8  # the profile's opt


def test_importing_torchopt_serve_does_not_import_ray():
    code = "import sys, torchopt.serve; print('ray' in sys.modules, 'starlette' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.gpu
def test_predictor_on_cuda_matches_the_cpu_module(artifact, mlp):
    xs = np.random.default_rng(6).standard_normal((40, 16)).astype(np.float32)
    out = RayPredictor(artifact, device="cuda")({"x": xs})
    np.testing.assert_allclose(out["output"], mlp(torch.from_numpy(xs)).detach().numpy(), rtol=1e-4, atol=1e-4)
