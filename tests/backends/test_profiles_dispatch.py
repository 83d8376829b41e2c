"""Input profiles at the engine, for every backend: the message for a call outside a single profile, and profiles
that do not fit the model or each other refused before any step runs. (Routing to a profile's runner and the
backends' own files: tests/backends/test_base.py; Inductor without recompiles: tests/backends/test_inductor.py.)"""

from __future__ import annotations

import pytest
import torch

import torchopt
from torchopt import InputSpec


def test_single_profile_message_names_input_dim_and_range(kit):
    fast = torchopt.optimize(kit.mlp().eval(), kit.recipe("eager"), inputs=kit.MLP_PROFILES[0], progress=False)
    with pytest.raises(ValueError, match=r"input 'input' dim 0 is 9, outside the profile range \[1, 8\]"):
        fast(torch.randn(9, 16))


def test_profile_rank_that_does_not_fit_the_model_is_a_torchopt_error(kit):
    # measure_latency off: the engine times the original module at the opt shape before any step runs.
    spec = InputSpec("x", min=(1, 1, 3, 8, 8), max=(4, 1, 3, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"the model fails on profile 0's min shapes \{'x': \(1, 1, 3, 8, 8\)\}"
        r" \(RuntimeError: .*\); check that each InputSpec has the rank and static dims"
        r" ConvNet.forward expects",
    ):
        torchopt.optimize(kit.ConvNet(), kit.recipe("eager"), inputs=[spec], progress=False)


def test_overlapping_profiles_are_rejected(kit):
    with pytest.raises(ValueError, match="profiles 0 and 1 overlap"):
        torchopt.optimize(
            kit.mlp(), kit.recipe("eager"), inputs=kit.profiles((16,), [(1, 4, 8), (8, 12, 16)]), progress=False
        )


def test_min_above_max_is_rejected():
    with pytest.raises(ValueError, match=r"dim 0 needs min <= opt <= max, got min=8, opt=8, max=4"):
        InputSpec("input", min=(8, 16), opt=(8, 16), max=(4, 16))
