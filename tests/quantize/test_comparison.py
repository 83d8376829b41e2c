"""compare(): the calibration-method / format table and figure against the float model (real data)."""

import math

import pytest

import torchopt.quantize as tq


def test_compare_methods_and_formats_on_digits(cnn, digits, limits, tmp_path):
    table = tq.compare(
        cnn,
        digits.calib(8),
        digits.test_batches(),
        formats=["int8", "fp8"],
        methods=["max", "entropy", "percentile"],
        labels=digits.y_test,
        config=limits["fast_entropy"],
        progress=False,
    )
    assert [(r["format"], r["method"], r["status"]) for r in table.rows] == [
        ("int8", "max", "ok"),
        ("int8", "entropy", "ok"),
        ("int8", "percentile", "ok"),
        ("fp8", "max", "ok"),
        ("fp8", "entropy", "n/a"),
        ("fp8", "percentile", "ok"),
    ]
    assert table.rows[4]["note"] == "entropy does not apply to fp8"
    assert table.float_accuracy >= 0.95
    for row in table.ok_rows():
        assert row["sqnr_db"] >= limits["cnn_sqnr_floor_db"][row["format"]], row
        assert 0.99 <= row["cosine"] <= 1.0 and row["top1_agreement"] >= 0.97
        assert row["accuracy_drop"] == pytest.approx(table.float_accuracy - row["accuracy"])
        assert row["accuracy_drop"] <= limits["max_accuracy_drop"]
        assert row["calib_seconds"] > 0
    # int8 has more levels than fp8's 3-bit mantissa: it is closer to float on this CNN
    assert table.best("sqnr_db")["format"] == "int8"
    fig = table.plot(tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 1000 and len(fig.axes) == 4
    text, md = str(table), table.to_markdown()
    assert "entropy does not apply to fp8" in text and "| int8 | max | ok |" in md
    assert "float model accuracy" in md
    assert tq.detect_format(cnn) is None  # the float model is untouched


def test_compare_without_labels_or_eval_data(cnn, digits):
    table = tq.compare(cnn, digits.calib(2), methods=["max"], progress=False)
    (row,) = table.rows
    assert table.float_accuracy is None and "accuracy" not in row
    assert math.isfinite(row["sqnr_db"]) and row["top1_agreement"] is not None
    with pytest.raises(ValueError, match=r"no row has metric 'accuracy'"):
        table.best("accuracy")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"formats": ["int9"]}, ValueError, r"formats\[0\] must be one of \['int8', 'int8_smoothquant', 'fp8'"),
        ({"methods": ["minmax"]}, ValueError, r"methods\[0\] must be one of \['max', 'entropy'.*got 'minmax'"),
        ({"formats": []}, ValueError, r"formats must not be empty"),
        ({"formats": "int8", "methods": 3}, TypeError, r"methods must be a list of methods"),
        ({"formats": ["fp8"], "methods": ["entropy"]}, ValueError, r"no method of \['entropy'\] applies.*fp8: max"),
    ],
)
def test_compare_bad_arguments(cnn, digits, kwargs, error, match):
    with pytest.raises(error, match=match):
        tq.compare(cnn, digits.calib(2), progress=False, **kwargs)
