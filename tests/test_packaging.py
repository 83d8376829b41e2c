"""Packaging: one import root, every package directory listed, `import torchopt` light and silent."""

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _installed_dirs():
    """Every directory setuptools must install: Python packages and data folders (e.g. recipes/builtin)."""
    for top, name in (("torchopt", "torchopt"), ("kernels", "torchopt.kernels"), ("recipes", "torchopt.recipes")):
        for folder in [ROOT / top, *(ROOT / top).rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__" and any(f.is_file() for f in folder.iterdir()):
                rel = folder.relative_to(ROOT / top)
                yield top, name, ".".join([name, *rel.parts])


def test_every_package_dir_is_listed():
    # setuptools warns "Package 'torchopt.recipes.builtin' is absent from the packages configuration" (and
    # will stop installing it) when a data folder is shipped through its parent's package-data.
    st = _pyproject()["tool"]["setuptools"]
    listed = set(st["packages"])
    found = set()
    for top, name, package in _installed_dirs():
        assert st["package-dir"][name] == top
        found.add(package)
    assert found == listed, f"pyproject packages {sorted(listed)} != package dirs {sorted(found)}"
    assert st["package-data"] == {"torchopt.recipes.builtin": ["*.yaml"]}


def test_license_is_an_spdx_string():
    # A TOML table (`{text = ...}`) is deprecated in setuptools >= 77 and floods the install log with warnings.
    data = _pyproject()
    assert data["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in data["build-system"]["requires"]


def test_no_top_level_kernels_or_recipes_import():
    code = "import importlib.util as u; print(u.find_spec('kernels'), u.find_spec('recipes'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.stdout.strip() == "None None", out.stdout + out.stderr


def test_import_is_light_and_silent():
    # Light means: nothing heavy imported, and only a few standard-library modules beyond torchopt's own on top
    # of torch. Counted rather than timed: an import time depends on the machine's load.
    code = (
        "import sys; import torch; before = set(sys.modules);"
        "import torchopt, torchopt.kernels, torchopt.profile, torchopt.quantize, torchopt.batch;"
        "heavy = [m for m in ('triton', 'modelopt', 'matplotlib', 'torch_tensorrt', 'torchvision')"
        " if m in sys.modules];"
        "extra = sorted(m for m in set(sys.modules) - before if m.split('.')[0] != 'torchopt');"
        "print(heavy, ' '.join(extra))"
    )
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"import torchopt printed: {proc.stderr}"
    heavy, _, extra = proc.stdout.strip().partition(" ")
    assert heavy == "[]", f"import torchopt pulled in {heavy}"
    # Today: decimal, fractions, resource, statistics (and their C parts).
    assert len(extra.split()) <= 10, f"import torchopt added these modules to torch's: {extra}"


def test_distribution_name_is_not_torchopt():
    assert _pyproject()["project"]["name"] == "torchopt-infer"


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_quickstart_verbatim():
    commands = _quickstart_commands()
    assert commands == ["bash .ci/setup && .venv/bin/torchopt demo", ".venv/bin/python -m pytest"], commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci, f".ci/run does not run the README's command {command!r} as a line of its own"
    # The setup runs once: as part of the README's first command, after .ci/run removed the old venv.
    assert sum("bash .ci/setup" in line for line in ci if not line.startswith("#")) == 1
    assert ci.index("rm -rf .venv torchopt_out/demo") < ci.index(commands[0])
    assert "set -euo pipefail" in ci
    assert any("torchopt_out/demo/report.md" in line for line in ci)
