"""EvalSet, the evaluation batches compare() and sensitivity() measure on: labels checked against the batches,
batches (not a callable) required, and the accuracy metric refused without labels."""

import pytest

import torchopt.quantize as tq


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labels": [1, 2, 3]}, ValueError, r"labels has 3 entries but eval_data has 128 samples"),
        ({"labels": [[1.0]]}, TypeError, r"labels must be a 1-D integer tensor of class ids"),
    ],
)
def test_compare_bad_labels(cnn, digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        tq.compare(cnn, digits.calib(2), progress=False, **kwargs)


def test_sensitivity_accuracy_without_labels(cnn, digits):
    with pytest.raises(ValueError, match=r"metric 'accuracy' needs labels"):
        tq.sensitivity(cnn, digits.calib(1), digits.test_batches()[:1], progress=False, metric="accuracy")


def test_compare_eval_data_must_be_batches(cnn, digits):
    with pytest.raises(TypeError, match=r"eval_data must be batches"):
        tq.compare(cnn, digits.calib(1), lambda m: None, methods=["max"], progress=False)
