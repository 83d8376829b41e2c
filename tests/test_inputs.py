"""InputSpec validation, profile normalization and dispatch, CLI spec parsing, forward-signature checks."""

import dataclasses

import pytest
import torch

from torchopt.inputs import (
    InputSpec,
    bind_call,
    check_call,
    check_signature,
    normalize_profiles,
    parse_input_spec,
    select_profile,
)


def test_static_and_dynamic():
    s = InputSpec("x", shape=(2, 3))
    assert not s.is_dynamic and s.min == s.opt == s.max == (2, 3)
    d = InputSpec("x", min=(1, 16), opt=(4, 64), max=(8, 128))
    assert d.dynamic_dims == [0, 1] and d.dim_name(1) == "x_dim1"


def test_opt_defaults_inside_range():
    s = InputSpec("x", min=(1, 3), max=(4, 3))
    assert s.min[0] <= s.opt[0] <= s.max[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min": (2, 3), "opt": (1, 3), "max": (4, 3)}, r"dim 0 needs min <= opt <= max, got min=2, opt=1, max=4"),
        ({"min": (1, 3), "opt": (5, 3), "max": (4, 3)}, r"dim 0 needs min <= opt <= max"),
        ({"min": (1, 3), "max": (4, 3, 5)}, r"same rank"),
        ({"shape": (0, 3)}, r"shape\[0\] must be > 0, got 0"),
        ({"shape": (-1, 3)}, r"must be > 0"),
        ({"min": (0, 3), "max": (4, 3)}, r"min\[0\] must be > 0, got 0"),  # no empty dims (TensorRT has none)
        ({"min": (1, 3)}, r"needs shape=... or both min=... and max="),
        ({"shape": (1, 3), "min": (1, 3)}, r"either shape=... or min/opt/max"),
        ({"shape": (1, 3), "dtype": "float8"}, r"dtype must be one of"),
        ({"min": (1, 3), "max": (4, 3), "dim_names": {1: "b"}}, r"dim 1 is static"),
    ],
)
def test_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InputSpec("x", **kwargs)


def test_spec_is_frozen_and_replace_revalidates():
    s = InputSpec("x", min=(2, 4), opt=(4, 4), max=(8, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.opt = (12, 4)  # a spec stays as validated: backends never see an opt outside [min, max]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.min = (0, 4)
    with pytest.raises(ValueError, match=r"dim 0 needs min <= opt <= max, got min=2, opt=12, max=8"):
        dataclasses.replace(s, opt=(12, 4))
    wider = dataclasses.replace(s, max=(16, 4))
    assert (wider.min, wider.opt, wider.max) == ((2, 4), (4, 4), (16, 4)) and s.max == (8, 4)


def test_bad_spec_types():
    with pytest.raises(TypeError, match=r"shape\[1\] must be int"):
        InputSpec("x", shape=(1, 2.5))
    with pytest.raises(ValueError, match="identifier"):
        InputSpec("my input", shape=(1,))


def test_check_names_input_dim_value_range():
    s = InputSpec("x", min=(1, 3), max=(8, 3))
    with pytest.raises(ValueError, match=r"input 'x' dim 0 is 9, outside the profile range \[1, 8\]"):
        s.check(torch.randn(9, 3))
    with pytest.raises(ValueError, match=r"rank 3"):
        s.check(torch.randn(2, 3, 1))


def test_examples_seeded_and_typed():
    s = InputSpec("ids", dtype="int64", min=(1, 4), opt=(2, 8), max=(4, 16), value_range=(0, 50))
    a, b = s.example("max", seed=3), s.example("max", seed=3)
    assert a.shape == (4, 16) and a.dtype == torch.int64 and torch.equal(a, b)
    assert int(a.max()) < 50
    assert s.shape_at("min+1") == (2, 5) and s.shape_at("max-1") == (3, 15)


def test_export_point_raises_dynamic_dims_of_1_to_2():
    # Tracing specializes a size of 1: the export point lifts dynamic dims to 2, never a static dim of 1.
    s = InputSpec("x", min=(1, 1, 4), opt=(1, 1, 6), max=(8, 1, 8))
    assert s.export_shape == (2, 1, 6) and s.opt == (1, 1, 6)
    assert InputSpec("x", min=(3, 2), opt=(5, 2), max=(9, 2)).export_shape == (5, 2)
    assert s.symbolic_dims("opt") == [2] and s.symbolic_dims("min") == [2] and s.symbolic_dims("max") == [0, 2]
    assert InputSpec("x", min=(1, 1), max=(2, 1)).export_shape == (2, 1)  # 2 is the top of the range


def test_profiles_and_dispatch():
    small = [InputSpec("x", min=(1, 3), max=(8, 3))]
    large = [InputSpec("x", min=(9, 3), max=(64, 3))]
    profiles = normalize_profiles([small, large])
    assert select_profile(profiles, [torch.zeros(4, 3)]) == 0
    assert select_profile(profiles, [torch.zeros(20, 3)]) == 1
    with pytest.raises(ValueError, match="fit none of the 2 profiles"):
        select_profile(profiles, [torch.zeros(65, 3)])


def test_overlapping_profiles_rejected():
    a = [InputSpec("x", min=(1, 3), max=(16, 3))]
    b = [InputSpec("x", min=(8, 3), max=(64, 3))]
    with pytest.raises(ValueError, match="profiles 0 and 1 overlap"):
        normalize_profiles([a, b])


def test_tied_dims_need_same_range():
    a = InputSpec("a", min=(1, 4), max=(8, 4), dim_names={0: "batch"})
    b = InputSpec("b", min=(1, 4), max=(16, 4), dim_names={0: "batch"})
    with pytest.raises(ValueError, match="dim 'batch' is shared"):
        normalize_profiles([a, b])


def test_normalize_rejects_garbage():
    with pytest.raises(TypeError, match="inputs"):
        normalize_profiles(42)
    with pytest.raises(ValueError, match="empty"):
        normalize_profiles([])


class TwoInputs(torch.nn.Module):
    def forward(self, ids, mask=None):
        return ids


def test_signature_checks():
    check_signature(TwoInputs(), [InputSpec("ids", shape=(1, 2))])
    with pytest.raises(ValueError, match=r"inputs\[0\] is named 'x' but TwoInputs.forward's argument 0 is 'ids'"):
        check_signature(TwoInputs(), [InputSpec("x", shape=(1, 2))])
    specs = [InputSpec(n, shape=(1,)) for n in ("ids", "mask", "extra")]
    with pytest.raises(ValueError, match="takes 2 positional arguments"):
        check_signature(TwoInputs(), specs)


def test_bind_call():
    prof = [InputSpec("a", shape=(1,)), InputSpec("b", shape=(1,))]
    assert bind_call(prof, (1,), {"b": 2}) == [1, 2]
    with pytest.raises(TypeError, match="missing inputs"):
        bind_call(prof, (1,), {})
    with pytest.raises(TypeError, match="unexpected input 'c'"):
        bind_call(prof, (1, 2), {"c": 3})


def test_parse_input_spec():
    s = parse_input_spec("ids:int64=1-4-8x16-128-512")
    assert (s.min, s.opt, s.max, s.dtype) == ((1, 16), (4, 128), (8, 512), "int64")
    assert parse_input_spec("x=2x3").shape == (2, 3)
    mixed = parse_input_spec("x=1-8x2-6-9x3-6x3")  # MIN-MAX dims take InputSpec's default opt
    assert mixed.opt == (5, 6, 5, 3) and InputSpec("x", min=(1, 3), max=(8, 6)).opt == (5, 5)
    with pytest.raises(ValueError, match="MIN-OPT-MAX"):
        parse_input_spec("x=1-2-3-4x3")
    with pytest.raises(ValueError, match="not of the form"):
        parse_input_spec("3x224")


class OneArg(torch.nn.Module):
    def forward(self, input):
        return input


def test_one_argument_forward_takes_one_spec_of_any_name():
    check_signature(OneArg(), [InputSpec("x", shape=(1, 2))])
    check_signature(torch.nn.Sequential(), [InputSpec("images", shape=(1, 2))])
    with pytest.raises(ValueError, match=r"inputs name 2 inputs \['x', 'y'\], but OneArg.forward takes 1"):
        check_signature(OneArg(), [InputSpec("x", shape=(1,)), InputSpec("y", shape=(1,))])


def test_check_signature_uses_the_argument_of_a_path():
    check_signature(
        TwoInputs(), [InputSpec("ids.a", shape=(1,)), InputSpec("ids.b", shape=(1,)), InputSpec("mask", shape=(1,))]
    )
    with pytest.raises(ValueError, match=r"inputs\[0\] is named 'batch' but TwoInputs.forward's argument 0 is 'ids'"):
        check_signature(TwoInputs(), [InputSpec("batch.a", shape=(1,)), InputSpec("mask", shape=(1,))])


def test_bind_call_flattens_nested_arguments_in_profile_order():
    prof = [InputSpec(n, shape=(1,)) for n in ("b.y", "a", "b.x", "c.0", "c.1.k")]
    assert bind_call(prof, ({"x": 3, "y": 1}, 2), {"c": [4, {"k": 5}]}) == [1, 2, 3, 4, 5]
    with pytest.raises(TypeError, match=r"input 'c.1' must be a dict with keys \['k'\], got int"):
        bind_call(prof, ({"x": 3, "y": 1}, 2, [4, 5]), {})


def test_tied_sizes_checked_when_selecting_a_profile():
    a = InputSpec("a", min=(1, 4), max=(8, 4), dim_names={0: "batch"})
    b = InputSpec("b", min=(1, 2), max=(8, 2), dim_names={0: "batch"})
    profiles = normalize_profiles([a, b])
    assert select_profile(profiles, [torch.zeros(3, 4), torch.zeros(3, 2)]) == 0
    with pytest.raises(ValueError, match=r"input 'a' dim 0 is 3 but input 'b' dim 0 is 5; both are the dim 'batch'"):
        select_profile(profiles, [torch.zeros(3, 4), torch.zeros(5, 2)])


def test_check_call_checks_type_device_shape_tied_dims_and_dtype_kind():
    profiles = normalize_profiles(
        [
            [
                InputSpec("x", min=(1, 4), max=(8, 4), dim_names={0: "b"}),
                InputSpec("ids", dtype="int64", min=(1,), max=(8,), dim_names={0: "b"}),
            ],
            [
                InputSpec("x", min=(9, 4), max=(16, 4), dim_names={0: "b"}),
                InputSpec("ids", dtype="int64", min=(9,), max=(16,), dim_names={0: "b"}),
            ],
        ]
    )
    ids = torch.zeros(12, dtype=torch.int64)
    assert check_call(profiles, [torch.randn(12, 4), ids], torch.device("cpu")) == 1
    assert check_call(profiles, [torch.randn(2, 4), ids[:2]]) == 0
    with pytest.raises(TypeError, match=r"input 'ids' must be a torch.Tensor, got list"):
        check_call(profiles, [torch.randn(2, 4), [0, 1]])
    meta = torch.empty(2, 4, device="meta")
    with pytest.raises(
        ValueError, match=r"input 'x' is on meta, the optimized module runs on cpu; move it with .to\('cpu'\)"
    ):
        check_call(profiles, [meta, ids[:2]], torch.device("cpu"))
    assert check_call(profiles, [meta, ids[:2]]) == 0  # no device given: any device
    with pytest.raises(ValueError, match=r"fit none of the 2 profiles"):
        check_call(profiles, [torch.randn(20, 4), ids])
    with pytest.raises(ValueError, match=r"input 'x' dim 0 is 2 but input 'ids' dim 0 is 3; both are the dim 'b'"):
        check_call(profiles, [torch.randn(2, 4), ids[:3]])
    with pytest.raises(TypeError, match=r"input 'ids' has dtype torch.float32, the spec expects int64"):
        check_call(profiles, [torch.randn(2, 4), torch.zeros(2)])
