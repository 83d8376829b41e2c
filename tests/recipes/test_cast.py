"""The recipe step `cast`: the module's precision and memory format, and why they were chosen."""

import copy

import pytest
import torch

from torchopt import InputSpec
from torchopt.recipe import StepContext, get_handler
from torchopt.recipes import CastConfig
from torchopt.report import OptimizeReport

CPU = torch.device("cpu")


def _context(model: torch.nn.Module, spec: InputSpec) -> StepContext:
    report = OptimizeReport(recipe="test", device="cpu")
    return StepContext(model=model, reference=copy.deepcopy(model), profiles=[[spec]], device=CPU, report=report)


def _cnn() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()


def test_auto_is_float32_on_cpu_with_channels_last_for_a_conv_net():
    ctx = _context(_cnn(), InputSpec("x", shape=(1, 3, 8, 8)))
    get_handler(CastConfig())(CastConfig(), ctx)
    weight = ctx.model[0].weight
    assert weight.dtype == torch.float32 and weight.is_contiguous(memory_format=torch.channels_last)
    assert ctx.report.precision == "float32" and ctx.report.precision_reason.startswith("auto: float32 on CPU")
    assert any("channels_last" in note for note in ctx.report.notes)


def test_a_requested_dtype_casts_the_module_and_notes_cpu_half_precision():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
    ctx = _context(mlp, InputSpec("x", shape=(2, 4)))
    config = CastConfig(dtype="bf16", cast_outputs=False)
    get_handler(config)(config, ctx)
    assert ctx.model[0].weight.dtype == torch.bfloat16 and ctx.report.precision == "bfloat16"
    assert "often slower than float32" in ctx.report.precision_reason
    assert ctx.cast_outputs is False
    assert not any("channels_last" in note for note in ctx.report.notes)  # no convolution, no 4-D input


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"dtype": "int8"}, ValueError, r"cast.dtype must be one of \['auto', 'float32', 'float16', 'bfloat16'\]"),
        ({"dtype": 16}, TypeError, r"cast.dtype must be str, got int 16"),
        ({"channels_last": "yes"}, TypeError, r"cast.channels_last must be true, false or null \(auto\)"),
    ],
)
def test_bad_options_name_the_option(options, error, match):
    with pytest.raises(error, match=match):
        CastConfig(**options)
