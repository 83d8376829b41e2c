"""The linear memory model: exact on linear data, conservative predictions, clear errors."""

import json
import math

import pytest

from torchopt.batch.memory_fit import MemoryModel, fit_memory_model

MiB = 2**20


@pytest.mark.parametrize(("intercept", "slope"), [(0, 5 * MiB), (300 * MiB, 3 * MiB), (2**30, 123_457)])
@pytest.mark.parametrize("sizes", [(2, 64), (3, 17, 250), (1, 8, 9, 1000)])
def test_exact_on_linear_points(intercept, slope, sizes):
    model = fit_memory_model([(n, intercept + slope * n) for n in sizes])
    assert model.slope == pytest.approx(slope, rel=1e-9)
    assert model.intercept == pytest.approx(intercept, rel=1e-9, abs=1e-3)
    assert model.max_slope == pytest.approx(slope, rel=1e-9)
    target = intercept + slope * 5000.5
    assert math.floor(model.largest_batch(target)) == 5000
    assert model.predict(77) == pytest.approx(intercept + slope * 77, rel=1e-9)


def test_single_point_slope_is_an_upper_bound():
    base, workspace, slope = 500 * MiB, 200 * MiB, 4 * MiB
    n = 8
    model = fit_memory_model([(n, base + workspace + slope * n)], base_bytes=base)
    # The fixed workspace is counted as per-item memory: the estimate over-counts, so it under-predicts the max.
    assert model.slope == pytest.approx(slope + workspace / n)
    true_max = (16 * 2**30 - base - workspace) / slope
    assert model.largest_batch(16 * 2**30) < true_max


def test_conservative_prediction_uses_the_steepest_secant_and_the_margin():
    # Convex memory: the last secant is the steepest and above the least-squares slope.
    pts = [(n, 100 * MiB + MiB * n + 2_000 * n * n) for n in (10, 100, 400)]
    model = fit_memory_model(pts)
    assert model.max_slope > model.slope
    target = 4 * 2**30
    n_last, m_last = pts[-1]
    least_squares_guess = n_last + (target - m_last) / model.slope
    assert model.largest_batch(target) < least_squares_guess
    with_margin = fit_memory_model(pts, margin=0.05)
    assert with_margin.largest_batch(target) < model.largest_batch(target)
    assert with_margin.conservative_slope == pytest.approx(model.max_slope * 1.05)


def test_flat_memory_predicts_no_limit_and_over_target_predicts_below_the_point():
    flat = fit_memory_model([(4, 100 * MiB), (64, 100 * MiB)])
    assert flat.largest_batch(200 * MiB) == math.inf
    assert flat.largest_batch(50 * MiB) == 0.0
    over = fit_memory_model([(10, 10 * MiB), (20, 20 * MiB)])
    assert over.largest_batch(15 * MiB) == pytest.approx(15)


def test_repeated_sizes_are_averaged():
    model = fit_memory_model([(10, 100), (10, 120), (20, 210)])
    assert model.slope == pytest.approx((210 - 110) / 10)


def test_round_trip_through_json():
    model = fit_memory_model([(2, 10 * MiB), (50, 60 * MiB)], margin=0.01)
    again = MemoryModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model
    assert "MiB" in str(model)


@pytest.mark.parametrize(
    ("points", "match"),
    [([], "at least one"), ([(0, 10)], "batch >= 1"), ([(4, -1)], "peak_bytes >= 0")],
)
def test_bad_points(points, match):
    with pytest.raises(ValueError, match=match):
        fit_memory_model(points)
