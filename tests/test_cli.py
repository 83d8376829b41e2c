"""The `torchopt` command: recipes listing, optimize on a small model from a file, and clear input errors."""

import json
import subprocess
import sys
import textwrap

import pytest

from torchopt.cli import main

MODEL_FILE = textwrap.dedent(
    """
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(x).relu()
    """
)


def test_recipes_list_and_show(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "default" in listing and "inductor-fp16" in listing
    assert main(["recipes", "eager-fp32"]) == 0
    assert "backend: eager" in capsys.readouterr().out


def test_optimize_model_file_writes_report_and_figure(tmp_path, capsys):
    model = tmp_path / "tiny_model.py"
    model.write_text(MODEL_FILE)
    out = tmp_path / "out"
    code = main(
        ["optimize", f"{model}:Tiny", "--recipe", "eager-fp32", "--input", "x=1-2-4x6", "--out", str(out), "--save"]
    )
    assert code == 0
    assert "eager" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "eager" and report["accuracy_passed"] is True
    assert (out / "report.png").stat().st_size > 1000
    assert (out / "optimized" / "meta.json").is_file()


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["recipes", "nope"]) == 2
    assert "error: unknown recipe 'nope'" in capsys.readouterr().err
    code = main(["optimize", "resnet5", "--input", "x=1x3x8x8", "--out", str(tmp_path)])
    assert code == 2
    assert "did you mean 'resnet50'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["optimize", "resnet18", "--out", str(tmp_path)])


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "torchopt", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout
