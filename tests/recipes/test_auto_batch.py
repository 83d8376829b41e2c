"""Recipe step `auto_batch` inside torchopt.optimize: the profile's opt/max come from the batch searches."""

import json
from pathlib import Path

import pytest
import torch

import torchopt
from torchopt.batch.memory_backends import CpuRssMemory
from torchopt.recipe import Recipe
from torchopt.recipes import AutoBatchConfig

MiB = 2**20
FAST = {"warmup": 2, "iters": 10, "max_time_s": 0.2}
HAS_PROC = Path("/proc/self/clear_refs").exists()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


def _recipe(**auto_batch):
    return Recipe.from_dict(
        {
            "name": "auto-batch-test",
            "steps": [
                {"auto_batch": auto_batch},
                {"compile": {"backend": "eager"}},
                {"validate": {"warmup": 1, "iters": 3}},
            ],
        }
    )


def test_cpu_sets_opt_from_the_sweep_and_keeps_the_profile_max():
    torch.manual_seed(0)
    spec = torchopt.InputSpec("x", min=(1, 16), opt=(2, 16), max=(32, 16))
    fast = torchopt.optimize(Tiny(), _recipe(optimal={"latency": FAST}), inputs=[spec], device="cpu", progress=False)
    details = fast.report.steps[0].details
    best = details["optimal_batch"]
    new = fast.profiles[0][0]
    assert (new.min[0], new.opt[0], new.max[0]) == (1, max(best["size"], 2), 32)
    assert max(p["size"] for p in best["points"]) <= 32  # the sweep never exceeds the max
    assert "max_batch" not in details
    note = next(n for n in fast.report.notes if n.startswith("auto_batch"))
    assert "kept from the profile" in note and f"opt {best['size']}" in note
    assert fast.report.profiles[0][0]["opt"][0] == new.opt[0]
    # The optimized module accepts the new range and still rejects what lies outside it.
    assert fast(torch.randn(32, 16)).shape == (32, 4)
    with pytest.raises(ValueError, match="outside the profile range"):
        fast(torch.randn(33, 16))


@pytest.mark.skipif(not HAS_PROC, reason="peak RSS reset needs Linux /proc")
def test_cpu_memory_search_with_a_budget_sets_the_max():
    spec = torchopt.InputSpec("x", min=(1, 16), opt=(2, 16), max=(4, 16))
    budget = CpuRssMemory().used_bytes() + 512 * MiB
    recipe = _recipe(
        max_fit={"memory_budget": budget, "headroom": 16 * MiB, "max_batch": 48}, optimal={"latency": FAST}
    )
    fast = torchopt.optimize(Tiny(), recipe, inputs=[spec], device="cpu", progress=False)
    details = fast.report.steps[0].details
    mx = details["max_batch"]
    assert mx["size"] == 48 and mx["limited_by"] == "max_batch"  # a tiny model: the cap binds, not memory
    assert fast.profiles[0][0].max[0] == 48
    assert any("the largest batch run within" in n for n in fast.report.notes)


def test_search_max_required_on_cpu_without_a_budget_is_a_clear_error():
    spec = torchopt.InputSpec("x", min=(1, 16), max=(8, 16))
    with pytest.raises(ValueError, match="CUDA-only unless a budget is given"):
        torchopt.optimize(Tiny(), _recipe(search_max=True), inputs=[spec], device="cpu", progress=False)


def test_several_profiles_are_refused():
    profiles = [
        [torchopt.InputSpec("x", min=(1, 16), max=(4, 16))],
        [torchopt.InputSpec("x", min=(5, 16), max=(8, 16))],
    ]
    with pytest.raises(ValueError, match="auto_batch sets the batch range of one input profile"):
        torchopt.optimize(Tiny(), _recipe(), inputs=profiles, device="cpu", progress=False)


def test_step_config_round_trip_and_validation():
    cfg = AutoBatchConfig.from_dict(
        {"optimal": {"latency_budget_ms": 20, "percentile": 95}, "max_fit": {"headroom": 0}, "min_batch": 2}
    )
    assert cfg.optimal.latency_budget_ms == 20 and cfg.max_fit.headroom == 0
    assert AutoBatchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    recipe = _recipe(optimal={"latency_budget_ms": 20})
    assert Recipe.from_dict(recipe.to_dict()).steps[0] == recipe.steps[0]
    with pytest.raises(ValueError, match="unknown key 'budget' in .*auto_batch.optimal"):
        _recipe(optimal={"budget": 3})
    with pytest.raises(ValueError, match="auto_batch.min_batch must be >= 1"):
        AutoBatchConfig(min_batch=0)
    with pytest.raises(ValueError, match="only 'validate' may follow it"):
        Recipe.from_dict({"steps": [{"compile": {}}, {"auto_batch": {}}]})
