"""Input profiles at the engine, for every backend: the message for a call outside a single profile, and profiles
that do not fit the model or each other refused before any step runs. (Routing to a profile's runner and the
backends' own files: tests/backends/test_base.py; Inductor without recompiles: tests/backends/test_inductor.py.)"""

from __future__ import annotations

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig


def _recipe(backend: str) -> Recipe:
    return Recipe([CastConfig(dtype="float32"), CompileConfig(backend=backend), ValidateConfig(measure_latency=False)])


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _batch_profiles(feature: tuple[int, ...], ranges: list[tuple[int, int, int]], name: str = "input"):
    return [[InputSpec(name, min=(lo, *feature), opt=(opt, *feature), max=(hi, *feature))] for lo, opt, hi in ranges]


MLP_PROFILES = _batch_profiles((16,), [(1, 4, 8), (9, 16, 24)])


def test_single_profile_message_names_input_dim_and_range():
    fast = torchopt.optimize(_mlp().eval(), _recipe("eager"), inputs=MLP_PROFILES[0], progress=False)
    with pytest.raises(ValueError, match=r"input 'input' dim 0 is 9, outside the profile range \[1, 8\]"):
        fast(torch.randn(9, 16))


def test_profile_rank_that_does_not_fit_the_model_is_a_torchopt_error():
    # measure_latency off: the engine times the original module at the opt shape before any step runs.
    spec = InputSpec("x", min=(1, 1, 3, 8, 8), max=(4, 1, 3, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"the model fails on profile 0's min shapes \{'x': \(1, 1, 3, 8, 8\)\}"
        r" \(RuntimeError: .*\); check that each InputSpec has the rank and static dims"
        r" ConvNet.forward expects",
    ):
        torchopt.optimize(ConvNet(), _recipe("eager"), inputs=[spec], progress=False)


def test_overlapping_profiles_are_rejected():
    with pytest.raises(ValueError, match="profiles 0 and 1 overlap"):
        torchopt.optimize(
            _mlp(), _recipe("eager"), inputs=_batch_profiles((16,), [(1, 4, 8), (8, 12, 16)]), progress=False
        )


def test_min_above_max_is_rejected():
    with pytest.raises(ValueError, match=r"dim 0 needs min <= opt <= max, got min=8, opt=8, max=4"):
        InputSpec("input", min=(8, 16), opt=(8, 16), max=(4, 16))
