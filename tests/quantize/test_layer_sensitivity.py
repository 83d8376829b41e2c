"""Per-layer sensitivity and the automatic keep search on the trained digits CNN.

`outlier_cnn` is the same function as the trained CNN, rewritten so that one conv1 channel is 1000x larger and
conv2's weights for it 1000x smaller (ReLU and max-pool commute with a positive scale). conv2's per-tensor
input scale then crushes every other channel, so conv2 is the one layer a budget must keep.
"""

import copy
import math

import pytest
import torch

import torchopt.quantize as tq

BUDGET_SQNR = {"metric": "sqnr_db", "min": 25.0}


@pytest.fixture
def outlier_cnn(cnn):
    with torch.no_grad():
        cnn.conv1.weight[3] *= 1000.0
        cnn.conv1.bias[3] *= 1000.0
        cnn.conv2.weight[:, 3] /= 1000.0
    return cnn


def test_outlier_rewrite_keeps_the_function(cnn, outlier_cnn, digits, _trained_cnn):
    x = digits.x_test[:64]
    with torch.no_grad():
        torch.testing.assert_close(outlier_cnn(x), _trained_cnn(x), rtol=1e-4, atol=1e-4)


def test_sensitivity_ranks_the_outlier_layer_first(outlier_cnn, digits, tmp_path):
    ref = copy.deepcopy(outlier_cnn)
    sens = tq.sensitivity(
        outlier_cnn, digits.calib(4), digits.test_batches()[:1], config="int8", mode="both", progress=False
    )
    assert sens.ranking[0] == "conv2"
    rows = {r["layer"]: r for r in sens.rows}
    assert set(rows) == {"conv1", "conv2", "fc1", "head"}
    assert sens.baseline < 10.0  # everything quantized: the outlier destroys the output
    assert rows["conv2"]["all_but_one"] > 30.0  # keeping conv2 alone recovers it
    assert rows["conv2"]["one_alone"] < 10.0 and min(rows[n]["one_alone"] for n in ("conv1", "fc1", "head")) > 30.0
    assert rows["conv2"]["gain"] == pytest.approx(rows["conv2"]["all_but_one"] - sens.baseline)
    # the model is not modified
    assert tq.detect_format(outlier_cnn) is None
    torch.testing.assert_close(outlier_cnn.conv2.weight, ref.conv2.weight, rtol=0, atol=0)
    fig = sens.plot(tmp_path / "sens.png")
    assert (tmp_path / "sens.png").stat().st_size > 1000 and len(fig.axes) == 2
    assert "conv2" in str(sens) and "| 1 | conv2 |" in sens.to_markdown()


@pytest.mark.parametrize("mode", ["all_but_one", "one_alone"])
def test_sensitivity_modes(outlier_cnn, digits, mode):
    sens = tq.sensitivity(outlier_cnn, digits.calib(2), digits.test_batches()[:1], mode=mode, progress=False)
    assert sens.ranking[0] == "conv2"
    key = {"all_but_one": "gain", "one_alone": "one_alone"}[mode]
    assert all(key in r for r in sens.rows)


def test_auto_keep_keeps_exactly_the_sensitive_layer(outlier_cnn, digits):
    res = tq.auto_keep(outlier_cnn, digits.calib(4), digits.test_batches()[:1], BUDGET_SQNR, progress=False)
    assert res.met and res.keep == ["conv2"], res.message
    assert res.achieved >= BUDGET_SQNR["min"]
    assert res.verified[-1] == {"kept": ["conv2"], "metric": res.achieved}  # verified by a fresh quantization
    assert [r.pattern for r in res.keep_rules] == ["conv2"]


def test_auto_keep_with_top1_budget_and_labels(outlier_cnn, digits, acc, limits):
    res = tq.auto_keep(
        outlier_cnn,
        digits.calib(4),
        digits.test_batches()[:1],
        {"metric": "accuracy", "min": 0.95, "precision": "fp16"},
        labels=digits.y_test[:200],
        progress=False,
    )
    assert res.met and res.keep == ["conv2"]
    q = tq.quantize(outlier_cnn, "int8", digits.calib(4), keep=res.keep_rules, progress=False)
    assert q.conv2.weight.dtype == torch.float16
    assert acc(q, digits.x_test, digits.y_test) >= 0.95


def test_budget_already_met_keeps_nothing(cnn, digits):
    res = tq.auto_keep(
        cnn, digits.calib(4), digits.test_batches()[:1], {"metric": "sqnr_db", "min": 20}, progress=False
    )
    assert res.met and res.keep == [] and res.achieved == res.baseline


def test_budget_not_met_says_so(outlier_cnn, digits):
    res = tq.auto_keep(
        outlier_cnn,
        digits.calib(2),
        digits.test_batches()[:1],
        {"metric": "sqnr_db", "min": 300, "max_keep": 2},
        progress=False,
    )
    assert not res.met and len(res.keep) == 2
    assert "budget sqnr_db >= 300 is not met" in res.message and "(limit 2)" in res.message


def test_quantize_with_a_budget_applies_the_search(outlier_cnn, digits):
    q = tq.quantize(outlier_cnn, "int8", digits.calib(4), budget=BUDGET_SQNR, progress=False)
    summary = tq.summary(q)
    assert summary.kept == ["conv2"] and summary.quantized == ["conv1", "fc1", "head"]
    assert "sensitivity search" in {r["module"]: r["why"] for r in summary.rows}["conv2"]
    assert q.torchopt_quant.search["keep"] == ["conv2"]


def test_quantize_with_an_impossible_budget_raises(outlier_cnn, digits):
    with pytest.raises(ValueError, match=r"budget sqnr_db >= 300 is not met"):
        tq.quantize(
            outlier_cnn,
            "int8",
            digits.calib(2),
            budget={"metric": "sqnr_db", "min": 300, "max_keep": 1},
            progress=False,
        )
    assert tq.detect_format(outlier_cnn) is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "each"}, ValueError, r"mode must be one of \['all_but_one', 'one_alone', 'both'\]"),
        (
            {"metric": "psnr"},
            ValueError,
            r"metric must be one of \['sqnr_db', 'cosine', 'top1_agreement', 'accuracy'\]",
        ),
    ],
)
def test_sensitivity_bad_arguments(cnn, digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        tq.sensitivity(cnn, digits.calib(1), digits.test_batches()[:1], progress=False, **kwargs)


def test_auto_keep_accuracy_budget_needs_labels(cnn, digits):
    with pytest.raises(ValueError, match=r"budget metric 'accuracy' needs labels"):
        tq.auto_keep(cnn, digits.calib(1), None, {"metric": "accuracy", "min": 0.9}, progress=False)


def test_infinite_sqnr_is_plotted(digits, tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    sens = tq.sensitivity(model, digits.calib(1), progress=False)
    assert math.isinf(sens.rows[0]["all_but_one"])  # the only layer left float: identical outputs
    sens.plot(tmp_path / "one.png")


def test_a_metric_equal_to_the_budget_in_float32_meets_it(cnn, digits):
    """The accuracy is a float32 mean (k/n correctly rounded to float32); a budget of the same fraction is a
    Python float. Where float32(k/n) < k/n, comparing the two as is would keep a layer for nothing."""
    q = tq.quantize(copy.deepcopy(cnn), "fp8", digits.calib(4), progress=False)
    with torch.no_grad():
        correct = (q(digits.x_test).argmax(1) == digits.y_test).tolist()

    def fraction(n):
        return sum(correct[:n]) / n

    def as_float32(x):
        return torch.tensor(x, dtype=torch.float32).item()

    # An evaluation size whose fraction rounds down in float32 (like 178/180: 0.98888886 < 0.98888889).
    n = next(n for n in range(150, len(correct)) if as_float32(fraction(n)) < fraction(n) < 1.0)
    budget = {"metric": "accuracy", "min": fraction(n)}
    res = tq.auto_keep(
        cnn, digits.calib(4), [digits.x_test[:n]], budget, config="fp8", labels=digits.y_test[:n], progress=False
    )
    assert res.baseline == as_float32(fraction(n)) < budget["min"]  # the fp8 model's accuracy is exactly k/n
    assert res.met and res.keep == [], res.message
