"""torchopt.runtime: the Runtime record round-trips, Dispatch checks, routes and casts calls, and the output walk
rebuilds every container (namedtuples included) with its own type."""

import collections
import dataclasses

import pytest
import torch

from torchopt.inputs import InputSpec
from torchopt.runtime import Dispatch, Runtime, cast_floats, map_tensors

CPU = torch.device("cpu")
PROFILES = [[InputSpec("x", min=(1, 4), max=(8, 4))], [InputSpec("x", min=(9, 4), max=(16, 4))]]
Heads = collections.namedtuple("Heads", ["logits", "ids"])


def test_runtime_round_trips_through_its_dict():
    rt = Runtime(device=CPU, dtype=torch.bfloat16, quantized=True, cast_outputs=False, calib_fingerprint="abc")
    assert rt.to_dict() == {
        "dtype": "bfloat16",
        "quantized": True,
        "cast_outputs": False,
        "calib_fingerprint": "abc",
        "lowp": None,
    }
    assert Runtime.from_dict(rt.to_dict(), CPU) == rt
    deployed = Runtime(device=CPU, dtype=torch.float16, lowp="fp8")
    assert Runtime.from_dict(deployed.to_dict(), CPU) == deployed
    saved_before_lowp = {k: v for k, v in rt.to_dict().items() if k != "lowp"}
    assert Runtime.from_dict(saved_before_lowp, CPU).lowp is None


def test_runtime_is_frozen_and_checked():
    with pytest.raises(TypeError, match=r"Runtime.dtype must be dtype, got str 'float16'"):
        Runtime(device=CPU, dtype="float16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Runtime(device=CPU).dtype = torch.float16  # type: ignore[misc]


def test_adapt_and_examples_follow_the_compute_dtype():
    rt = Runtime(device=CPU, dtype=torch.float16)
    x, ids = rt.adapt([torch.randn(2, 4), torch.arange(3)])
    assert x.dtype == torch.float16 and ids.dtype == torch.int64
    (example,) = rt.examples(PROFILES[0], "max", seed=3)
    assert example.shape == (8, 4) and example.dtype == torch.float16
    torch.testing.assert_close(example, rt.examples(PROFILES[0], "max", seed=3)[0])


def test_dispatch_routes_by_profile_and_casts_back():
    calls = []

    def runner(i):
        return lambda x: calls.append(i) or {"y": x * 2, "n": torch.tensor(i)}

    d = Dispatch([runner(0), runner(1)], PROFILES, Runtime(device=CPU, dtype=torch.bfloat16))
    out = d(torch.ones(3, 4))
    out_big = d(torch.ones(12, 4))
    assert calls == [0, 1]
    assert out["y"].dtype == torch.float32 and out["n"].dtype == torch.int64  # floats back to float32 only
    assert out_big["y"].shape == (12, 4)
    with pytest.raises(ValueError, match=r"fit none of the 2 profiles"):
        d(torch.ones(17, 4))
    with pytest.raises(TypeError, match=r"input 'x' must be a torch.Tensor, got list"):
        d([1.0])
    with pytest.raises(TypeError, match=r"input 'x' has dtype torch.int64, the spec expects float32"):
        d(torch.ones(2, 4, dtype=torch.int64))
    assert calls == [0, 1]  # refused calls never reach a runner


def test_dispatch_needs_one_runner_per_profile():
    with pytest.raises(ValueError, match=r"1 runners for 2 profiles"):
        Dispatch([torch.nn.Identity()], PROFILES, Runtime(device=CPU))


def test_cast_floats_keeps_structure():
    out = cast_floats((torch.ones(1, dtype=torch.float16), [torch.ones(1, dtype=torch.int8)]), torch.float32)
    assert isinstance(out, tuple) and out[0].dtype == torch.float32 and out[1][0].dtype == torch.int8


def test_cast_floats_rebuilds_namedtuples_with_their_type():
    out = cast_floats({"heads": Heads(torch.ones(2, dtype=torch.float16), torch.arange(2))}, torch.float32)
    heads = out["heads"]
    assert type(heads) is Heads and heads.logits.dtype == torch.float32 and heads.ids.dtype == torch.int64


def test_dispatch_casts_float16_outputs_in_a_namedtuple_back_to_float32():
    def runner(x):
        return Heads(x * 2, x.argmax(1))

    dispatch = Dispatch([runner, runner], PROFILES, Runtime(device=CPU, dtype=torch.float16))
    out = dispatch(torch.ones(2, 4))
    assert type(out) is Heads and out.logits.dtype == torch.float32 and out.ids.dtype == torch.int64
    torch.testing.assert_close(out.logits, torch.full((2, 4), 2.0))


def test_map_tensors_keeps_every_container_and_non_tensor_leaf():
    tree = [Heads(torch.ones(1), None), (torch.zeros(1), "label"), {"n": 3, "t": torch.ones(2)}]
    out = map_tensors(lambda t: t + 1, tree)
    assert type(out) is list and type(out[0]) is Heads and type(out[1]) is tuple
    assert out[0].logits.item() == 2.0 and out[0].ids is None and out[1][1] == "label" and out[2]["n"] == 3
    torch.testing.assert_close(out[2]["t"], torch.full((2,), 2.0))
