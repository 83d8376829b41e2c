"""`torchopt find-batch`: the latency sweep on CPU, the memory search's CPU rules, sizes on the command line."""

import argparse
import json
import textwrap
from pathlib import Path

import pytest

from torchopt.batch.cli import register
from torchopt.batch.memory_backends import CpuRssMemory
from torchopt.cli import main
from torchopt.cli_args import parse_bytes

MODEL_FILE = textwrap.dedent(
    """
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.fc(x).relu()
    """
)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "batch_cli_model.py"
    path.write_text(MODEL_FILE)
    return f"{path}:Net"


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["find-batch", "resnet50", "--input", "x=1x3x224x224", "--latency-budget-ms", "5"])
    assert args.func.__name__ == "run_find_batch" and args.latency_budget_ms == 5.0 and args.mode == "auto"


def test_sweep_on_cpu_writes_results_and_prints_a_profile(model_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        ["find-batch", model_file, "--input", "x=1-4-8x16", "--max-batch", "16", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert "memory search skipped" in printed.err
    data = json.loads((out / "find_batch.json").read_text())
    best = data["optimal_batch"]["size"]
    assert "max_batch" not in data and max(p["size"] for p in data["optimal_batch"]["points"]) <= 16
    assert data["profile"][0]["max"][0] == 16
    assert (out / "optimal_batch.png").stat().st_size > 0
    assert f"--input x=1-{max(best, 2)}-16x16" in printed.out


def test_memory_search_on_cpu_needs_a_budget(model_file, tmp_path, capsys):
    code = main(["find-batch", model_file, "--input", "x=1x16", "--mode", "max", "--out", str(tmp_path)])
    assert code == 2
    assert "CUDA-only unless a budget is given" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
def test_memory_search_on_cpu_with_a_budget(model_file, tmp_path, capsys):
    budget = CpuRssMemory().used_bytes() + 512 * 2**20
    code = main(
        [
            "find-batch",
            model_file,
            "--input",
            "x=1x16",
            "--mode",
            "max",
            "--memory-budget",
            str(budget),
            "--headroom",
            "16MiB",
            "--max-batch",
            "32",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads((tmp_path / "find_batch.json").read_text())
    assert data["max_batch"]["size"] == 32 and data["max_batch"]["backend"] == "cpu-rss"
    # 32 is the --max-batch cap the search reached, not the memory boundary: the label says which.
    label = "opt kept from --input, max = 32, the --max-batch cap (fits in memory: memory search)"
    assert f"profile ({label}): --input x=1-2-32x16" in printed.out
    assert (tmp_path / "max_batch.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * 2**30),
        ("512MiB", 512 * 2**20),
        ("2.5GB", 2_500_000_000),
        ("123", 123),
        ("1e9", 10**9),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["16GiBs", "lots", "", "-5GB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="--memory-budget must be a number of bytes or a size like 16GiB"):
        parse_bytes(text, "--memory-budget")


def test_bad_budget_text_is_a_clear_cli_error(model_file, tmp_path, capsys):
    code = main(["find-batch", model_file, "--input", "x=1x16", "--memory-budget", "lots", "--out", str(tmp_path)])
    assert code == 2 and "--memory-budget must be" in capsys.readouterr().err


def test_sweep_respects_the_given_batch_range_and_labels_the_profile(model_file, tmp_path, capsys):
    # No memory search on CPU without --memory-budget: the input's range 2..32 bounds the sweep, and the printed
    # max is the input's own, said to be so (it used to sweep to 64 and call the result "max fit").
    out = tmp_path / "out"
    args = ["find-batch", model_file, "--input", "x=2-8-32x16", "--device", "cpu", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "find_batch.json").read_text())
    sizes = sorted({p["size"] for p in data["optimal_batch"]["points"]})
    assert sizes[0] == 2 and sizes[-1] <= 32, sizes
    assert "max_batch" not in data and data["profile"][0]["max"][0] == 32
    label = f"opt = optimal of the sizes swept (2..{sizes[-1]}), max = 32 kept from --input (no memory search ran)"
    assert data["profile_label"] == label
    assert f"profile ({label}): --input x=2-" in printed and "-32x16" in printed
    assert "max fit" not in printed.split("profile (")[1]


def test_find_batch_failure_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["find-batch", "resnet5", "--input", "x=1-2-4x3x8x8", "--device", "cpu", "--out", str(out)])
    assert code == 2 and "did you mean 'resnet50'" in capsys.readouterr().err
    assert not out.exists()
