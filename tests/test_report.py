"""OptimizeReport rendering: the speedup with its spread, UNSTABLE and fake-quant labels, short rows,
escaped Markdown, and a figure with separate axes; the dict round trip `torchopt.load` reads the saved report by."""

import json
import math

import pytest

from torchopt.report import OptimizeReport, StepRecord

LONG_REASON = (
    "auto: inductor is the best available on cpu (tensorrt unavailable: Torch-TensorRT needs a CUDA device; "
    + "the torch_tensorrt import failed with libnvinfer.so.11: cannot open shared object file " * 4
    + ")"
)


def _latency(p50: float, stable: bool = True) -> dict:
    return {"p50_ms": p50, "p99_ms": 1.5 * p50, "stable": stable}


def _report(stable=True, fake_quant=False, low=1.32, high=1.50, **kw) -> OptimizeReport:
    rep = OptimizeReport(recipe="default", device="cpu", backend="inductor", backend_reason=LONG_REASON, **kw)
    rep.latency_before, rep.latency_after = _latency(10.0), _latency(7.1, stable)
    rep.latency_speedup = {"median": 1.41, "low": low, "high": high, "rounds": 10, "stable": stable}
    rep.fake_quant = fake_quant
    rep.accuracy = {"cosine": 0.99991, "sqnr_db": 41.3, "max_abs": 0.0123, "top1_agreement": None}
    rep.tolerances, rep.accuracy_passed = {"min_cosine": 0.9999, "min_sqnr_db": 40.0}, True
    return rep


def test_speedup_is_printed_with_its_spread():
    text = str(_report())
    assert "speedup            1.41x (1.32–1.50), median and middle 80% of 10 rounds" in text
    assert "UNSTABLE" not in text and _report().speedup == 1.41


def test_unstable_measurement_is_labelled():
    text = str(_report(stable=False, low=0.9, high=2.1))
    assert "7.100  (UNSTABLE)" in text
    assert "1.41x (0.90–2.10), median and middle 80% of 10 rounds; UNSTABLE measurement" in text


def test_fake_quant_speed_is_a_simulation_not_a_speedup():
    rep = _report(fake_quant=True)
    rep.latency_speedup.update(median=0.41, low=0.38, high=0.44)
    text = str(rep)
    assert "0.41x (0.38–0.44)" in text and "fake-quant simulation, not a deployable speedup" in text
    assert "note               fake-quant simulation: without TensorRT" in text


def test_rows_stay_short_and_the_full_reason_goes_to_a_note():
    rep = _report()
    rows = dict(rep._rows()[:4])
    assert len(rows["backend"]) < 120 and rows["backend"].endswith("… (see note)")
    assert any(v == f"backend: {LONG_REASON}" for k, v in rep._rows() if k == "note")
    assert rep.to_dict()["backend_reason"] == LONG_REASON


def test_markdown_escapes_pipes():
    md = _report().to_markdown()
    assert r"max\|Δ\| 0.0123" in md and "max/Δ/" not in md
    for line in md.splitlines()[2:]:
        cells = [c for c in line.replace(r"\|", "").split("|")]
        assert len(cells) == 4, line  # '', key, value, '': no stray column


def test_no_speedup_without_a_paired_measurement():
    rep = OptimizeReport(recipe="r", device="cpu")
    rep.latency_before, rep.latency_after = _latency(2.0), _latency(1.0)
    assert rep.speedup is None and "speedup" not in dict(rep._rows())


@pytest.mark.parametrize("kw", [{}, {"stable": False, "low": 0.5, "high": 3.0}, {"fake_quant": True}])
def test_plot_renders(tmp_path, kw):
    pytest.importorskip("matplotlib")
    rep = _report(**kw)
    rep.accuracy["sqnr_db"] = math.inf if kw else 41.3
    path = rep.plot(tmp_path / "report.png")
    assert path.stat().st_size > 10_000


def test_from_dict_reads_back_what_to_dict_wrote():
    rep = _report(fake_quant=True, steps=[StepRecord("compile", 1.5, {"graphs": 2})], notes=["a note"])
    again = OptimizeReport.from_dict(json.loads(rep.to_json()))
    assert again == rep and again.speedup == 1.41 and again.steps[0].details == {"graphs": 2}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device": None}, r"report\['device'\] must be a str, got NoneType"),
        (
            {"steps": [{"step": "cast"}]},
            r"report\['steps'\] must be a list of \{'step', 'seconds', 'details'\} objects",
        ),
    ],
)
def test_from_dict_names_a_missing_or_wrong_key(change, message):
    with pytest.raises(ValueError, match=message):
        OptimizeReport.from_dict({**_report().to_dict(), **change})
