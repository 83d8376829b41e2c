"""The compile step's ``lowp``: explicit modes refused where the device cannot run them (before calibration), the
auto choice made from paired timings against the fp16 build and recorded with its figures, fake-quant kept with
its reason on the CPU, and a deployed model validated, saved and loaded with its FP8 weights.

The CPU has no FP8/INT8 tensor cores, so `lowp_unsupported` refuses it; the end-to-end tests below let the CPU
run the modes (torch has CPU kernels for ``_scaled_mm`` and ``_int_mm``) by replacing that one capability check,
to exercise the plumbing. The choice itself is tested on constructed timings, never on this machine's speed.
"""

import pytest
import torch
import torch.nn.functional as F

import torchopt
from torchopt import InputSpec, Recipe, saving
from torchopt.profile.comparison import LatencyComparison, Speedup
from torchopt.profile.timing import LatencyResult
from torchopt.quantize.deployment import DEPLOY_ATTR
from torchopt.recipes import CastConfig, CompileConfig, QuantizeConfig, ValidateConfig, lowp

SPEC = [InputSpec("x", min=(1, 64), opt=(32, 64), max=(64, 64))]


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _model():
    torch.manual_seed(0)
    return MLP().eval()


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(32, 64, generator=g) for _ in range(4)]


def _recipe(fmt="fp8", lowp_mode="auto"):
    return Recipe(
        [
            CastConfig(dtype="float32", channels_last=False),
            QuantizeConfig(format=fmt),
            CompileConfig(backend="eager", lowp=lowp_mode),
            ValidateConfig(measure_latency=False),
        ],
        name="test-lowp",
    )


@pytest.fixture
def cpu_runs_lowp(monkeypatch):
    """Let the CPU count as a device with FP8/INT8 GEMMs (only the capability check is replaced)."""
    monkeypatch.setattr(lowp, "lowp_unsupported", lambda mode, device: None)
    monkeypatch.setattr(saving, "lowp_unsupported", lambda mode, device: None)


def _comparison(speedups: dict[str, tuple[float, float, float]]) -> LatencyComparison:
    result = LatencyResult.from_samples([1.0, 1.0], device="cpu", batch_size=None, stable=True)
    return LatencyComparison(
        baseline="fp16",
        results={"fp16": result, **{m: result for m in speedups}},
        speedups={m: Speedup(med, lo, hi, rounds=8, stable=True) for m, (med, lo, hi) in speedups.items()},
        rounds=8,
        iters_per_round=5,
    )


def test_choice_needs_the_whole_spread_above_the_margin_at_every_profile():
    both = [_comparison({"fp8": (1.6, 1.5, 1.7), "fp8_rowwise": (1.3, 1.2, 1.4)})]
    assert lowp.choose_mode(both).mode == "fp8"
    assert "fp8 measured faster than the fp16 build: profile 0: 1.60x (1.50–1.70)" in lowp.choose_mode(both).reason
    noisy = [_comparison({"fp8": (1.3, 1.02, 1.5)})]  # median clears, spread does not
    assert lowp.choose_mode(noisy).mode is None
    one_profile_slower = [_comparison({"fp8": (1.4, 1.3, 1.5)}), _comparison({"fp8": (0.9, 0.85, 0.95)})]
    choice = lowp.choose_mode(one_profile_slower)
    assert choice.mode is None
    assert "fp16 kept" in choice.reason and "profile 1: 0.90x (0.85–0.95)" in choice.reason


def test_best_mode_is_the_fastest_across_profiles():
    comparisons = [
        _comparison({"int8": (1.2, 1.1, 1.3), "int8_weight_only": (1.5, 1.4, 1.6)}),
        _comparison({"int8": (2.0, 1.9, 2.1), "int8_weight_only": (1.3, 1.2, 1.4)}),
    ]
    assert lowp.choose_mode(comparisons).mode == "int8"  # 1.2 * 2.0 > 1.5 * 1.3


def test_an_explicit_mode_on_the_cpu_is_refused_before_calibration():
    calls = []

    def calib(model):
        calls.append(1)

    with pytest.raises(ValueError, match="compile.lowp 'fp8' cannot run here: real fp8 execution needs a CUDA GPU"):
        torchopt.optimize(_model(), _recipe(lowp_mode="fp8"), inputs=SPEC, calib_data=calib, progress=False)
    assert calls == []


def test_unknown_lowp_names_the_choices():
    with pytest.raises(ValueError, match="compile.lowp.*'auto', 'off', 'fp8'.*got 'fp4'"):
        CompileConfig(lowp="fp4")


def test_auto_on_the_cpu_keeps_fake_quant_and_says_why():
    fast = torchopt.optimize(_model(), _recipe(), inputs=SPEC, calib_data=_calib(), progress=False)
    assert fast.report.precision == "fp8" and fast.report.fake_quant
    note = next(n for n in fast.report.notes if n.startswith("compile.lowp auto"))
    assert "fp8 model kept as fake-quant" in note and "needs a CUDA GPU" in note


def test_explicit_mode_runs_real_fp8_and_passes_the_accuracy_guard(cpu_runs_lowp):
    model = _model()
    fast = torchopt.optimize(model, _recipe(lowp_mode="fp8"), inputs=SPEC, calib_data=_calib(), progress=False)
    assert fast.report.precision == "fp8" and not fast.report.fake_quant
    assert "torch._scaled_mm" in fast.report.precision_reason
    assert fast.report.accuracy_passed and fast.report.tolerances["min_sqnr_db"] == 10.0  # the quantized limits
    assert getattr(fast.module, DEPLOY_ATTR).lowp_layers == ["fc1", "fc2"]
    x = torch.randn(5, 64)
    out = fast(x)
    assert out.dtype == torch.float32
    assert F.cosine_similarity(out.flatten(), model(x).flatten(), dim=0) > 0.99


def test_a_mode_of_another_format_is_refused(cpu_runs_lowp):
    with pytest.raises(ValueError, match="compile.lowp 'int8' does not apply to a model quantized to 'fp8'"):
        torchopt.optimize(_model(), _recipe(lowp_mode="int8"), inputs=SPEC, calib_data=_calib(), progress=False)


def test_auto_records_both_figures_and_its_reason(cpu_runs_lowp):
    fast = torchopt.optimize(_model(), _recipe("int8"), inputs=SPEC, calib_data=_calib(), progress=False)
    steps = {s.step: s for s in fast.report.steps}
    auto = steps["compile"].details["lowp_auto"]
    assert auto["choice"] in ("fp16", "int8", "int8_weight_only")
    assert set(auto["profiles"][0]["speedup"]) == {"int8", "int8_weight_only"}
    assert auto["weight_bytes"]["int8"] < auto["weight_bytes"]["fp16"]
    assert any(n.startswith("compile.lowp auto: ") and auto["reason"] in n for n in fast.report.notes)
    if auto["choice"] == "fp16":
        assert fast.report.precision == "float16" and "fp16 kept" in fast.report.precision_reason
    else:
        assert fast.report.precision == auto["choice"]


@pytest.mark.parametrize(("fmt", "dtype"), [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_save_and_load_keep_the_low_precision_weights(cpu_runs_lowp, tmp_path, fmt, dtype):
    recipe = _recipe(fmt, lowp_mode=fmt)
    fast = torchopt.optimize(_model(), recipe, inputs=SPEC, calib_data=_calib(), progress=False)
    fast.save(tmp_path / "m")
    assert (tmp_path / "m" / "module.pt2").is_file()  # an exported program over the profile, not a pickle
    program = torch.export.load(tmp_path / "m" / "module.pt2")
    assert program.state_dict["fc1.weight"].dtype == dtype
    loaded = torchopt.load(tmp_path / "m")
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), fast(x))


def test_a_deployed_save_is_refused_where_its_gemms_cannot_run(cpu_runs_lowp, tmp_path, monkeypatch):
    fast = torchopt.optimize(_model(), _recipe(lowp_mode="fp8"), inputs=SPEC, calib_data=_calib(), progress=False)
    fast.save(tmp_path / "m")
    monkeypatch.undo()  # the CPU is itself again: no FP8 tensor cores
    with pytest.raises(ValueError, match=r"runs real fp8 GEMMs, which cannot run on cpu: real fp8 execution needs"):
        torchopt.load(tmp_path / "m")


class NarrowHead(torch.nn.Module):
    """One Linear with 20 outputs: not a multiple of 16, so no FP8 GEMM can take it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 20)

    def forward(self, x):
        return self.fc(x)


def test_auto_keeps_fp16_when_no_layer_can_run_any_mode(cpu_runs_lowp):
    torch.manual_seed(0)
    fast = torchopt.optimize(NarrowHead().eval(), _recipe(), inputs=SPEC, calib_data=_calib(), progress=False)
    assert fast.report.precision == "float16" and not fast.report.fake_quant
    assert "no layer of this model can run fp8" in fast.report.precision_reason
    assert "not multiples of 16" in fast.report.precision_reason


class Encoder(torch.nn.Module):
    """Two pre-norm blocks of explicit Linear layers (q/k/v/o, MLP): every GEMM is one the modes can take."""

    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads = heads
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "norm1": torch.nn.LayerNorm(dim),
                    "qkv": torch.nn.Linear(dim, 3 * dim),
                    "o": torch.nn.Linear(dim, dim),
                    "norm2": torch.nn.LayerNorm(dim),
                    "fc1": torch.nn.Linear(dim, 4 * dim),
                    "fc2": torch.nn.Linear(4 * dim, dim),
                }
            )
            for _ in range(2)
        )

    def forward(self, x):
        b, t, d = x.shape
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            x = x + blk["o"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
            x = x + blk["fc2"](F.gelu(blk["fc1"](blk["norm2"](x))))
        return x


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["fp8-ptq-transformer", "int8-ptq-transformer"])
def test_on_cuda_auto_times_every_mode_against_fp16_and_keeps_what_it_reports(recipe):
    if lowp.lowp_unsupported("int8", "cuda"):
        pytest.skip(lowp.lowp_unsupported("int8", "cuda"))
    torch.manual_seed(0)
    model = Encoder().eval().cuda()
    spec = InputSpec("x", min=(1, 16, 256), opt=(32, 64, 256), max=(64, 128, 256))
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 64, 256, generator=g) for _ in range(4)]
    fast = torchopt.optimize(model, recipe, inputs=[spec], calib_data=calib, device="cuda", progress=False)
    auto = next(s for s in fast.report.steps if s.step == "compile").details.get("lowp_auto")
    if auto is None:  # this GPU runs none of the format's modes: the fake-quant model stays, with the reason
        assert fast.report.fake_quant and any("compile.lowp auto" in n for n in fast.report.notes)
        return
    assert auto["profiles"] and all(set(p["speedup"]) == set(auto["weight_bytes"]) - {"fp16"} for p in auto["profiles"])
    assert fast.report.accuracy_passed and not fast.report.fake_quant
    expected = "float16" if auto["choice"] == "fp16" else auto["choice"]
    assert fast.report.precision == expected
    x = torch.randn(4, 32, 256, device="cuda")
    assert F.cosine_similarity(fast(x).flatten(), model(x).flatten(), dim=0) > 0.99
