"""`deploy`: a calibrated ModelOpt model becomes one whose Linear GEMMs run in FP8 / INT8, computing what the
fake-quant model simulated; what cannot run in low precision stays in float with its reason; bad requests are
refused before anything is built. Runs on the CPU (torch's CPU kernels for ``_scaled_mm`` / ``_int_mm``); the
GPU-marked test checks the same on CUDA with Inductor's generated code."""

import copy

import pytest
import torch
import torch.nn.functional as F

import torchopt.quantize as tq
from torchopt.quantize.deployment import DEPLOY_ATTR, LOWP_MODES, deploy, lowp_unsupported, weight_bytes
from torchopt.quantize.lowp_linear import Fp8Linear, Int8Linear, LowpLinear


class MLP(torch.nn.Module):
    def __init__(self, hidden=128):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 32)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _calib(n=4, rows=32, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=g) for _ in range(n)]


def _quantized(fmt, model=None, **options):
    torch.manual_seed(0)
    model = (model or MLP()).eval()
    return model, tq.quantize(copy.deepcopy(model), fmt, calib_data=_calib(), progress=False, **options)


def _cosine(a, b):
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("fp8", "fp8"),
        ("fp8", "fp8_rowwise"),
        ("int8", "int8"),
        ("int8", "int8_weight_only"),
        ("int8_smoothquant", "int8"),
    ],
)
def test_deployed_model_computes_what_fake_quant_simulated(fmt, mode):
    model, qmodel = _quantized(fmt)
    x = _calib(1, rows=8, seed=5)[0]
    with torch.no_grad():
        simulated, before = qmodel(x), qmodel(x).clone()
        deployed = deploy(qmodel, mode, dtype=torch.bfloat16)
        out = deployed(x.bfloat16())
        assert torch.equal(qmodel(x), before)  # the quantized model is left as it was
        assert _cosine(out, simulated) > 0.995 and _cosine(out, model(x)) > 0.995
    layers = dict(deployed.named_modules())
    assert isinstance(layers["fc1"], LowpLinear) and layers["fc1"].mode == mode
    record = getattr(deployed, DEPLOY_ATTR)
    assert record.mode == mode and record.lowp_layers == ["fc1", "fc2"] and record.float_layers == {}
    assert not any("quantizer" in name for name, _ in deployed.named_modules())  # no ModelOpt module left
    assert tq.detect_format(deployed) is None and not hasattr(deployed, "torchopt_quant")


def test_fp8_weights_take_half_the_bytes_of_fp16():
    model, qmodel = _quantized("fp8", MLP(hidden=512))
    deployed = deploy(qmodel, "fp8", dtype=torch.float16)
    assert deployed.fc1.weight.dtype == torch.float8_e4m3fn
    ratio = weight_bytes(deployed) / weight_bytes(copy.deepcopy(model).half())
    assert ratio <= 0.55, ratio  # issue 15's bound: FP8 weight memory <= 0.55x fp16


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 64)
        self.odd = torch.nn.Linear(64, 20)  # 20 is not a multiple of 16

    def forward(self, x):
        return self.odd(self.fc(self.conv(x).mean((2, 3))))


def test_what_cannot_run_in_low_precision_stays_in_float_with_its_reason():
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    torch.manual_seed(0)
    qmodel = tq.quantize(ConvNet().eval(), "fp8", calib_data=calib, progress=False)
    deployed = deploy(qmodel, "fp8")
    record = getattr(deployed, DEPLOY_ATTR)
    assert record.lowp_layers == ["fc"]
    assert "no FP8/INT8 kernel" in record.float_layers["conv"] and "Conv2d" in record.float_layers["conv"]
    assert "not multiples of 16" in record.float_layers["odd"]
    assert type(deployed.conv) is torch.nn.Conv2d and deployed.conv.weight.dtype == torch.float16
    with torch.no_grad():
        assert deployed(calib[0].half()).shape == (8, 20)


class ConvStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(*(torch.nn.Conv2d(3, 3, 3, padding=1) for _ in range(5)))
        self.head = torch.nn.Linear(3, 10)  # 3x10: not multiples of 16

    def forward(self, x):
        return self.head(self.convs(x).mean((2, 3)))


def test_a_model_with_no_runnable_layer_is_refused_with_one_line_per_reason():
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    qmodel = tq.quantize(ConvStack().eval(), "fp8", calib_data=calib, progress=False)
    with pytest.raises(ValueError, match="no layer of this model can run fp8") as err:
        deploy(qmodel, "fp8")
    message = str(err.value)
    assert message.count("PyTorch has no FP8/INT8 kernel") == 1
    assert "convs.0, convs.1, convs.2 and 2 more: Conv2d" in message
    assert "head: in/out features 3x10 are not multiples of 16" in message


class _Attn(torch.nn.Module):
    def __init__(self, **mha):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True, **mha)
        self.fc = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def _attn_calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 8, 64, generator=g) for _ in range(2)]


def test_multihead_attention_projections_run_in_fp8():
    """The quantize step rewrote the attention (torchopt.quantize.attention): both projections are deployed."""
    calib = _attn_calib()
    torch.manual_seed(0)
    model = _Attn().eval()
    qmodel = tq.quantize(copy.deepcopy(model), "fp8", calib_data=calib, progress=False)
    deployed = deploy(qmodel, "fp8", dtype=torch.bfloat16)
    assert all(isinstance(m, Fp8Linear) for m in (deployed.fc, deployed.attn.in_proj, deployed.attn.out_proj))
    assert not getattr(deployed, DEPLOY_ATTR).float_layers
    with torch.no_grad():
        assert _cosine(deployed(calib[0].bfloat16()).float(), model(calib[0])) > 0.99


def test_an_attention_left_as_multihead_attention_keeps_its_out_proj_in_float():
    calib = _attn_calib()
    torch.manual_seed(0)
    qmodel = tq.quantize(_Attn(add_bias_kv=True).eval(), "fp8", calib_data=calib, progress=False)
    deployed = deploy(qmodel, "fp8", dtype=torch.bfloat16)
    assert isinstance(deployed.fc, Fp8Linear)
    assert type(deployed.attn.out_proj) is not Fp8Linear
    assert "reads the weight directly" in getattr(deployed, DEPLOY_ATTR).float_layers["attn.out_proj"]
    with torch.no_grad():
        deployed(calib[0].bfloat16())


def test_a_layer_kept_in_fp32_stays_fp32():
    model, qmodel = _quantized("int8", keep=[{"pattern": "fc2", "precision": "fp32"}])
    deployed = deploy(qmodel, "int8")
    assert isinstance(deployed.fc1, Int8Linear) and deployed.fc2.weight.dtype == torch.float32
    x = _calib(1, rows=4, seed=2)[0]
    with torch.no_grad():
        assert deployed(x.half()).dtype == torch.float16  # the kept layer's hooks cast back to the caller's dtype
        assert _cosine(deployed(x.half()), model(x)) > 0.995


def test_a_model_that_is_one_linear_becomes_the_layer():
    torch.manual_seed(0)
    qmodel = tq.quantize(torch.nn.Linear(64, 32).eval(), "int8", calib_data=_calib(), progress=False)
    assert isinstance(deploy(qmodel, "int8"), Int8Linear)


def test_requests_deploy_cannot_do_are_refused_before_anything_is_built():
    with pytest.raises(ValueError, match=r"quantized by torchopt.quantize.quantize.*MLP"):
        deploy(MLP(), "fp8")
    _, qmodel = _quantized("int8")
    with pytest.raises(ValueError, match=r"mode \(for format 'int8'\).*'int8', 'int8_weight_only'.*got 'fp8'"):
        deploy(qmodel, "fp8")
    with pytest.raises(ValueError, match="dtype.*'float16', 'bfloat16'.*got 'float32'"):
        deploy(qmodel, "int8", dtype=torch.float32)
    with pytest.raises(TypeError, match="qmodel"):
        deploy("model.pt", "int8")


def test_int4_awq_runs_through_the_int4_kernel():
    model, qmodel = _quantized("int4_awq", MLP(hidden=256))  # fc1 takes 64 inputs: less than one 128 block
    deployed = deploy(qmodel, "int4_weight_only", dtype=torch.bfloat16)
    record = getattr(deployed, DEPLOY_ATTR)
    assert record.lowp_layers == ["fc2"] and "not a whole number of int4 blocks (128)" in record.float_layers["fc1"]
    assert deployed.fc2.weight.dtype == torch.uint8  # packed codes: a quarter of fp16's bytes, plus block scales
    assert deployed.fc2.weight_bytes() < 0.3 * 256 * 32 * 2
    h = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _cosine(deployed.fc2(h.bfloat16()), qmodel.fc2(h)) > 0.999  # the layer computes what was simulated
        x = _calib(1, rows=8, seed=5)[0]
        assert _cosine(deployed(x.bfloat16()), model(x)) > 0.99


def test_nvfp4_has_no_real_execution_yet():
    _, qmodel = _quantized("int8")
    qmodel.torchopt_quant.format = "nvfp4"  # the record is all deploy reads to pick the modes
    with pytest.raises(ValueError, match="'nvfp4' has no real low-precision execution"):
        deploy(qmodel, "fp8")


def test_unsupported_devices_are_named_with_the_reason():
    why = lowp_unsupported("fp8", "cpu")
    assert "needs a CUDA GPU" in why and "8.9+" in why and "fake-quant" in why
    assert "8.0+" in lowp_unsupported("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="mode.*'fp8', 'fp8_rowwise', 'int8', 'int8_weight_only', 'int4_we.*got 'fp4'"):
        lowp_unsupported("fp4", "cpu")
    assert set(LOWP_MODES) == {m for f in tq.FORMATS.values() for m in f.lowp_modes}


def test_a_gpu_generation_without_the_tensor_cores_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert lowp_unsupported("fp8", "cuda") == "fp8 needs compute capability 8.9+; NVIDIA A100-SXM4-80GB is sm_80"
    assert "9.0+" in lowp_unsupported("fp8_rowwise", "cuda:0")
    assert lowp_unsupported("int8", "cuda") is None and lowp_unsupported("int8_weight_only", "cuda") is None


@pytest.mark.gpu
def test_on_cuda_the_gemms_run_natively_and_inductor_fuses_the_quantize():
    from torch._inductor.utils import run_and_get_code

    if lowp_unsupported("fp8", "cuda"):
        pytest.skip(lowp_unsupported("fp8", "cuda"))
    model, qmodel = _quantized("fp8", MLP(hidden=512))
    deployed = deploy(qmodel, "fp8").cuda()
    x = _calib(1, rows=64, seed=5)[0].cuda().half()
    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(deployed), x)
        assert _cosine(out, model.cuda()(x.float())) > 0.995
    code = "\n".join(codes)
    assert "_scaled_mm" in code
    # GELU and the FP8 quantize of its output in one Triton kernel: the activation is written once, as FP8.
    assert any("gelu" in line and "triton" in line for line in code.splitlines() if "def triton_" in line) or (
        "float8_e4m3fn" in code and "erf" in code
    )
    int8 = deploy(_quantized("int8")[1], "int8").cuda()
    with torch.no_grad():
        assert int8(x[:3, :64]).shape == (3, 32)  # fewer rows than _int_mm takes: padded
