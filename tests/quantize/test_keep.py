"""Layer-precision overrides: glob patterns, module types, precisions, errors naming nearby modules."""

import copy
import pickle

import pytest
import torch

import torchopt.quantize as tq
from torchopt.config import DTYPES, parse_dtype
from torchopt.quantize.config import Budget
from torchopt.quantize.keep import KEEP_PRECISIONS, KeepRule, resolve_keep


def _status(model):
    return {r["module"]: r for r in tq.summary(model).rows}


@pytest.mark.parametrize(
    ("rule", "kept"),
    [
        ("conv1", ["conv1"]),
        ("conv?", ["conv1", "conv2"]),
        ("*head*", ["head"]),
        ({"module_type": "Linear"}, ["fc1", "head"]),
        ({"module_type": "nn.Conv2d"}, ["conv1", "conv2"]),
        ({"module_type": "torch.nn.Conv2d"}, ["conv1", "conv2"]),
        (torch.nn.Linear, ["fc1", "head"]),
    ],
)
def test_keep_selects_modules(cnn, digits, rule, kept):
    q = tq.quantize(cnn, "int8", digits.calib(2), keep=[rule], progress=False)
    rows = _status(q)
    assert sorted(n for n, r in rows.items() if r["status"] == "kept") == kept
    for name in kept:
        assert rows[name]["weight"] == "off" and rows[name]["input"] == "off"
    assert all(r["status"] == "quantized" for n, r in rows.items() if n not in kept)


def test_kept_module_outputs_match_the_float_layer(cnn, digits):
    """A kept layer is exactly the float layer: with everything but the head kept, only the head's Q/DQ acts."""
    ref = copy.deepcopy(cnn)
    q = tq.quantize(cnn, "int8", digits.calib(2), keep=["conv1", "conv2", "fc1"], progress=False)
    x = digits.x_test[:16]
    with torch.no_grad():
        torch.testing.assert_close(q.conv1(x), ref.conv1(x), rtol=0, atol=0)
        assert not torch.equal(q(x), ref(x))  # the head is still quantized


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_precision_casts_the_kept_module(cnn, digits, precision, dtype):
    ref = copy.deepcopy(cnn)
    q = tq.quantize(cnn, "int8", digits.calib(2), keep=[{"pattern": "conv1", "precision": precision}], progress=False)
    assert q.conv1.weight.dtype == dtype and q.conv2.weight.dtype == torch.float32
    x = digits.x_test[:32]
    with torch.no_grad():
        out = q.conv1(x)
        assert out.dtype == torch.float32  # cast back for the caller
        expected = ref.conv1.to(dtype)(x.to(dtype)).float()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert q(x).dtype == torch.float32
    assert _status(q)["conv1"]["precision"] == precision
    # the hooks are picklable objects (not closures): a float model carrying them still pickles, and the
    # quantized one deep-copies (ModelOpt's dynamic classes themselves do not pickle)
    hooks = [*q.conv1._forward_pre_hooks.values(), *q.conv1._forward_hooks.values()]
    assert len(pickle.loads(pickle.dumps(hooks))) == 2
    copy.deepcopy(q)


def test_nested_rules_later_precision_wins_inside(cnn, digits):
    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.body = inner
            self.out = torch.nn.Linear(10, 10)

        def forward(self, x):
            return self.out(self.body(x))

    model = Wrap(cnn)
    q = tq.quantize(
        model,
        "int8",
        digits.calib(2),
        keep=[{"pattern": "body", "precision": "fp32"}, {"pattern": "body.conv1", "precision": "bf16"}],
        progress=False,
    )
    assert q.body.conv1.weight.dtype == torch.bfloat16 and q.body.fc1.weight.dtype == torch.float32
    rows = _status(q)
    assert rows["out"]["status"] == "quantized"
    assert rows["body.fc1"]["why"] == "inside kept module 'body'"
    assert "keep[1]" in rows["body.conv1"]["why"]


@pytest.mark.parametrize(
    ("rule", "match"),
    [
        (
            "conv3",
            r"keep\[0\]: pattern 'conv3' matches no module of the model; nearby module names: \['conv2', 'conv1'\]",
        ),
        ("*haed*", r"pattern '\*haed\*' matches no module.*nearby module names: \['head'\]"),
        (
            {"module_type": "LayerNorm"},
            r"module_type 'LayerNorm' matches no module.*module types: \['Conv2d', 'DigitsCNN'",
        ),
        ({"module_type": "Conv2D"}, r"did you mean 'Conv2d'\?"),
    ],
)
def test_pattern_matching_nothing_names_nearby_modules(cnn, digits, rule, match):
    with pytest.raises(ValueError, match=match):
        tq.quantize(cnn, "int8", digits.calib(1), keep=[rule], progress=False)
    assert tq.detect_format(cnn) is None


def test_keeping_everything_is_an_error(cnn, digits):
    with pytest.raises(ValueError, match=r"keep selects every quantizable layer"):
        tq.quantize(cnn, "int8", digits.calib(1), keep=["*"], progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"pattern": "a", "module_type": "Linear"},
            ValueError,
            r"takes one of 'pattern'.*got 2: pattern='a', module_type='Linear'",
        ),
        ({"pattern": ""}, ValueError, r"keep.pattern must not be empty"),
        ({"pattern": 3}, TypeError, r"keep.pattern must be a glob on module names"),
        ({"pattern": "a", "precision": "int4"}, ValueError, r"keep.precision must be one of \['auto', 'fp32'"),
        ({"pattern": "a", "precision": "float64"}, ValueError, r"keep.precision must be one of \['auto', 'fp32'"),
        ({"pattern": "a", "precision": torch.float16}, TypeError, r"keep.precision must be str"),
    ],
)
def test_bad_keep_rules(kwargs, error, match):
    with pytest.raises(error, match=match):
        KeepRule(**kwargs)


def test_rule_selecting_nothing_is_refused(cnn):
    with pytest.raises(ValueError, match=r"quantize.keep\[0\] needs 'pattern' \(glob on module names.*got none"):
        tq.QuantizeConfig(keep=[{"precision": "fp16"}])
    with pytest.raises(ValueError, match=r"keep\[0\] needs 'pattern'"):
        resolve_keep(cnn, [KeepRule()])


def test_optional_rule_may_select_nothing(cnn):
    """The built-in transformer recipes' rules are optional: a pooler pattern on a CNN is no error, while the same
    rule without `optional` still names the nearest modules; an optional rule that matches still keeps."""
    rules = [KeepRule(pattern="*pooler*", optional=True), KeepRule(module_type="LayerNorm", optional=True)]
    assert resolve_keep(cnn, [*rules, KeepRule(pattern="head", optional=True)]).keys() == {"head"}
    with pytest.raises(ValueError, match=r"keep\[0\]: pattern '\*pooler\*' matches no module"):
        resolve_keep(cnn, [KeepRule(pattern="*pooler*")])
    with pytest.raises(TypeError, match=r"keep.optional must be bool, got str 'yes'"):
        KeepRule(pattern="head", optional="yes")


def test_resolve_keep_aliases_and_descendants(cnn):
    kept = resolve_keep(cnn, [KeepRule(pattern="fc*", precision="float16")])
    assert {n: k.precision for n, k in kept.items()} == {"fc1": "fp16"}


# Every name torchopt.config's dtype vocabulary has for a float dtype (what a cast step's `dtype` takes).
FLOAT_DTYPE_NAMES = ["float32", "float", "fp32", "float16", "half", "fp16", "bfloat16", "bf16"]


@pytest.mark.parametrize("name", FLOAT_DTYPE_NAMES)
def test_keep_precision_takes_every_name_the_cast_step_takes(name):
    stored = KeepRule(pattern="a", precision=name).precision
    assert stored in ("fp32", "fp16", "bf16")  # one stored spelling per dtype (config, summary, cache key)
    assert KEEP_PRECISIONS[stored] == DTYPES[parse_dtype("dtype", name)]
    assert Budget(precision=name).precision == stored


def test_reads_input_keeps_the_layer_that_reads_the_image(cnn, digits):
    q = tq.quantize(cnn, "fp8", digits.calib(2), keep=[{"reads_input": True, "reason": "stem"}], progress=False)
    rows = _status(q)
    assert [n for n, r in rows.items() if r["status"] == "kept"] == ["conv1"]
    assert q.torchopt_quant.kept["conv1"]["why"] == "stem"
    assert all(r["status"] == "quantized" for n, r in rows.items() if n != "conv1")


class TwoInputs(torch.nn.Module):
    """Reads `image` through a normalization first, `extra` directly: only `extra`'s layer reads an input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.side = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, image, extra):
        features = self.conv((image - 0.5) * 2).mean((2, 3))
        return self.head(torch.cat([features, self.side(extra)], 1))


def _two_input_batches(n=2):
    torch.manual_seed(0)
    return [(torch.rand(4, 1, 8, 8), torch.randn(4, 3)) for _ in range(n)]


def test_reads_input_sees_the_tensor_itself_not_a_derived_one():
    q = tq.quantize(TwoInputs(), "int8", _two_input_batches(), keep=[{"reads_input": True}], progress=False)
    assert [n for n, r in _status(q).items() if r["status"] == "kept"] == ["side"]
    assert "keep rule reads_input (keep[0])" in q.torchopt_quant.kept["side"]["why"]


def test_reads_input_that_selects_nothing_is_refused_or_skipped_when_optional():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))  # Flatten (no weight) reads the input
    batches = [torch.randn(4, 3, 4)]
    with pytest.raises(ValueError, match=r"keep\[0\]: reads_input selects no layer: no module with weights"):
        tq.quantize(copy.deepcopy(model), "int8", batches, keep=[{"reads_input": True}], progress=False)
    q = tq.quantize(model, "int8", batches, keep=[{"reads_input": True, "optional": True}], progress=False)
    assert not q.torchopt_quant.kept


def test_reads_input_needs_calibration_it_can_run(cnn, digits):
    batches = digits.calib(2)

    def calibrate(model):
        for x in batches:
            model(x if isinstance(x, torch.Tensor) else x[0])

    with pytest.raises(ValueError, match=r"reads_input needs a calibration batch .* calib_data is a callable"):
        tq.quantize(cnn, "int8", calibrate, keep=[{"reads_input": True}], progress=False)
    assert tq.detect_format(cnn) is None  # left as it was


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reads_input": "yes"}, TypeError, r"keep.reads_input must be bool, got str 'yes'"),
        ({"reads_input": True, "pattern": "a"}, ValueError, r"got 2: pattern='a', reads_input=True"),
    ],
)
def test_bad_reads_input_rules(kwargs, error, match):
    with pytest.raises(error, match=match):
        KeepRule(**kwargs)
