"""The recipe step `quantize`: YAML, the handler's context outputs, optimize() end to end, cache and errors.

The trained digits CNN comes from tests/conftest.py; like the quantize module's tests, these run single-threaded.
"""

import copy
import textwrap

import pytest
import torch

import torchopt
import torchopt.quantize as tq
from torchopt import InputSpec, Recipe
from torchopt.recipe import StepContext, get_handler
from torchopt.recipes import CastConfig, CompileConfig, QuantizeConfig, ValidateConfig
from torchopt.report import OptimizeReport

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = [InputSpec("x", min=(1, 1, 8, 8), opt=(64, 1, 8, 8), max=(256, 1, 8, 8))]
ISSUE_YAML = """
name: int8-entropy
steps:
  - cast: {dtype: float32}
  - quantize: {format: int8, method: entropy, entropy_stride: 16,
               keep: [{pattern: "conv1", precision: fp16}, {pattern: "*head*", precision: fp32}]}
  - compile: {backend: eager}
  - validate: {measure_latency: false}
"""


def _recipe(**quant):
    return Recipe(
        [
            CastConfig(dtype="float32", channels_last=False),
            QuantizeConfig(**quant),
            CompileConfig(backend="eager"),
            ValidateConfig(measure_latency=False),
        ],
        name="test-quant",
    )


def test_issue_yaml_parses_and_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(ISSUE_YAML)
    recipe = Recipe.from_yaml(path)
    step = recipe.step("quantize")
    assert isinstance(step, tq.QuantizeConfig) and step is recipe.steps[1]
    assert (step.format, step.method) == ("int8", "entropy")
    assert [(k.pattern, k.precision) for k in step.keep] == [("conv1", "fp16"), ("*head*", "fp32")]
    again = tmp_path / "again.yaml"
    recipe.to_yaml(again)
    assert Recipe.from_yaml(again).to_dict() == recipe.to_dict()


def test_yaml_errors_name_the_place(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps:\n  - quantize: {format: int8, methd: max}\n")
    with pytest.raises(ValueError, match=r"unknown key 'methd' in recipe file bad.yaml.steps\[0\].quantize.*'method'"):
        Recipe.from_yaml(path)
    path.write_text("steps:\n  - quantize: {format: fp8, method: entropy}\n")
    with pytest.raises(ValueError, match=r"'entropy' does not apply to format 'fp8'"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize(("name", "fmt"), [("int8-ptq", "int8"), ("fp8-ptq", "fp8")])
def test_builtin_recipes(name, fmt):
    recipe = torchopt.recipes.get(name)
    step = recipe.step("quantize")
    assert step.format == fmt and step.method == "max"
    assert [s.step for s in recipe.steps] == ["cast", "quantize", "compile", "validate"]


def test_handler_sets_the_context(cnn, digits):
    report = OptimizeReport(recipe="t", device="cpu")
    ctx = StepContext(
        model=cnn,
        reference=copy.deepcopy(cnn),
        profiles=[SPEC],
        device=torch.device("cpu"),
        calib_data=digits.calib(3),
        report=report,
        progress=False,
    )
    cfg = QuantizeConfig(format="int8", keep=["head"])
    get_handler(cfg)(cfg, ctx)
    assert ctx.quantized and report.precision == "int8" and "max calibration" in report.precision_reason
    assert ctx.calib_fingerprint == ctx.model.torchopt_quant.calib_fingerprint
    assert ctx.runtime.calib_fingerprint == ctx.calib_fingerprint and ctx.details["format"] == "int8"
    assert ctx.details["counts"] == {"quantized": 3, "kept": 1} and ctx.details["calib_batches"] == 3
    assert "head" in ctx.details["kept"] and any("kept 1 modules" in n for n in report.notes)


def test_handler_drops_labels_from_tuple_batches(cnn, digits):
    """(x, y) batches: the step feeds as many leading items as the recipe has inputs."""
    batches = [(x, digits.y_train[: len(x)]) for x in digits.calib(2)]
    ctx = StepContext(
        model=cnn,
        reference=copy.deepcopy(cnn),
        profiles=[SPEC],
        device=torch.device("cpu"),
        calib_data=batches,
        report=OptimizeReport(recipe="t", device="cpu"),
        progress=False,
    )
    cfg = QuantizeConfig()
    get_handler(cfg)(cfg, ctx)
    assert ctx.details["calib_batches"] == 2


def test_optimize_end_to_end_matches_the_python_api(cnn, digits):
    ref = copy.deepcopy(cnn)
    fast = torchopt.optimize(cnn, _recipe(format="int8"), inputs=SPEC, calib_data=digits.calib(4), progress=False)
    rep = fast.report
    assert rep.precision == "int8" and rep.accuracy_passed and rep.accuracy["sqnr_db"] > 30
    step = next(s for s in rep.steps if s.step == "quantize")
    assert step.details["format"] == "int8" and step.details["calib_fingerprint"]
    direct = tq.quantize(copy.deepcopy(ref), "int8", digits.calib(4), progress=False)
    x = digits.x_test[:100]
    with torch.no_grad():
        assert torch.equal(fast(x), direct(x))
    assert tq.detect_format(cnn) is None  # optimize works on a copy


def test_optimize_with_the_issue_yaml(cnn, digits, tmp_path, acc):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(ISSUE_YAML))
    fast = torchopt.optimize(cnn, path, inputs=SPEC, calib_data=digits.calib(4), progress=False)
    details = next(s for s in fast.report.steps if s.step == "quantize").details
    assert set(details["kept"]) == {"conv1", "head"} and details["method"] == "entropy"
    assert fast.module.conv1.weight.dtype == torch.float16
    x, y = digits.x_test[:256], digits.y_test[:256]  # the profile's max batch
    assert acc(fast, x, y) >= acc(cnn, x, y) - 0.01


def test_recipe_cache_dir_restores_on_rebuild(cnn, digits, tmp_path):
    recipe = _recipe(format="int8", method="percentile", cache_dir=str(tmp_path))
    first = torchopt.optimize(cnn, recipe, inputs=SPEC, calib_data=digits.calib(4), progress=False)
    second = torchopt.optimize(cnn, recipe, inputs=SPEC, calib_data=digits.calib(4), progress=False)
    cache = [next(s for s in f.report.steps if s.step == "quantize").details["cache"] for f in (first, second)]
    assert cache[0].startswith("miss") and cache[1].startswith("hit")
    assert any("restored from the cache" in n for n in second.report.notes)
    with torch.no_grad():
        assert torch.equal(first(digits.x_test[:50]), second(digits.x_test[:50]))


def test_recipe_budget_keeps_the_sensitive_layer(cnn, digits):
    with torch.no_grad():  # see tests/quantize/test_layer_sensitivity.py's outlier_cnn
        cnn.conv1.weight[3] *= 1000.0
        cnn.conv1.bias[3] *= 1000.0
        cnn.conv2.weight[:, 3] /= 1000.0
    recipe = _recipe(format="int8", budget={"metric": "sqnr_db", "min": 25})
    fast = torchopt.optimize(cnn, recipe, inputs=SPEC, calib_data=digits.calib(4), progress=False)
    details = next(s for s in fast.report.steps if s.step == "quantize").details
    assert list(details["kept"]) == ["conv2"]
    assert any("sensitivity search" in n for n in fast.report.notes)


@pytest.mark.parametrize(
    ("calib", "match"),
    [
        (None, r"recipe step 'quantize' needs calibration data: call torchopt.optimize"),
        ([], r"calib_data is empty"),
        (
            [torch.randn(4, 3, 8, 8)],
            r"calib_data batch 0: input 'x' dim 1 is 3, outside the profile range \[1, 1\] \(shape \(4, 3, 8, 8\)",
        ),
    ],
)
def test_step_calibration_data_errors(cnn, calib, match):
    with pytest.raises(ValueError, match=match):
        torchopt.optimize(cnn, _recipe(), inputs=SPEC, calib_data=calib, progress=False)


def test_step_keep_pattern_error(cnn, digits):
    with pytest.raises(ValueError, match=r"pattern 'conv9' matches no module.*nearby module names"):
        torchopt.optimize(cnn, _recipe(keep=["conv9"]), inputs=SPEC, calib_data=digits.calib(1), progress=False)
