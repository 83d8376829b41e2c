"""The `torchopt` command: recipes listing, optimize on a small model from a file, and clear input errors."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

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


IMAGE_MODEL_FILE = textwrap.dedent(
    """
    import torch

    class PooledClassifier(torch.nn.Module):
        # (N, 3, H, W) images of any size -> 4 classes: small enough for a demo run in seconds.
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    def build():
        return PooledClassifier()
    """
)


def _write(path, text):
    path.write_text(text)
    return path


def _error_line(err: str) -> str:
    """The one error line of a failed run's stderr (progress lines such as "optimizing ..." may precede it)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one error line, got:\n{err}"
    assert err.rstrip().endswith(lines[0]), f"more output after the error line:\n{err}"
    return lines[0]


def test_demo_writes_its_reports_to_the_default_folder(tmp_path):
    # The default --out (torchopt_out/demo) used to be left uncreated: the run then died writing report.md.
    _write(tmp_path / "image_model.py", IMAGE_MODEL_FILE)
    proc = subprocess.run(
        [sys.executable, "-m", "torchopt", "demo", "--model", "image_model.py:build", "--recipe", "eager-fp32"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "torchopt_out" / "demo"
    for name in ("report.md", "report.json", "report.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["backend"] == "eager"


def test_optimize_writes_to_the_default_folder(tmp_path, monkeypatch, capsys):
    _write(tmp_path / "tiny_model.py", MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "tiny_model.py:Tiny", "--recipe", "eager-fp32", "--input", "x=1-2-4x6"]) == 0
    out = tmp_path / "torchopt_out" / "optimize"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    assert "report: torchopt_out/optimize/report.md" in capsys.readouterr().out


def test_a_failing_run_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    # Fails after parsing and model loading: the backend is unavailable here (no TensorRT, no CUDA).
    code = main(["optimize", "resnet18", "--input", "x=1x3x16x16", "--recipe", "tensorrt-fp16", "--out", str(out)])
    assert code == 1
    assert "backend 'tensorrt' was requested but is unavailable" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "deep").exists()


def test_out_that_cannot_be_a_folder_fails_before_the_run(tmp_path, capsys):
    blocker = _write(tmp_path / "file.txt", "x")
    code = main(["optimize", "resnet18", "--input", "x=1x3x16x16", "--out", str(blocker / "out")])
    assert code == 2
    line = _error_line(capsys.readouterr().err)
    assert f"--out '{blocker / 'out'}' cannot be created: '{blocker}' is not a directory" in line
    code = main(["optimize", "resnet18", "--input", "x=1x3x16x16", "--out", str(blocker)])
    assert code == 2
    assert "exists and is not a directory" in _error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def build(:\n    pass\n", r"importing .*bad_model.py raised SyntaxError at .*bad_model.py:1: invalid syntax"),
        (
            "import torch\n\n\nraise KeyError('boom')\n",
            r"importing .*bad_model.py raised KeyError at .*bad_model.py:4: 'boom'",
        ),
        (
            "def build():\n    return 1 / 0\n",
            r"calling .*bad_model.py:build raised ZeroDivisionError at .*bad_model.py:2",
        ),
    ],
    ids=["syntax-error", "raises-at-import", "factory-raises"],
)
def test_a_broken_model_file_is_one_line(tmp_path, capsys, source, expected):
    model = _write(tmp_path / "bad_model.py", source)
    out = tmp_path / "out"
    assert main(["optimize", f"{model}:build", "--input", "x=1x8", "--out", str(out)]) == 1
    line = _error_line(capsys.readouterr().err)
    assert re.search(expected, line), line
    assert line.startswith("torchopt optimize: error: ") and line.endswith("(--verbose shows the traceback)")
    assert not out.exists()


def test_verbose_shows_the_traceback(tmp_path, capsys):
    model = _write(tmp_path / "bad_model.py", "raise KeyError('boom')\n")
    assert main(["optimize", f"{model}:build", "--input", "x=1x8", "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'boom'" in err


def test_a_broken_model_file_from_the_shell(tmp_path):
    _write(tmp_path / "bad_model.py", "def build(:\n    pass\n")
    proc = subprocess.run(
        [sys.executable, "-m", "torchopt", "optimize", "bad_model.py:build", "--input", "x=1x8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "bad_model.py:1: invalid syntax" in _error_line(proc.stderr)
    assert not (tmp_path / "torchopt_out").exists()


@pytest.mark.parametrize("columns", [60, 100, 200])
def test_recipes_listing_wraps_to_the_terminal(monkeypatch, capsys, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= columns
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert "default" in names and "int8-ptq" in names
    # Continuation lines hang under the description column, never under the names.
    indent = len(lines[0]) - len(lines[0][len(names[0]) :].lstrip())
    assert all(line.startswith(" " * indent) for line in lines if line.startswith(" "))


def test_int8_recipe_with_calibration_tensor_file(tmp_path, capsys):
    model = _write(tmp_path / "tiny_model.py", MODEL_FILE)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(12, 6), calib)
    out = tmp_path / "out"
    args = ["optimize", f"{model}:Tiny", "--input", "x=1-4-8x6", "--recipe", "int8-ptq", "--device", "cpu"]
    assert main([*args, "--calib", str(calib), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["precision"].startswith("int8") and report["accuracy_passed"] is True


def test_calibration_errors_are_one_line(tmp_path, capsys):
    model = _write(tmp_path / "tiny_model.py", MODEL_FILE)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((5, 7), dtype=np.float32))
    args = ["optimize", f"{model}:Tiny", "--input", "x=1-4-8x6", "--recipe", "int8-ptq", "--out", str(tmp_path / "o")]
    assert main([*args, "--calib", str(tmp_path / "missing.pt")]) == 2
    assert "--calib '" in _error_line(capsys.readouterr().err)
    assert main([*args, "--calib", str(wrong)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "samples of shape (7,) (tensor (5, 7), dim 0 = samples) do not fit input 'x'" in line
    assert "expects each sample to have shape (6,)" in line
    assert not (tmp_path / "o").exists()
