"""torchopt.profile figures: written, non-empty, PNG/SVG/PDF; bad input."""

import time

import pytest
import torch

import torchopt.profile as tp
from torchopt.profile.stages import StageRecorder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results():
    x = torch.randn(16, 16)
    return {
        "eager": tp.latency(torch.mm, x, x, warmup=1, iters=40),
        "relu": tp.latency(torch.relu, x, warmup=1, iters=40),
    }


@pytest.fixture(scope="module")
def traced():
    def step(x):
        with tp.stage("a"):
            time.sleep(0.001)
            with tp.stage("b"):
                y = x * 2
        with tp.stage("c"):
            return y.sum()

    return tp.trace(step, torch.randn(8), wait=0, warmup=1, active=3, measure_overhead=False)


def _check_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), path
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"


def test_latency_figure(results, tmp_path):
    fig = tp.plot_latency(results["eager"], tmp_path / "lat.png", title="mm")
    _check_png(tmp_path / "lat.png")
    ax_hist, ax_cdf = fig.axes
    labels = [t.get_text() for t in ax_hist.get_legend().get_texts()]
    assert any(s.startswith("p50") for s in labels) and any(s.startswith("p99") for s in labels)
    # The p50/p99 lines sit at the reported percentiles.
    xs = sorted(line.get_xdata()[0] for line in ax_cdf.get_lines()[1:])
    assert xs == pytest.approx(sorted([results["eager"].p50_ms, results["eager"].p99_ms]))


def test_latency_figure_from_samples_as_svg(tmp_path):
    tp.plot_latency([1.0, 2.0, 3.0, 10.0], tmp_path / "lat.svg")
    text = (tmp_path / "lat.svg").read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text


def test_comparison_figure(results, tmp_path):
    fig = tp.plot_comparison(results, tmp_path / "cmp.png")
    _check_png(tmp_path / "cmp.png")
    assert "p50 speed-up vs eager: relu" in fig.get_suptitle()
    assert len(fig.axes[1].get_lines()) == 2  # one CDF per run


def test_stage_timeline_figure(traced, tmp_path):
    tp.plot_stage_timeline(traced, tmp_path / "stages.png")
    _check_png(tmp_path / "stages.png")
    with StageRecorder() as rec, tp.stage("x"):
        pass
    tp.plot_stage_timeline(rec, tmp_path / "rec.pdf")
    assert (tmp_path / "rec.pdf").read_bytes().startswith(b"%PDF")


def test_memory_figure(tmp_path):
    keep = []

    def fn():
        with tp.stage("alloc"):
            keep.append(torch.rand(4 * 2**20))

    rep = tp.memory(fn, sample_interval_ms=1)
    tp.plot_memory(rep, tmp_path / "mem.png")
    _check_png(tmp_path / "mem.png")
    mon = tp.VRAMMonitor(0.99, metric="rss")
    mon.sample()
    mon.sample()
    tp.plot_memory(mon, tmp_path / "watch.png")
    _check_png(tmp_path / "watch.png")


def test_figures_bad_input(results, tmp_path):
    with pytest.raises(ValueError, match="must end in one of"):
        tp.plot_latency(results["eager"], tmp_path / "lat.jpg2")
    with pytest.raises(ValueError, match="no samples"):
        tp.plot_latency([])
    with pytest.raises(TypeError, match="LatencyResult or a list"):
        tp.plot_latency(3.0)
    with pytest.raises(ValueError, match="at least one run"):
        tp.plot_comparison({})
    with pytest.raises(TypeError, match="mapping of run name"):
        tp.plot_comparison([results["eager"]])
    with pytest.raises(ValueError, match="no stage events"):
        tp.plot_stage_timeline([])
    with pytest.raises(TypeError, match=r"events\[0\] must be StageEvent"):
        tp.plot_stage_timeline(["x"])
    with pytest.raises(ValueError, match="no memory samples"):
        tp.plot_memory([])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        tp.plot_latency(results["eager"], blocker / "sub" / "lat.png")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        tp.plot_latency(results["eager"], blocker / "lat.png")
