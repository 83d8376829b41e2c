"""Accuracy metrics against hand-computed values (numpy), nested outputs, and the merge rule."""

import math

import numpy as np
import pytest
import torch

from torchopt.accuracy import AccuracyMetrics, compare_outputs, flatten_outputs, is_classifier_output


def test_metrics_match_numpy(seed):
    ref = torch.randn(8, 10)
    out = ref + 0.01 * torch.randn(8, 10)
    m = compare_outputs(ref, out)
    r, o = ref.double().numpy().ravel(), out.double().numpy().ravel()
    assert m.max_abs == pytest.approx(np.abs(r - o).max())
    assert m.mean_abs == pytest.approx(np.abs(r - o).mean())
    assert m.cosine == pytest.approx(r @ o / np.linalg.norm(r) / np.linalg.norm(o))
    assert m.sqnr_db == pytest.approx(10 * np.log10((r**2).sum() / ((r - o) ** 2).sum()))
    expected_top1 = float((ref.argmax(1) == out.argmax(1)).float().mean())
    assert m.top1_agreement == pytest.approx(expected_top1) and m.samples == 8


def test_identical_is_infinite_sqnr():
    x = torch.randn(3, 4)
    m = compare_outputs(x, x.clone())
    assert m.sqnr_db == math.inf and m.cosine == pytest.approx(1.0) and m.max_abs == 0


def test_non_finite_output_fails_every_metric():
    x = torch.randn(3, 4)
    bad = x.clone()
    bad[0, 0] = float("nan")
    m = compare_outputs(x, bad)
    assert m.sqnr_db == -math.inf and m.cosine == -1.0


def test_nested_outputs_use_worst_leaf(seed):
    a, b = torch.randn(4, 5), torch.randn(4, 3)
    ref = {"logits": a, "extra": (b,)}
    out = {"logits": a.clone(), "extra": (b + 1.0,)}
    assert len(flatten_outputs(ref)) == 2
    m = compare_outputs(ref, out)
    assert m.max_abs == pytest.approx(1.0) and m.sqnr_db < 20


def test_structure_and_shape_mismatch():
    with pytest.raises(ValueError, match="differ in structure"):
        compare_outputs((torch.zeros(1),), (torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match=r"output 0 shape differs: reference \(2,\), optimized \(3,\)"):
        compare_outputs(torch.zeros(2), torch.zeros(3))


def test_merge_takes_worst_and_weights_top1():
    a = AccuracyMetrics(0.1, 0.01, 0.99, 30.0, top1_agreement=1.0, samples=3)
    b = AccuracyMetrics(0.2, 0.02, 0.98, 20.0, top1_agreement=0.0, samples=1)
    m = AccuracyMetrics.merge([a, b])
    assert (m.max_abs, m.cosine, m.sqnr_db, m.samples) == (0.2, 0.98, 20.0, 4)
    assert m.top1_agreement == pytest.approx(0.75)


class _Classifier(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = torch.nn.Linear(16, 32)
        self.fc = torch.nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x)))


class _Embedder(torch.nn.Module):
    """Ends in a LayerNorm: a [batch, 32] embedding, not logits."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(self.proj(x))


def _pair(model):
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = model(x)
    return ref, ref + 0.3 * torch.randn_like(ref)


def test_top1_only_for_a_classifier_head(seed):
    clf, emb = _Classifier(), _Embedder()
    ref, out = _pair(clf)
    assert compare_outputs(ref, out, model=clf).top1_agreement is not None
    ref, out = _pair(emb)
    # [64, 32] looks like logits by shape alone; the LayerNorm at the end says it is an embedding
    assert compare_outputs(ref, out, model=emb).top1_agreement is None
    assert compare_outputs(ref, out, model=emb, task="classify").top1_agreement is not None  # the user says so
    assert compare_outputs(*_pair(clf), model=clf, task="embed").top1_agreement is None


def test_classifier_rule():
    clf = _Classifier(classes=10)
    assert is_classifier_output(torch.randn(2, 10), clf)
    assert not is_classifier_output(torch.randn(2, 7), clf)  # the head has 10 outputs, not 7
    assert not is_classifier_output(torch.randn(2, 3, 10), clf)  # not [batch, classes]
    assert not is_classifier_output(torch.randn(2, 10), _Embedder())
    assert is_classifier_output(torch.randn(2, 10))  # no model given: the shape rule alone


def test_bad_task():
    with pytest.raises(ValueError, match=r"task must be one of \['auto', 'classify', 'embed'\], got 'clasify'"):
        compare_outputs(torch.zeros(2, 3), torch.zeros(2, 3), task="clasify")
    with pytest.raises(ValueError, match=r"task='classify' needs \[batch, classes\].*got shape \(2, 3, 4\)"):
        compare_outputs(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), task="classify")
