"""Formats, methods and their ModelOpt configs; every format on CPU (NVFP4: clear error) and on CUDA (GPU-marked).
QuantizeConfig's own checks: tests/quantize/test_config.py."""

import copy

import pytest
import torch

import torchopt.quantize as tq
from torchopt._compat import import_modelopt_quantization
from torchopt.accuracy import compare_outputs
from torchopt.quantize.export import warn_deployment
from torchopt.quantize.formats import (
    HISTOGRAM_METHODS,
    deployment_warning,
    format_from_weights,
    modelopt_config,
    trt_formats,
)


def _sqnr(model, qmodel, batches):
    return min(compare_outputs(model(x), qmodel(x)).sqnr_db for x in batches)


# --- the format table and the ModelOpt configs -----------------------------------------------------------


@pytest.mark.parametrize("fmt", list(tq.FORMATS))
def test_every_format_maps_to_a_modelopt_preset_copy(fmt):
    mtq = import_modelopt_quantization()
    spec = tq.FORMATS[fmt]
    before = copy.deepcopy(getattr(mtq, spec.preset))
    for method in spec.methods:
        cfg = modelopt_config(fmt, method, keep_modules=["conv1"])
        assert cfg["quant_cfg"][-1] == {"quantizer_name": "conv1.*", "enable": False}  # kept layers win: last
        mtq.config.QuantizeConfig(**cfg)  # ModelOpt accepts it
    assert getattr(mtq, spec.preset) == before, "the preset itself must never be mutated"


@pytest.mark.parametrize("method", HISTOGRAM_METHODS)
def test_histogram_methods_edit_the_input_entry_in_place(method):
    mtq = import_modelopt_quantization()
    cfg = modelopt_config("int8", method)
    assert cfg["algorithm"] is None  # ModelOpt's max algorithm cannot finish a histogram calibrator
    entries = cfg["quant_cfg"]
    idx = [i for i, e in enumerate(entries) if e.get("cfg", {}).get("calibrator") == "histogram"]
    preset_idx = [
        i for i, e in enumerate(mtq.INT8_DEFAULT_CFG["quant_cfg"]) if e["quantizer_name"] == "*input_quantizer"
    ]
    # Same position as the preset's entry: the exclusions after it (lm_head, BatchNorm, ...) still win.
    assert idx == preset_idx
    assert len(entries) == len(mtq.INT8_DEFAULT_CFG["quant_cfg"])


def test_algorithms_per_method():
    assert modelopt_config("int8", "max")["algorithm"] == "max"
    assert modelopt_config("int8", "mse")["algorithm"] == {"method": "mse"}
    assert modelopt_config("int8_smoothquant", "smoothquant", alpha=0.5)["algorithm"] == {
        "method": "smoothquant",
        "alpha": 0.5,
    }
    assert modelopt_config("int4_awq", "awq")["algorithm"]["method"].startswith("awq")


def test_the_table_tells_every_format_apart_by_its_weights():
    for name, spec in tq.FORMATS.items():
        assert format_from_weights(spec.weight_kind, spec.smoothed) == name
    assert format_from_weights("int2", False) is None


def test_the_cuda_extensions_the_table_names_exist_in_modelopt():
    extensions = import_modelopt_quantization().extensions
    getters = {spec.cuda_ext for spec in tq.FORMATS.values() if spec.cuda_ext is not None}
    assert getters == {"get_cuda_ext", "get_cuda_ext_fp8"}
    assert all(callable(getattr(extensions, g)) for g in getters)


def test_tensorrt_converts_every_format_but_int4_awq():
    assert trt_formats() == ["int8", "int8_smoothquant", "fp8", "nvfp4"]


@pytest.mark.parametrize(
    ("fmt", "capability", "expected"),
    [
        ("fp8", (8, 0), "sm_89+"),  # A100: no FP8 in TensorRT
        ("fp8", (8, 9), None),
        ("fp8", (9, 0), None),
        ("int8", (7, 5), None),
        ("nvfp4", (9, 0), "sm_100+"),
        ("nvfp4", (10, 0), None),
        ("int4_awq", (9, 0), "cannot be deployed through Torch-TensorRT"),
    ],
)
def test_deployment_warning_by_compute_capability(fmt, capability, expected):
    message = deployment_warning(fmt, capability)
    if expected is None:
        assert message is None
    else:
        assert expected in message
        with pytest.warns(tq.DeploymentWarning, match=expected.replace("+", r"\+")):
            warn_deployment(fmt, capability)


def test_deployment_warning_bad_capability():
    with pytest.raises(TypeError, match=r"capability must be a \(major, minor\) pair"):
        deployment_warning("fp8", 9)


# --- every format on real fake-quant runs --------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "method"), [("int8", "max"), ("fp8", "max"), ("fp8", "percentile"), ("int8", "mse")])
def test_cnn_formats_on_cpu(cnn, digits, limits, fmt, method):
    ref = copy.deepcopy(cnn)
    q = tq.quantize(cnn, fmt, digits.calib(4), method=method, progress=False)
    with torch.no_grad():
        assert _sqnr(ref, q, digits.test_batches()) >= limits["cnn_sqnr_floor_db"][fmt]
    assert tq.detect_format(q) == fmt
    assert tq.summary(q).quantized == ["conv1", "conv2", "fc1", "head"]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_block_formats_on_cpu(block, block_data, limits, fmt):
    ref = copy.deepcopy(block)
    q = tq.quantize(block, fmt, block_data, progress=False)
    with torch.no_grad():
        assert _sqnr(ref, q, block_data) >= limits["block_sqnr_floor_db"][fmt]


def test_smoothquant_beats_plain_int8_on_a_transformer_block(block, block_data, limits):
    table = tq.compare(
        block,
        block_data,
        formats=["int8", "int8_smoothquant"],
        methods=["max", "smoothquant"],
        config={"format": "int8_smoothquant", "alpha": 0.5},
        progress=False,
    )
    rows = {(r["format"], r["method"]): r for r in table.ok_rows()}
    plain, smooth = rows[("int8", "max")], rows[("int8_smoothquant", "smoothquant")]
    assert smooth["sqnr_db"] >= limits["block_sqnr_floor_db"]["int8_smoothquant"]
    # The LayerNorm's outlier channels dominate per-tensor activation scales; SmoothQuant moves them into W.
    assert smooth["sqnr_db"] > plain["sqnr_db"] + 3.0, (plain, smooth)
    q = tq.quantize(copy.deepcopy(block), "int8_smoothquant", block_data, progress=False)
    assert "smoothed" in {r["module"]: r["input"] for r in tq.summary(q).rows}["q"]
    assert tq.detect_format(q) == "int8_smoothquant"


def test_int4_awq_is_weight_only(block, block_data, limits):
    ref = copy.deepcopy(block)
    q = tq.quantize(block, "int4_awq", block_data, progress=False)
    rows = {r["module"]: r for r in tq.summary(q).rows}
    assert rows["fc1"]["weight"].startswith("int4 block 128")
    assert rows["fc1"]["input"] == "off"
    with torch.no_grad():
        assert _sqnr(ref, q, block_data) >= limits["block_sqnr_floor_db"]["int4_awq"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error; CUDA runs the NVFP4 GPU test")
def test_nvfp4_without_cuda_is_a_clear_error(cnn, digits):
    with pytest.raises(ValueError, match=r"format 'nvfp4' needs a CUDA device.*the model is on cpu"):
        tq.quantize(cnn, "nvfp4", digits.calib(2), progress=False)
    assert tq.detect_format(cnn) is None  # refused before anything was changed


def test_requantizing_with_another_format_is_refused(cnn, digits):
    q = tq.quantize(cnn, "int8", digits.calib(2), progress=False)
    with pytest.raises(ValueError, match=r"already quantized with format 'int8'; quantizing it again with 'fp8'"):
        tq.quantize(q, "fp8", digits.calib(2), progress=False)
    with pytest.raises(ValueError, match=r"already quantized with format 'int8' already; to recalibrate"):
        tq.quantize(q, "int8", digits.calib(2), progress=False)


def test_bad_model_and_config_types(digits):
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        tq.quantize("resnet", "int8", digits.calib(1))
    with pytest.raises(TypeError, match=r"config must be a QuantizeConfig, a dict of options or a format name"):
        tq.quantize(torch.nn.Linear(4, 4), 8, digits.calib(1))


# --- CUDA (run on the H100) ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8", "nvfp4"])
def test_formats_on_cuda(block, block_data, limits, fmt):
    ref = copy.deepcopy(block).cuda()
    data = [x.cuda() for x in block_data]
    q = tq.quantize(block.cuda(), fmt, data, progress=False)
    with torch.no_grad():
        assert _sqnr(ref, q, data) >= limits["block_sqnr_floor_db"][fmt]
    assert tq.detect_format(q) == fmt


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_transformer_encoder_fast_path_and_bypassed_quantizers(batch_first):
    """nn.TransformerEncoderLayer's fused eval fast path would skip every quantizer (the 'quantized' model
    equals the float one); quantize turns it off per layer. Its MultiheadAttention is rewritten with explicit
    projections (torchopt.quantize.attention), so none of its quantizers is bypassed."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    data = [torch.randn(2, 8, 32) for _ in range(2)]
    ref = copy.deepcopy(enc)
    q = tq.quantize(enc, "int8", data, progress=False)
    with torch.no_grad():
        assert not torch.equal(q(data[0]), ref(data[0]))  # the Q/DQ really runs
        assert _sqnr(ref, q, data) > 20
    summary = tq.summary(q)
    assert summary.bypassed == []
    quantized = " ".join(summary.quantized)
    assert all(f"layers.{i}.self_attn.{p}" in quantized for i in (0, 1) for p in ("in_proj", "out_proj"))
    assert "linear1" in quantized
    notes = q.torchopt_quant.notes
    assert len(notes) == 3 and "2 nn.MultiheadAttention rewritten ('layers.0.self_attn'" in notes[0]
    assert "fused fast path turned off on 'layers.0'" in notes[1]
