"""`batch_profile`: batch-size results as a dynamic-shape profile."""

import pytest

import torchopt
from torchopt.batch import batch_profile


def test_batch_profile_helper():
    x = torchopt.InputSpec("x", min=(1, 3, 8, 8), opt=(4, 3, 8, 8), max=(16, 3, 8, 8), dim_names={0: "batch"})
    m = torchopt.InputSpec("mask", min=(1, 8), max=(16, 8), dim_names={0: "batch"})
    out = batch_profile([x, m], 300, 64)
    assert [(s.min[0], s.opt[0], s.max[0]) for s in out] == [(1, 64, 300), (1, 64, 300)]
    assert out[0].min[1:] == (3, 8, 8) and out[0].dim_names == {0: "batch"}
    torchopt.inputs.normalize_profiles(out)  # tied dims still agree
    # opt == min on a dynamic dim is moved up one (export specializes it); a static result drops the name.
    assert batch_profile(x, 300, 1)[0].opt[0] == 2
    static = batch_profile(x, 1, 1)[0]
    assert static.shape == (1, 3, 8, 8) and static.dim_names is None
    with pytest.raises(ValueError, match=r"optimal batch \(64\) must be <= the max fit \(32\)"):
        batch_profile(x, 32, 64)
    with pytest.raises(ValueError, match="max_fit must be >= 1"):
        batch_profile(x, 0)
