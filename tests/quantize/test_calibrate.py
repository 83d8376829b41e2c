"""Calibration data adapters (DataLoader, tensors, tuples, dicts, callables, generators), batch limits, mode
restoration, bad data, and INT8 PTQ accuracy on real data (scikit-learn digits)."""

import copy

import pytest
import torch

import torchopt.quantize as tq
from torchopt.quantize.calibrate import CalibData


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 4)
        self.b = torch.nn.Linear(6, 4)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


class Counting(torch.nn.Module):
    """Records how it was called: the number of forwards, grad mode and training flag."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)
        self.calls, self.grad, self.training_seen = 0, [], []

    def forward(self, x):
        self.calls += 1
        self.grad.append(torch.is_grad_enabled())
        self.training_seen.append(self.training)
        return self.fc(x)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _loop(data, model, **kw):
    cd = CalibData(data, **kw)
    cd.forward_loop(progress=False)(model)
    return cd


# --- adapters -----------------------------------------------------------------------------------------


def test_dataloader_with_labels_drops_the_labels():
    ds = torch.utils.data.TensorDataset(_rand(20, 8), torch.arange(20))
    model = Counting()
    cd = _loop(torch.utils.data.DataLoader(ds, batch_size=8), model)
    assert model.calls == 3 and cd.batches_seen == 3  # 8 + 8 + 4 samples; the labels never reach forward


def test_tuples_and_dicts_feed_several_inputs():
    model = TwoInputs()
    tuples = [(_rand(2, 8, seed=i), _rand(2, 6, seed=i + 9)) for i in range(3)]
    dicts = [{"x": x, "z": z, "label": torch.zeros(2)} for x, z in tuples]  # 'label' is not a forward arg
    fp_tuples = _loop(tuples, model).last_fingerprint
    fp_dicts = _loop(dicts, model).last_fingerprint
    assert fp_tuples and fp_dicts and fp_tuples != fp_dicts  # positional vs keyword inputs hash differently


def test_single_tensor_is_one_batch():
    model = Counting()
    _loop(_rand(5, 8), model)
    assert model.calls == 1


def test_generator_is_read_once_and_replayable():
    model = Counting()
    cd = CalibData((_rand(2, 8, seed=i) for i in range(5)), max_batches=3)
    cd.forward_loop(progress=False)(model)
    cd.forward_loop(progress=False)(model)
    assert model.calls == 6 and len(cd) == 3


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_max_batches_limits_the_forwards(limit):
    model = Counting()
    cd = _loop([_rand(2, 8, seed=i) for i in range(4)], model, max_batches=limit)
    assert model.calls == min(limit, 4) == cd.batches_seen


def test_callable_runs_the_model_itself_and_is_fingerprinted():
    model = Counting()
    batches = [_rand(2, 8, seed=i) for i in range(3)]
    cd = _loop(lambda m: [m(x) for x in batches], model)
    assert model.calls == 3 and cd.batches_seen == 3
    assert cd.last_fingerprint == _loop(batches, Counting()).last_fingerprint  # same inputs, same fingerprint


def test_fingerprint_changes_with_the_data_and_matches_the_dry_pass():
    model = Counting()
    a = [_rand(2, 8, seed=i) for i in range(3)]
    b = [t.clone() for t in a]
    b[2][0, 0] += 1e-3
    assert CalibData(a).fingerprint(model) == _loop(a, model).last_fingerprint
    assert CalibData(a).fingerprint(model) != CalibData(b).fingerprint(model)


def test_eval_and_no_grad_during_calibration_and_restored_after():
    model = Counting().train()
    _loop([_rand(2, 8)], model)
    assert model.grad == [False] and model.training_seen == [False]
    assert model.training and torch.is_grad_enabled()


def test_quantize_restores_training_mode(cnn, digits):
    cnn.train()
    q = tq.quantize(cnn, "int8", digits.calib(1), progress=False)
    assert q.training


def test_batches_are_moved_and_cast_for_the_model():
    model = Counting().to(torch.float64)
    cd = CalibData([_rand(2, 8)], dtype=torch.float64)
    cd.forward_loop(progress=False)(model)  # float32 batches would fail in a float64 Linear
    args, _ = next(iter(cd.calls(model)))
    assert args[0].dtype == torch.float64 and args[0].device == next(model.parameters()).device


def test_progress_bar_counts_batches(capsys):
    model = Counting()
    CalibData([_rand(2, 8, seed=i) for i in range(3)]).forward_loop(progress=True, desc="calib-test")(model)
    assert "calib-test" in capsys.readouterr().err


# --- bad data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "empty", [[], iter([]), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 8)))]
)
def test_empty_calibration_data(cnn, empty):
    with pytest.raises(ValueError, match=r"calib_data is empty: it yielded no batch"):
        tq.quantize(cnn, "int8", empty, progress=False)
    assert tq.detect_format(cnn) is None


def test_missing_calibration_data(cnn):
    with pytest.raises(ValueError, match=r"calib_data is required"):
        tq.quantize(cnn, "int8", None, progress=False)


def test_batch_that_does_not_fit_the_model(cnn):
    bad = [torch.randn(4, 3, 8, 8)]  # 3 channels, conv1 takes 1
    with pytest.raises(ValueError, match=r"calib_data batch 0 with inputs \(\(4, 3, 8, 8\) float32\) does not fit"):
        tq.quantize(cnn, "int8", bad, progress=False)
    assert tq.detect_format(cnn) is None  # checked on the float model before any change


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ("images/", TypeError, r"calib_data must be a DataLoader.*got a string"),
        (42, TypeError, r"calib_data must be a DataLoader, an iterable of batches.*got int"),
        ([3.0], TypeError, r"calib_data batch 0 must be a tensor, a tuple/list of inputs or a dict"),
        ([()], ValueError, r"calib_data batch 0 is an empty tuple"),
        ([{"label": torch.zeros(2)}], ValueError, r"dict with keys \['label'\], none of which the model's forward"),
        (lambda: None, TypeError, r"as a callable must take the model as its one argument, takes 0"),
    ],
)
def test_bad_calibration_data(data, error, match):
    with pytest.raises(error, match=match):
        _loop(data, Counting())


def test_callable_that_never_runs_the_model(cnn):
    with pytest.raises(ValueError, match=r"calib_data ran no batch through the model"):
        tq.quantize(cnn, "int8", lambda m: None, progress=False)


# --- accuracy on real data ----------------------------------------------------------------------------


def test_trained_cnn_reaches_95_percent(cnn, digits, acc):
    assert acc(cnn, digits.x_test, digits.y_test) >= 0.95


@pytest.mark.parametrize(("method", "options"), [("max", {}), ("entropy", {"entropy_stride": 8}), ("percentile", {})])
def test_int8_ptq_loses_at_most_one_point(cnn, digits, acc, limits, method, options):
    float_acc = acc(cnn, digits.x_test, digits.y_test)
    q = tq.quantize(copy.deepcopy(cnn), "int8", digits.calib(8), method=method, progress=False, **options)
    q_acc = acc(q, digits.x_test, digits.y_test)
    assert float_acc - q_acc <= limits["max_accuracy_drop"], (method, float_acc, q_acc)
    record = q.torchopt_quant
    assert record.method == method and record.calib_batches == 8 and record.calib_fingerprint
    # activation quantizers got a static amax from the histograms / max, none was left dynamic
    assert all("per-tensor amax=" in r["input"] for r in tq.summary(q).rows)


def test_entropy_differs_from_max(cnn, digits):
    qmax = tq.quantize(copy.deepcopy(cnn), "int8", digits.calib(8), method="max", progress=False)
    qent = tq.quantize(copy.deepcopy(cnn), "int8", digits.calib(8), method="entropy", entropy_stride=16, progress=False)
    amax = lambda m: float(m.fc1.input_quantizer.amax)  # noqa: E731
    assert amax(qent) < amax(qmax)  # KL divergence clips the long tail that max keeps


def test_later_batch_that_does_not_fit_names_its_index(cnn, digits):
    batches = [*digits.calib(2), torch.randn(4, 1, 9)]  # batch 2 has rank 3
    with pytest.raises(ValueError, match=r"calib_data batch 2 with inputs \(\(4, 1, 9\) float32\) does not fit"):
        tq.quantize(cnn, "int8", batches, progress=False)
