"""`quantize` refuses what ModelOpt would fail on before touching the model, puts the model back when anything
fails after it started changing it, and keeps ModelOpt's chatter out of the user's output."""

import warnings

import pytest
import torch

import torchopt.quantize as tq
from torchopt._compat import import_modelopt_quantization
from torchopt.quantize._core import quantize_plain
from torchopt.quantize.calibrate import CalibData


class ConvBnNet(torch.nn.Module):
    """Conv → BatchNorm → ReLU → Linear: BatchNorm is a ModelOpt module with a weight, but no weight quantizer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = ConvBnNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(3)]


def _state(model):
    """What a restored model must have again: module classes, parameters, buffers, hooks, dtypes."""
    return {
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()},
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "params": [id(p) for p in model.parameters()],
    }


def _assert_same_state(model, before):
    after = _state(model)
    assert after["types"] == before["types"]
    assert after["hooks"] == before["hooks"]
    assert after["params"] == before["params"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, (dtype, value) in before["tensors"].items():
        assert after["tensors"][k][0] == dtype, k
        assert torch.equal(after["tensors"][k][1], value), k


def test_keeping_every_conv_and_linear_of_a_batchnorm_net_is_refused_untouched(net, calib):
    before = _state(net)
    with pytest.raises(
        ValueError,
        match=r"keep selects every quantizable layer \(\['conv', 'fc'\]\); ModelOpt's INT8_DEFAULT_CFG never"
        r" quantizes the weights of \['bn'\] \(by type or name\): nothing would be quantized",
    ):
        tq.quantize(net, "int8", calib, keep=["conv", "fc"], progress=False)
    _assert_same_state(net, before)
    assert tq.detect_format(net) is None
    q = tq.quantize(net, "int8", calib, keep=["conv"], progress=False)  # the model is still usable
    assert tq.detect_format(q) == "int8"


def test_a_model_the_format_quantizes_nothing_of(calib):
    class Head(torch.nn.Module):  # ModelOpt's presets leave out '*lm_head*' by name
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.lm_head(x)

    model = Head().eval()
    with pytest.raises(ValueError, match=r"format 'fp8' quantizes no layer of Head: .*\['lm_head'\]"):
        tq.quantize(model, "fp8", [torch.randn(2, 3)], progress=False)
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [("int8", []), ("int8", [{"pattern": "fc", "precision": "fp16"}]), ("fp8", [])],
    ids=["int8", "int8-keep-fp16", "fp8"],
)
def test_a_calibration_batch_failing_after_the_conversion_restores_the_model(net, calib, fmt, keep):
    before = _state(net)
    x = calib[0]
    with torch.no_grad():
        expected = net(x)
    bad = [*calib[:2], torch.randn(4, 5, 8, 8)]  # the third batch has 5 channels: conv fails mid-calibration
    with pytest.raises(ValueError, match=r"calib_data batch 2 .* does not fit ConvBnNet: .*5 channels"):
        tq.quantize(net, fmt, bad, keep=keep, progress=False)
    _assert_same_state(net, before)
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    assert tq.detect_format(tq.quantize(net, fmt, calib, keep=keep, progress=False)) == fmt


def test_weights_rewritten_in_place_before_a_failure_are_restored(net, calib, monkeypatch):
    """As SmoothQuant and AWQ do: fold scales into the weights in place, then (here) fail."""
    mtq = import_modelopt_quantization()
    real = mtq.quantize

    def quantize_then_fail(model, config, forward_loop=None):
        model = real(model, config, forward_loop)
        with torch.no_grad():
            model.conv.weight.mul_(3.0)
            model.fc.bias.data = torch.zeros(4)
        raise RuntimeError("ModelOpt failed after converting the model")

    monkeypatch.setattr(mtq, "quantize", quantize_then_fail)
    before = _state(net)
    with pytest.raises(RuntimeError, match="after converting the model"):
        tq.quantize(net, "int8", calib, progress=False)
    _assert_same_state(net, before)


def test_an_interrupt_during_calibration_restores_the_model(net, calib):
    before = _state(net)

    def interrupted(model):
        model(calib[0])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tq.quantize(net, "int8", interrupted, progress=False)
    _assert_same_state(net, before)


def test_quantize_prints_and_warns_nothing_of_modelopts_own(net, calib, capsys, monkeypatch):
    mtq = import_modelopt_quantization()
    real = mtq.quantize

    def as_at_the_first_call(model, config, forward_loop=None):
        # ModelOpt's first quantization imports modelopt.torch.export, which warns at import (layer_utils.py);
        # later calls find it imported, so the warning is re-emitted here with its exact text.
        warnings.warn("Cannot find transformers package. Hugginface modules cannot be exported.", stacklevel=1)
        return real(model, config, forward_loop)

    monkeypatch.setattr(mtq, "quantize", as_at_the_first_call)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tq.quantize(net, "int8", calib, progress=False)
        warnings.warn("a warning of the caller's own after quantize", stacklevel=1)
    out = capsys.readouterr()
    assert "Inserted" not in out.out + out.err
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Cannot find" in m], messages
    assert "a warning of the caller's own after quantize" in messages  # the filter was local to the call


def test_other_output_during_quantize_still_comes_through(net, calib, capsys):
    def loop(model):
        print("user output from the forward loop")
        for x in calib:
            model(x)

    tq.quantize(net, "int8", loop, progress=False)
    out = capsys.readouterr().out
    assert "user output from the forward loop" in out
    assert "Inserted" not in out


def test_the_plain_core_refuses_a_budget_untouched(net, calib):
    """The budget search sits on top of the core (`torchopt.quantize.quantize`); the core never skips it silently."""
    before = _state(net)
    cfg = tq.QuantizeConfig(format="int8", budget={"metric": "sqnr_db", "min": 20})
    with pytest.raises(ValueError, match=r"quantize_plain takes a config without a budget"):
        quantize_plain(net, cfg, CalibData(calib), progress=False)
    _assert_same_state(net, before)
