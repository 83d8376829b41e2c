"""Packaging: one import root, every package directory listed, `import torchopt` light and silent."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_dir_is_listed():
    st = _pyproject()["tool"]["setuptools"]
    listed = set(st["packages"])
    mapping = st["package-dir"]
    found = set()
    for top, name in (("torchopt", "torchopt"), ("kernels", "torchopt.kernels"), ("recipes", "torchopt.recipes")):
        assert mapping[name] == top
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found == listed, f"pyproject packages {sorted(listed)} != package dirs {sorted(found)}"


def test_no_top_level_kernels_or_recipes_import():
    code = "import importlib.util as u; print(u.find_spec('kernels'), u.find_spec('recipes'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.stdout.strip() == "None None", out.stdout + out.stderr


def test_import_is_light_and_silent():
    code = (
        "import sys, time; t = time.perf_counter(); import torch; t_torch = time.perf_counter() - t;"
        "t = time.perf_counter(); import torchopt, torchopt.kernels, torchopt.profile, torchopt.quantize,"
        " torchopt.batch; t_opt = time.perf_counter() - t;"
        "heavy = [m for m in ('triton', 'modelopt', 'matplotlib', 'torch_tensorrt', 'torchvision')"
        " if m in sys.modules];"
        "print(heavy, round(t_torch, 2), round(t_opt, 2))"
    )
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"import torchopt printed: {proc.stderr}"
    heavy, t_torch, t_opt = proc.stdout.rsplit(" ", 2)
    assert heavy == "[]", f"import torchopt pulled in {heavy}"
    # torchopt's own import on top of torch: the goal is < 1.5 s in all; torch itself takes ~1-2 s here.
    assert float(t_opt) < 1.0, f"torchopt added {t_opt} s on top of torch's {t_torch} s"


def test_distribution_name_is_not_torchopt():
    assert _pyproject()["project"]["name"] == "torchopt-infer"
