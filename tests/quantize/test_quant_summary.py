"""summary() and detect_format(): the per-layer table (status, precision, why, bypassed layers) and the format
read back from a model, quantized by torchopt or by ModelOpt directly."""

import copy

import pytest
import torch

import torchopt.quantize as tq
from torchopt._compat import import_modelopt_quantization
from torchopt.quantize.formats import modelopt_config


def _status(model):
    return {r["module"]: r for r in tq.summary(model).rows}


def test_model_quantized_by_modelopt_directly_is_detected(cnn, digits):
    mtq = import_modelopt_quantization()
    batches = digits.calib(2)
    mtq.quantize(cnn, copy.deepcopy(mtq.FP8_DEFAULT_CFG), lambda m: [m(x) for x in batches])
    assert tq.detect_format(cnn) == "fp8"
    with pytest.raises(ValueError, match=r"already quantized with format 'fp8'"):
        tq.quantize(cnn, "int8", batches, progress=False)


@pytest.mark.parametrize("fmt", [name for name, spec in tq.FORMATS.items() if not spec.needs_cuda])
def test_every_cpu_format_quantized_by_modelopt_directly_is_detected(block, block_data, fmt):
    mtq = import_modelopt_quantization()
    mo_cfg = modelopt_config(fmt, tq.FORMATS[fmt].default_method)
    mtq.quantize(block, mo_cfg, lambda m: [m(x) for x in block_data])
    assert tq.detect_format(block) == fmt


class _KvBiasAttention(torch.nn.Module):
    """An nn.MultiheadAttention that stays one (add_bias_kv): its out_proj is never called as a module."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=True)
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("fmt", ["int8_smoothquant", "int4_awq"])
def test_bypassed_layers_with_smoothquant_and_awq(fmt):
    """SmoothQuant / AWQ warn per layer they cannot calibrate; quantize reports those layers as bypassed instead
    (filterwarnings=error makes any other warning fail this test)."""
    torch.manual_seed(0)
    q = tq.quantize(_KvBiasAttention().eval(), fmt, [torch.randn(2, 8, 32) for _ in range(2)], progress=False)
    summary = tq.summary(q)
    assert summary.bypassed == ["attn.out_proj"]
    assert "forward never runs" in {r["module"]: r["why"] for r in summary.rows}["attn.out_proj"]
    assert "kept as nn.MultiheadAttention (add_bias_kv=True" in q.torchopt_quant.notes[0]


@pytest.mark.parametrize("fmt", ["int8_smoothquant", "int4_awq"])
def test_smoothquant_and_awq_calibrate_a_rewritten_attention(fmt):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    q = tq.quantize(enc, fmt, [torch.randn(2, 8, 32) for _ in range(2)], progress=False)
    summary = tq.summary(q)
    assert summary.bypassed == [] and "layers.1.self_attn.in_proj" in summary.quantized


def test_reason_is_reported(cnn, digits):
    q = tq.quantize(
        cnn, "int8", digits.calib(2), keep=[{"pattern": "head", "reason": "classifier is sensitive"}], progress=False
    )
    assert _status(q)["head"]["why"] == "classifier is sensitive"
    assert "classifier is sensitive" in str(tq.summary(q)) and "| head |" in tq.summary(q).to_markdown()
