"""`torchopt bench` / `torchopt profile` through `register(subparsers)`, on a small model in a file."""

import argparse
import gzip
import json
import textwrap

import pytest
import torch

from torchopt.profile.cli import register

MODEL_FILE = textwrap.dedent(
    """
    import torch

    def build():
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    """
)


@pytest.fixture
def model_spec(tmp_path):
    path = tmp_path / "tiny_model.py"
    path.write_text(MODEL_FILE)
    return f"{path}:build"


def _run(argv):
    parser = argparse.ArgumentParser(prog="torchopt")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _bench(model_spec, out, *options):
    """`torchopt bench` of the tiny model on one 4x32 input."""
    return _run(["bench", model_spec, "--input", "x=4x32", "--out", str(out), *options])


def test_bench_writes_report_and_figure(model_spec, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = _run(
        [
            "bench",
            model_spec,
            "--input",
            "x=4x32",
            "--out",
            str(out),
            "--warmup",
            "2",
            "--iters",
            "20",
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    eager = data["latency"]["eager"]
    assert eager["batch_size"] == 4 and eager["iters"] >= 20 and eager["device"] == "cpu"
    assert (out / "latency.png").stat().st_size > 5_000
    assert "| eager |" in (out / "bench.md").read_text()
    assert "| eager |" in capsys.readouterr().out


def test_profile_writes_trace_figures_and_report(model_spec, tmp_path):
    out = tmp_path / "prof"
    rc = _run(
        [
            "profile",
            model_spec,
            "--input",
            "x=2-4-8x32",
            "--out",
            str(out),
            "--warmup",
            "2",
            "--iters",
            "10",
            "--active",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    for name in ("trace.json.gz", "latency.png", "stages.png", "memory.png", "profile.json", "profile.md"):
        assert (out / name).stat().st_size > 0, name
    trace = json.loads(gzip.decompress((out / "trace.json.gz").read_bytes()))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"0", "1", "2"} <= names  # each child module of the Sequential is a stage
    data = json.loads((out / "profile.json").read_text())
    assert [s["path"] for s in data["trace"]["stages"]] == ["0", "1", "2"]
    assert data["latency"]["eager"]["batch_size"] == 4  # the opt size of the dynamic batch dim


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        (["--iters", "0"], ValueError, "--iters must be > 0"),
        (["--warmup", "-1"], ValueError, "--warmup must be > 0"),
        (["--batch-size", "0"], ValueError, "--batch-size must be > 0"),
    ],
)
def test_bad_numbers(model_spec, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        _run(["bench", model_spec, "--input", "x=4x32", "--out", str(tmp_path / "o"), *extra])


def test_bad_input_spec_and_model(model_spec, tmp_path):
    with pytest.raises(ValueError, match="input spec"):
        _run(["bench", model_spec, "--input", "x=4by32", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        _run(
            [
                "bench",
                model_spec.replace(":build", ":nope"),
                "--input",
                "x=4x32",
                "--out",
                str(tmp_path / "o"),
            ]
        )


def test_unwritable_out(model_spec, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"--out .* cannot be created"):
        _run(["profile", model_spec, "--input", "x=4x32", "--out", str(blocker / "o")])


def test_bad_device_names_the_option(model_spec, tmp_path):
    # before torchopt.config.resolve_device, torch.device's own RuntimeError reached the user
    with pytest.raises(ValueError, match="--device 'gpu0' is not a valid device string"):
        _run(["bench", model_spec, "--input", "x=4x32", "--out", str(tmp_path / "o"), "--device", "gpu0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_cuda_only_options_on_cpu(model_spec, tmp_path):
    with pytest.raises(ValueError, match="needs CUDA"):
        _run(["bench", model_spec, "--input", "x=4x32", "--out", str(tmp_path / "o"), "--device", "cuda"])
    with pytest.raises(ValueError, match="cuda_graph=True needs the call to run on CUDA"):
        _bench(model_spec, tmp_path / "o", "--cuda-graph", "--iters", "2", "--warmup", "1")
    with pytest.raises(ValueError, match="--memory-history records the CUDA caching allocator"):
        _run(["profile", model_spec, "--input", "x=4x32", "--out", str(tmp_path / "o"), "--memory-history"])


def test_main_entry_point_reports_errors_as_exit_code_2(model_spec, tmp_path, capsys):
    cli = pytest.importorskip("torchopt.cli")
    assert cli.main(["bench", model_spec, "--input", "x=4x32", "--out", str(tmp_path / "o"), "--iters", "0"]) == 2
    assert "--iters must be > 0" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_cuda_graph_on_gpu(model_spec, tmp_path):
    out = tmp_path / "g"
    options = ["--device", "cuda", "--cuda-graph", "--iters", "20", "--warmup", "3", "--no-progress"]
    assert _bench(model_spec, out, *options) == 0
    assert json.loads((out / "bench.json").read_text())["latency"]["eager"]["cuda_graph"] is True


def test_bench_compile_refuses_options_it_cannot_pair(model_spec, tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(
        ValueError, match="--compile times eager and compiled in alternating rounds, without --cuda-graph or --l2 cold"
    ):
        _run(["bench", model_spec, "--input", "x=4x32", "--out", out, "--compile", "--l2", "cold"])
