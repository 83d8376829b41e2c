"""The README's "Scaling out on Ray" example runs as written on the test session's Ray, with `fast` the saved
test model loaded back and `x` one item for it; files go to a temporary directory."""

import re
from pathlib import Path

import pytest
import torch

import torchopt

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.mark.slow
def test_readme_ray_example(ray_serve, artifact, mlp, tmp_path, monkeypatch):
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "ray_deployment(" in b]
    monkeypatch.chdir(tmp_path)
    x = torch.randn(16)
    ns = {"fast": torchopt.load(artifact), "x": x}
    exec(compile(block, "README.md (Scaling out on Ray)", "exec"), ns)
    assert [r["id"] for r in sorted(ns["rows"], key=lambda r: r["id"])] == list(range(256))
    with torch.no_grad():
        expected = mlp(x).numpy()
    for row in ns["rows"]:
        assert abs(row["output"] - expected).max() < 1e-5
