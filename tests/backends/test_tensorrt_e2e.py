"""End to end through Torch-TensorRT: dynamic-batch (and sequence) profiles, accuracy against eager, save/load,
out-of-profile errors, several profiles, autocast, dry run, engine cache, CUDA graphs, and a ModelOpt INT8
model. Marked `tensorrt`: they skip with the reason (tests/conftest.py) where torch_tensorrt or CUDA is
missing. The quantized-export test needs only CUDA and ModelOpt (`gpu`): it checks the graph the backend hands
to `torch_tensorrt.dynamo.compile`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe, compare_outputs
from torchopt.backends import BuildLog, BuildSettings
from torchopt.backends.tensorrt import TensorRTBackend, export_profile
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig
from torchopt.runtime import Runtime

# Floors against the float32 eager model: TensorRT picks its own kernels and accumulation orders, so compare by
# cosine/SQNR per precision, as the recipes' validate step does.
FLOORS = {
    "float32": {"min_cosine": 0.99999, "min_sqnr_db": 50.0},
    "float16": {"min_cosine": 0.999, "min_sqnr_db": 30.0},
    "int8": {"min_cosine": 0.98, "min_sqnr_db": 15.0},
}
CONV_SPEC = InputSpec("x", min=(1, 3, 32, 32), opt=(8, 3, 32, 32), max=(32, 3, 32, 32))
BLOCK_SPEC = InputSpec("x", min=(1, 16, 64), opt=(4, 64, 64), max=(8, 128, 64))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, dropout=0.0)

    def forward(self, x):
        return self.layer(x)


def _recipe(dtype: str = "float16", **compile_options) -> Recipe:
    return Recipe(
        [
            CastConfig(dtype=dtype),
            CompileConfig(backend="tensorrt", **compile_options),
            ValidateConfig(measure_latency=False),
        ],
        name=f"tensorrt-{dtype}",
    )


def _check_close(ref: torch.Tensor, out: torch.Tensor, precision: str) -> None:
    m = compare_outputs(ref, out)
    floor = FLOORS[precision]
    assert m.cosine >= floor["min_cosine"] and m.sqnr_db >= floor["min_sqnr_db"], m


def _details(fast) -> dict:
    return next(s for s in fast.report.steps if s.step == "compile").details["tensorrt"]


def _message(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value)


@pytest.mark.tensorrt
def test_conv_net_dynamic_batch_fp16_save_load(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    fast = torchopt.optimize(model, "tensorrt-fp16", inputs=[CONV_SPEC], device="cuda", progress=False)
    assert fast.report.backend == "tensorrt" and fast.report.accuracy_passed
    details = _details(fast)
    assert details["profiles"][0]["partition"]["tensorrt_blocks"] >= 1
    for batch in (1, 7, 32):
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        _check_close(model(x), fast(x), "float16")

    eager = torchopt.optimize(model, "eager-fp32", inputs=[CONV_SPEC], device="cuda", progress=False)
    big = torch.randn(33, 3, 32, 32, device="cuda")
    assert _message(fast, big) == _message(eager, big)  # checked before the engine sees it

    fast.save(tmp_path / "conv")
    meta = json.loads((tmp_path / "conv" / "meta.json").read_text())
    assert meta["backend_files"]["backend"] == "tensorrt" and meta["backend_files"]["files"]
    loaded = torchopt.load(tmp_path / "conv")
    assert loaded.report.backend == "tensorrt"
    for batch in (1, 5, 32):  # dynamic dims survived the round trip
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        torch.testing.assert_close(loaded(x), fast(x), rtol=1e-3, atol=1e-3)
    assert _message(loaded, big) == _message(fast, big)


@pytest.mark.tensorrt
def test_save_format_tensorrt_writes_one_serialized_engine_per_profile(tmp_path):
    """The engines alone (TensorRT's runtime, as Triton's tensorrt_plan loads them): each holds its profile's
    min/opt/max and computes what the optimized module does."""
    import tensorrt
    from torch_tensorrt.runtime import TorchTensorRTModule

    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    small = InputSpec("x", min=(1, 3, 32, 32), opt=(4, 3, 32, 32), max=(8, 3, 32, 32))
    large = InputSpec("x", min=(9, 3, 32, 32), opt=(16, 3, 32, 32), max=(32, 3, 32, 32))
    fast = torchopt.optimize(model, _recipe(), inputs=[[small], [large]], device="cuda", progress=False)
    path = fast.save(tmp_path / "conv", format="tensorrt")
    artifact = json.loads((path / "meta.json").read_text())["artifact"]
    assert artifact["format"] == "tensorrt"
    assert artifact["files"] == ["tensorrt_profile0.engine", "tensorrt_profile1.engine"]
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    for file, spec, batch in zip(artifact["files"], (small, large), (5, 20), strict=True):
        data = (path / file).read_bytes()
        engine = runtime.deserialize_cuda_engine(data)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == tensorrt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        assert len(inputs) == 1 and len(outputs) == 1
        lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(inputs[0], 0))
        assert (lo, opt, hi) == (spec.min, spec.opt, spec.max)
        runner = TorchTensorRTModule(data, input_binding_names=inputs, output_binding_names=outputs)
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        torch.testing.assert_close(runner(x.half()).float(), fast(x), rtol=1e-3, atol=1e-3)
    assert torchopt.load(path).report.backend == "tensorrt"  # the directory still loads as before


@pytest.mark.tensorrt
def test_transformer_block_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = Block().eval().cuda()
    fast = torchopt.optimize(model, _recipe("float32"), inputs=[BLOCK_SPEC], device="cuda", progress=False)
    for batch, seq in ((1, 16), (3, 77), (8, 128)):
        x = torch.randn(batch, seq, 64, device="cuda")
        _check_close(model(x), fast(x), "float32")
    with pytest.raises(ValueError, match=r"input 'x' dim 1 is 129, outside the profile range \[16, 128\]"):
        fast(torch.randn(2, 129, 64, device="cuda"))
    fast.save(tmp_path / "block")
    loaded = torchopt.load(tmp_path / "block")
    x = torch.randn(5, 40, 64, device="cuda")
    torch.testing.assert_close(loaded(x), fast(x), rtol=1e-4, atol=1e-4)


@pytest.mark.tensorrt
def test_two_profiles_build_one_engine_each():
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    profiles = [
        [InputSpec("x", min=(1, 3, 32, 32), opt=(4, 3, 32, 32), max=(8, 3, 32, 32))],
        [InputSpec("x", min=(9, 3, 32, 32), opt=(32, 3, 32, 32), max=(64, 3, 32, 32))],
    ]
    fast = torchopt.optimize(model, _recipe("float16"), inputs=profiles, device="cuda", progress=False)
    assert len(_details(fast)["profiles"]) == 2
    assert fast.runners[0] is not fast.runners[1]
    for batch in (1, 8, 9, 64):
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        _check_close(model(x), fast(x), "float16")
    with pytest.raises(ValueError, match="fit none of the 2 profiles"):
        fast(torch.randn(65, 3, 32, 32, device="cuda"))


@pytest.mark.tensorrt
def test_autocast_with_kept_layers():
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    recipe = _recipe("float32", tensorrt={"autocast": "float16", "autocast_keep": ["fc"]})
    fast = torchopt.optimize(model, recipe, inputs=[CONV_SPEC], device="cuda", progress=False)
    assert fast.report.precision == "float16" and "keeping ['fc']" in fast.report.precision_reason
    kwargs = _details(fast)["compile_kwargs"]
    assert kwargs["enable_autocast"] is True and kwargs["autocast_excluded_nodes"]
    x = torch.randn(4, 3, 32, 32, device="cuda")
    _check_close(model(x), fast(x), "float16")


@pytest.mark.tensorrt
def test_dry_run_reports_the_partition_and_pinned_ops():
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    recipe = _recipe(
        "float32", tensorrt={"dryrun": True, "torch_executed_ops": ["aten.relu.default"], "min_block_size": 1}
    )
    fast = torchopt.optimize(model, recipe, inputs=[CONV_SPEC], device="cuda", progress=False)
    partition = _details(fast)["profiles"][0]["partition"]
    assert partition["tensorrt_blocks"] >= 1 and partition["fallback_ops"].get("aten.relu.default", 0) == 2
    assert any("dry run" in n for n in fast.report.notes)
    x = torch.randn(3, 3, 32, 32, device="cuda")
    _check_close(model(x), fast(x), "float32")  # the partitioned graph runs in PyTorch


@pytest.mark.tensorrt
def test_engine_cache_and_timing_cache_are_written(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    recipe = _recipe("float16", tensorrt={"engine_cache_dir": str(tmp_path / "cache")})
    torchopt.optimize(model, recipe, inputs=[CONV_SPEC], device="cuda", progress=False)
    assert any((tmp_path / "cache" / "uncalibrated").rglob("*"))
    assert (tmp_path / "cache" / "timing_cache.bin").is_file()
    again = torchopt.optimize(model, recipe, inputs=[CONV_SPEC], device="cuda", progress=False)  # cache hit
    x = torch.randn(2, 3, 32, 32, device="cuda")
    _check_close(model(x), again(x), "float16")


@pytest.mark.tensorrt
def test_cuda_graphs_on_request():
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    fast = torchopt.optimize(
        model, _recipe("float16", cuda_graphs=True), inputs=[CONV_SPEC], device="cuda", progress=False
    )
    assert _details(fast)["cuda_graphs"] is True
    for batch in (4, 4, 9, 4):  # re-records on a shape change
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        _check_close(model(x), fast(x), "float16")


def _int8_model() -> torch.nn.Module:
    from torchopt._compat import import_modelopt_quantization

    mtq = import_modelopt_quantization()
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    batches = [torch.randn(8, 3, 32, 32, device="cuda") for _ in range(4)]
    mtq.quantize(model, copy.deepcopy(mtq.INT8_DEFAULT_CFG), lambda m: [m(b) for b in batches])
    return model


@pytest.mark.tensorrt
def test_int8_qdq_model_compiles_with_min_block_size_1():
    model = _int8_model()
    reference = copy.deepcopy(model)
    runtime = Runtime(device=torch.device("cuda"), quantized=True)
    log = BuildLog()
    (runner,) = TensorRTBackend().build(model, [[CONV_SPEC]], runtime, BuildSettings(), log)
    assert log.details["tensorrt"]["compile_kwargs"]["min_block_size"] == 1
    assert log.details["quant_format"] == "int8"
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        _check_close(reference(x), runner(x), "int8")


@pytest.mark.tensorrt
def test_int8_recipe_end_to_end(tmp_path):
    """quantize (ModelOpt INT8) → export under export_torch_mode → TensorRT, engines cached per calibration."""
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    calib = [torch.randn(8, 3, 32, 32, device="cuda") for _ in range(4)]
    recipe = torchopt.recipes.get("tensorrt-int8").to_dict()
    recipe["steps"][2] = {"compile": {"backend": "tensorrt", "tensorrt": {"engine_cache_dir": str(tmp_path)}}}
    fast = torchopt.optimize(model, recipe, inputs=[CONV_SPEC], calib_data=calib, device="cuda", progress=False)
    assert fast.report.backend == "tensorrt" and fast.report.accuracy_passed
    details = _details(fast)
    assert details["compile_kwargs"]["min_block_size"] == 1
    assert details["compile_kwargs"]["engine_cache_dir"].startswith(str(tmp_path / "calib-"))
    for batch in (1, 13, 32):
        x = torch.randn(batch, 3, 32, 32, device="cuda")
        _check_close(model(x), fast(x), "int8")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_quantized_export_has_tensorrt_quantize_ops(preset):
    """What the backend hands to Torch-TensorRT for a ModelOpt Q/DQ model: `tensorrt::quantize_op` nodes with
    the dynamic batch kept (torch.export under ModelOpt's export_torch_mode, on CUDA)."""
    if preset.startswith("FP8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89+")
    from torchopt._compat import import_modelopt_quantization

    mtq = import_modelopt_quantization()
    torch.manual_seed(0)
    model = ConvNet().eval().cuda()
    batches = [torch.randn(8, 3, 32, 32, device="cuda") for _ in range(4)]
    mtq.quantize(model, copy.deepcopy(getattr(mtq, preset)), lambda m: [m(b) for b in batches])
    enabled = sum(isinstance(m, mtq.nn.TensorQuantizer) and m.is_enabled for m in model.modules())
    program = export_profile(model, [CONV_SPEC], device=torch.device("cuda"), quantized=True)
    quantize_op = torch.ops.tensorrt.quantize_op.default
    ops = [n for n in program.graph.nodes if n.op == "call_function" and n.target == quantize_op]
    assert len(ops) >= enabled > 0  # a quantize op for each enabled quantizer (weights and activations)
    (rng,) = program.range_constraints.values()
    assert (int(rng.lower), int(rng.upper)) == (1, 32)
    x = torch.randn(5, 3, 32, 32, device="cuda")
    with torch.no_grad():
        # The exported program computes the same Q/DQ (through ModelOpt's export-mode op).
        _check_close(model(x), program.module()(x), "float16")
