"""torchopt.profile reports: JSON round trip, Markdown content, output-directory errors."""

import json

import pytest
import torch

import torchopt.profile as tp
from torchopt.profile.plots import save_figure
from torchopt.profile.timing import latency_markdown


@pytest.fixture(scope="module")
def runs():
    x = torch.randn(8, 8)
    return {
        "eager": tp.latency(torch.mm, x, x, warmup=1, iters=10, batch_size=8),
        "other": tp.latency(torch.relu, x, warmup=1, iters=10, batch_size=8),
    }


def test_profile_report_saves_json_and_markdown(runs, tmp_path):
    def step(x):
        with tp.stage("work"):
            return x * 2

    tr = tp.trace(step, torch.randn(4), wait=0, warmup=1, active=2, measure_overhead=False)
    mem = tp.memory(step, torch.randn(4), sample_interval_ms=0)
    fig = save_figure(tp.plot_latency(runs["eager"]), tmp_path / "figs" / "lat.png")
    rep = tp.ProfileReport("demo", latency=runs, trace=tr, memory=mem, figures={"latency": fig}, notes=["hello"])
    json_path, md_path = rep.save(tmp_path / "out", "rep")
    data = json.loads(json_path.read_text())
    assert data["title"] == "demo" and data["environment"]["torch"] == torch.__version__
    assert data["latency"]["eager"]["p50_ms"] == runs["eager"].p50_ms
    assert tp.LatencyResult.from_dict(data["latency"]["other"]) == runs["other"]
    assert data["trace"]["stages"][0]["path"] == "work"
    assert data["memory"]["stages"][0]["path"] == "work"
    md = md_path.read_text()
    for needle in (
        "# demo",
        "## Latency",
        "| eager |",
        "## Trace",
        "## Memory",
        "> hello",
        "](../figs/lat.png)",
    ):
        assert needle in md, needle


def test_latency_markdown_speedup_column(runs):
    md = latency_markdown(runs)
    lines = md.splitlines()
    assert lines[0].startswith("| run | p50 ms")
    ratio = runs["eager"].p50_ms / runs["other"].p50_ms
    assert f"{ratio:.2f}×" in lines[3]
    assert "1.00×" in lines[2]


def test_unwritable_report_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot be created"):
        tp.ProfileReport("x").save(blocker / "out")


def test_latency_markdown_paired_speedup_has_its_spread(runs):
    speedups = {"other": tp.Speedup(median=1.41, low=1.32, high=1.5, rounds=10, stable=True)}
    lines = latency_markdown(runs, speedups).splitlines()
    assert "| 1.41× (1.32–1.50) |" in lines[3] and "1.00× (baseline)" in lines[2]
    assert "(unpaired)" in latency_markdown(runs).splitlines()[3]
