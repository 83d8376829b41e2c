"""A quantized module saved on CPU: a ModelOpt checkpoint (torch.export cannot export fake-quant modules there)
that loads to the same outputs, and a clear error naming the file when ModelOpt is missing at load time."""

import json

import pytest
import torch

import torchopt
import torchopt.quantize as tq
from torchopt import InputSpec, Recipe
from torchopt.quantize import checkpoint
from torchopt.recipes import CastConfig, CompileConfig, QuantizeConfig, ValidateConfig

SPEC = [InputSpec("x", min=(1, 1, 8, 8), opt=(64, 1, 8, 8), max=(256, 1, 8, 8))]


def _recipe(**quant):
    steps = [CastConfig(dtype="float32", channels_last=False), QuantizeConfig(**quant), CompileConfig(backend="eager")]
    return Recipe([*steps, ValidateConfig(measure_latency=False)], name="test-quant")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: CUDA exports Q/DQ models as module.pt2")
def test_a_quantized_module_saves_on_cpu_and_loads_identically(cnn, digits, tmp_path):
    fast = torchopt.optimize(cnn, _recipe(format="int8"), inputs=SPEC, calib_data=digits.calib(2), progress=False)
    path = fast.save(tmp_path / "q")
    assert json.loads((path / "meta.json").read_text())["module_format"] == "modelopt"
    assert (path / "module.modelopt.pt").is_file() and not (path / "module.pt").exists()
    assert any("saved as a ModelOpt checkpoint: torch.export failed" in n for n in fast.report.notes)
    loaded = torchopt.load(path)
    assert tq.detect_format(loaded.module) == "int8"
    x = digits.x_test[:100]
    assert torch.equal(loaded(x), fast(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path: CUDA exports Q/DQ models as module.pt2")
def test_loading_a_quantized_save_without_modelopt_names_it(cnn, digits, tmp_path, monkeypatch):
    fast = torchopt.optimize(cnn, _recipe(format="int8"), inputs=SPEC, calib_data=digits.calib(1), progress=False)
    path = fast.save(tmp_path / "q")

    def no_modelopt():
        raise ImportError("quantization needs NVIDIA ModelOpt: `pip install nvidia-modelopt` (simulated)")

    monkeypatch.setattr(checkpoint, "import_modelopt_quantization", no_modelopt)
    with pytest.raises(
        ImportError, match=r"module\.modelopt\.pt' holds a ModelOpt-quantized module: .*NVIDIA ModelOpt"
    ):
        torchopt.load(path)
