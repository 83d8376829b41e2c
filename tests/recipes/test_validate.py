"""The validate step: a real step that runs last, also when a recipe omits it, on the call the user makes."""

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig

SPEC = InputSpec("x", min=(1, 8), opt=(4, 8), max=(8, 8))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()


def test_a_recipe_without_validate_still_validates_last_with_the_defaults():
    recipe = Recipe([CompileConfig(backend="eager")])
    assert [s.step for s in recipe.steps] == ["compile"]  # the recipe itself is as written
    assert [s.step for s in recipe.plan()] == ["compile", "validate"]
    assert recipe.plan()[-1] == ValidateConfig()
    fast = torchopt.optimize(_mlp(), recipe, inputs=[SPEC], progress=False)
    assert [s.step for s in fast.report.steps] == ["compile", "validate"]
    assert fast.report.accuracy_passed and fast.report.latency_speedup is not None


def test_a_listed_validate_step_is_not_run_twice():
    recipe = Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)])
    assert [s.step for s in recipe.plan()] == ["compile", "validate"]
    fast = torchopt.optimize(_mlp(), recipe, inputs=[SPEC], progress=False)
    assert [s.step for s in fast.report.steps] == ["compile", "validate"]
    assert fast.report.latency_speedup is None  # its own options, not the defaults


def test_validation_checks_the_call_the_user_makes():
    # bfloat16 with float32 outputs: the step compares through the same casts as the optimized module's call.
    recipe = Recipe([CastConfig(dtype="bfloat16"), ValidateConfig(measure_latency=False, max_abs=1e-9)])
    with pytest.raises(torchopt.AccuracyError, match=r"misses its accuracy tolerances.*max \|Δ\|") as info:
        torchopt.optimize(_mlp(), recipe, inputs=[SPEC], progress=False)
    assert info.value.report.accuracy_passed is False and info.value.report.precision == "bfloat16"


def test_unavailable_backend_fails_before_any_step(monkeypatch):
    ran = []
    monkeypatch.setitem(torchopt.recipe._HANDLERS, CastConfig, lambda config, ctx: ran.append("cast"))
    recipe = Recipe([CastConfig(), CompileConfig(backend="tensorrt")])
    with pytest.raises(torchopt.backends.BackendUnavailableError, match=r"backend 'tensorrt' was requested"):
        torchopt.optimize(_mlp(), recipe, inputs=[SPEC], device="cpu", progress=False)
    assert ran == []
