"""The low-precision Linear layers against their eager reference (quantize, GEMM in float on the codes, rescale),
their storage, export and save, and Inductor's fusion of the quantize into the op before it.

These run on the CPU, where torch 2.13 has ``torch._scaled_mm`` (FP8) and ``torch._int_mm`` kernels: the math is
the layers', the speed is not measured here (benchmarks/bench_lowp.py, on a GPU).
"""

import io

import pytest
import torch
import torch.nn.functional as F

from torchopt.quantize.lowp_linear import (
    FP8_MAX,
    INT_MM_MIN_ROWS,
    Fp8Linear,
    Fp8RowwiseLinear,
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8WeightOnlyLinear,
    quant_fp8,
    quant_int4,
    quant_int8,
)

K, N = 64, 48


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(K, N)


def _x(rows=8, dtype=torch.bfloat16, seed=1):
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _w_amax(linear, per_channel):
    w = linear.weight.detach().abs()
    return w.amax(dim=1, keepdim=True) if per_channel else w.amax()


def test_fp8_layer_is_the_gemm_of_its_codes(linear):
    x = _x()
    layer = Fp8Linear(linear.weight, linear.bias, _w_amax(linear, False), torch.tensor(3.0))
    assert layer.weight.dtype == torch.float8_e4m3fn
    w = layer.weight.float() * layer.weight_scale
    xd = quant_fp8(x, layer.input_scale).float() * layer.input_scale
    expected = xd @ w.t() + linear.bias
    torch.testing.assert_close(layer(x).float(), expected, rtol=1e-2, atol=1e-2)
    assert layer(x).dtype == torch.bfloat16


def _scaled_mm_calls(layer, x):
    """The exported graph's `_scaled_mm` calls, each as {argument: value} with the schema's defaults filled in,
    and the targets of all its calls."""
    graph = torch.export.export(layer, (x,)).graph
    calls = [n for n in graph.nodes if n.op == "call_function"]
    gemms = [n for n in calls if n.target == torch.ops.aten._scaled_mm.default]
    schema = torch.ops.aten._scaled_mm.default._schema.arguments
    named = [{a.name: n.args[i] if i < len(n.args) else a.default_value for i, a in enumerate(schema)} for n in gemms]
    return named, [n.target for n in calls]


def _fp8(linear, bias_dtype):
    return Fp8Linear(linear.weight, linear.bias.to(bias_dtype), _w_amax(linear, False), torch.tensor(3.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_bias_of_a_16_bit_output_is_added_by_the_gemm(linear, dtype):
    """No add after the GEMM: the bias goes to `_scaled_mm`'s epilogue, and the sum is the same."""
    layer, x = _fp8(linear, dtype), _x(dtype=dtype)
    (gemm,), targets = _scaled_mm_calls(layer, x)
    assert gemm["bias"] is not None and torch.ops.aten.add.Tensor not in targets
    unbiased = Fp8Linear(linear.weight, None, _w_amax(linear, False), torch.tensor(3.0))
    torch.testing.assert_close(layer(x), unbiased(x) + linear.bias.to(dtype), rtol=1e-2, atol=1e-2)


def test_fp8_bias_of_a_float32_output_is_added_after_the_gemm(linear):
    """CUDA's `_scaled_mm` refuses a bias with a float32 output, so the layer adds it itself."""
    (gemm,), targets = _scaled_mm_calls(_fp8(linear, torch.float32), _x(dtype=torch.float32))
    assert gemm["bias"] is None and torch.ops.aten.add.Tensor in targets


@pytest.mark.parametrize("fast", [False, True])
def test_fp8_fast_accum_reaches_the_gemm(linear, fast):
    layer = _fp8(linear, torch.float16)
    layer.fast_accum = fast
    (gemm,), _ = _scaled_mm_calls(layer, _x(dtype=torch.float16))
    assert gemm["use_fast_accum"] is fast


def test_fp8_input_above_its_amax_saturates_instead_of_nan():
    codes = quant_fp8(torch.tensor([1e6, -1e6, 1.0]), torch.tensor(1.0))
    assert codes.float().tolist() == [FP8_MAX, -FP8_MAX, 1.0]


def test_fp8_rowwise_scales_each_row_to_its_own_max(linear):
    x = _x()
    x[0] *= 1000  # an outlier row does not coarsen the others
    layer = Fp8RowwiseLinear(linear.weight, linear.bias)
    assert layer.weight_scale.shape == (1, N)
    out = layer(x).float()
    ref = F.linear(x.float(), linear.weight.detach(), linear.bias.detach())
    for row in range(1, 8):
        assert F.cosine_similarity(out[row], ref[row], dim=0) > 0.995


def test_int8_layer_accumulates_exactly_in_int32(linear):
    x = _x(rows=32, dtype=torch.float16)
    layer = Int8Linear(linear.weight, linear.bias, _w_amax(linear, True), x.float().abs().amax())
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.shape == (N,)
    xq = quant_int8(x, layer.input_scale, narrow_range=False)
    acc = xq.int() @ layer.weight.int().t()  # exact integer GEMM
    expected = (acc.float() * layer.input_scale * layer.weight_scale).half().float() + linear.bias
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rows", [1, 5, INT_MM_MIN_ROWS - 1])
def test_int8_few_rows_are_padded_for_the_gemm_and_cut_back(linear, rows):
    x = _x(rows=INT_MM_MIN_ROWS + 3, dtype=torch.float16)
    layer = Int8Linear(linear.weight, linear.bias, _w_amax(linear, True), x.float().abs().amax())
    full = layer(x)
    assert layer(x[:rows]).shape == (rows, N)
    torch.testing.assert_close(layer(x[:rows]), full[:rows])


def test_int8_weight_only_keeps_activations_in_float(linear):
    x = _x(dtype=torch.float16)
    layer = Int8WeightOnlyLinear(linear.weight, linear.bias, _w_amax(linear, True))
    w = layer.weight.float() * layer.weight_scale[:, None]
    torch.testing.assert_close(layer(x).float(), x.float() @ w.t() + linear.bias, rtol=1e-2, atol=1e-2)


def test_smoothquant_pre_scale_multiplies_the_input_before_quantizing(linear):
    x = _x(dtype=torch.float16)
    scale = torch.linspace(0.5, 2.0, K)
    layer = Int8WeightOnlyLinear(linear.weight, linear.bias, _w_amax(linear, True), pre_scale=scale)
    plain = Int8WeightOnlyLinear(linear.weight, linear.bias, _w_amax(linear, True))
    torch.testing.assert_close(layer(x), plain((x.float() * scale).half()), rtol=1e-2, atol=4e-3)


def test_leading_dims_are_kept(linear):
    x = torch.randn(2, 7, K).half()
    layer = Fp8Linear(linear.weight, linear.bias, _w_amax(linear, False), torch.tensor(4.0))
    assert layer(x).shape == (2, 7, N)


def test_an_all_zero_channel_gets_no_nan():
    weight = torch.randn(N, K)
    weight[0] = 0
    layer = Int8Linear(weight, None, weight.abs().amax(dim=1, keepdim=True), torch.tensor(0.0))
    assert torch.isfinite(layer(_x(dtype=torch.float16))).all()


def test_weight_bytes_are_a_quarter_of_float32(linear):
    fp8 = Fp8Linear(linear.weight, linear.bias, _w_amax(linear, False), torch.tensor(1.0))
    int8 = Int8Linear(linear.weight, linear.bias, _w_amax(linear, True), torch.tensor(1.0))
    assert fp8.weight_bytes() == N * K + 2 * 4  # codes + two float32 scales
    assert int8.weight_bytes() == N * K + N * 4 + 4


def test_exports_and_saves_with_fp8_weights(linear):
    layer = Fp8Linear(linear.weight, linear.bias.half(), _w_amax(linear, False), torch.tensor(3.0))
    x = _x(dtype=torch.float16)
    program = torch.export.export(layer, (x,))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert loaded.state_dict["weight"].dtype == torch.float8_e4m3fn
    torch.testing.assert_close(loaded.module()(x), layer(x))


def _every_layer(linear):
    amax_t, amax_c = _w_amax(linear, False), _w_amax(linear, True)
    wide = torch.nn.Linear(256, N)
    return {
        "fp8": Fp8Linear(linear.weight, linear.bias, amax_t, torch.tensor(3.0)),
        "fp8_rowwise": Fp8RowwiseLinear(linear.weight, linear.bias),
        "int8": Int8Linear(linear.weight, linear.bias, amax_c, torch.tensor(3.0)),
        "int8_weight_only": Int8WeightOnlyLinear(linear.weight, linear.bias, amax_c),
        "int4_weight_only": Int4WeightOnlyLinear(
            wide.weight, wide.bias, wide.weight.detach().reshape(N, 2, 128).abs().amax(-1), block=128
        ),
    }


@pytest.mark.parametrize("mode", ["fp8", "fp8_rowwise", "int8", "int8_weight_only", "int4_weight_only"])
def test_every_layer_exports_with_a_dynamic_batch(linear, mode):
    """One program over batch 1..64 (the int8 layer pads small calls without a branch on the row count)."""
    layer = _every_layer(linear)[mode]
    x = torch.randn(8, layer.in_features).half()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    for rows in (1, 5, 17, 64):
        x = torch.randn(rows, layer.in_features).half()
        torch.testing.assert_close(program.module()(x), layer(x))


def _compiled_code(model, x):
    """Inductor's generated code for `model` on `x`, after checking the compiled output against eager."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model), x)
        torch.testing.assert_close(out, model(x), rtol=1e-2, atol=1e-2)
    return "\n".join(codes)


class _GeluThenFp8(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.fp8 = Fp8Linear(linear.weight, linear.bias.half(), _w_amax(linear, False), torch.tensor(3.0))

    def forward(self, x):
        return self.fp8(F.gelu(x))


def test_inductor_fuses_the_quantize_into_the_op_before_it(linear):
    """The generated code has one kernel that computes GELU and writes FP8 codes: no separate quantize pass."""
    code = _compiled_code(_GeluThenFp8(linear).eval(), _x(rows=16, dtype=torch.float16))
    kernels = [line for line in code.splitlines() if "cpp_fused" in line and "def " not in line]
    fused = [k for k in kernels if "gelu" in k and ("clamp" in k or "_to_copy" in k)]
    assert fused, f"no kernel fuses gelu with the FP8 quantize: {kernels}"
    assert "_scaled_mm" in code


def test_int4_layer_is_the_gemm_of_its_block_codes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, N)
    blocks = linear.weight.detach().reshape(N, 2, 128).abs().amax(-1)  # [out, blocks]
    layer = Int4WeightOnlyLinear(linear.weight, linear.bias, blocks, block=128)
    scale = blocks / 7
    codes = quant_int4(linear.weight.detach(), scale, 128)
    assert codes.min() >= 0 and codes.max() <= 15
    w = ((codes.float() - 8).reshape(N, 2, 128) * scale[..., None]).reshape(N, 256)
    x = torch.randn(4, 256)
    torch.testing.assert_close(layer(x), x @ w.t() + linear.bias, rtol=2e-2, atol=2e-2)  # bfloat16 activations
    assert layer(x).dtype == torch.float32 and layer(x[None]).shape == (1, 4, N)


class _GeluInt8Gelu(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.int8 = Int8Linear(linear.weight, linear.bias.half(), _w_amax(linear, True), torch.tensor(3.0))

    def forward(self, x):
        return F.gelu(self.int8(F.gelu(x)))


def test_inductor_fuses_int8_quantize_before_and_rescale_after_the_gemm(linear):
    """Two kernels around ``_int_mm``: GELU + quantize before it, rescale + bias + GELU after it."""
    code = _compiled_code(_GeluInt8Gelu(linear).eval(), _x(rows=32, dtype=torch.float16))
    calls = [line.strip() for line in code.splitlines() if line.strip().startswith("cpp_fused") and "=" not in line]
    assert len(calls) == 2, calls
    before, after = calls
    assert all(op in before for op in ("gelu", "round", "clamp")), before  # quantize fused with the op before
    assert all(op in after for op in ("mul", "add", "gelu")), after  # rescale + bias fused with the op after
    assert "_int_mm" in code
