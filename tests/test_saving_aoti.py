"""format="aoti": an AOTInductor package next to the saved directory. One tiny MLP, compiled once (~55 s on 2 cores)."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.recipes import CompileConfig, ValidateConfig
from torchopt.saving import AOTI_PACKAGE, DamagedSaveError

pytestmark = pytest.mark.slow

SPEC = InputSpec("x", min=(1, 16), opt=(8, 16), max=(32, 16))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    recipe = Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)])
    fast = torchopt.optimize(model, recipe, inputs=[SPEC], progress=False)
    return fast.save(tmp_path_factory.mktemp("aoti") / "mlp", format="aoti")


def test_package_is_written_and_listed(saved):
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["artifact"] == {"format": "aoti", "files": [AOTI_PACKAGE], "device": "cpu"}
    assert meta["module_format"] == "export"  # the directory stays loadable as before
    assert zipfile.is_zipfile(saved / AOTI_PACKAGE)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_loaded_package_matches_eager(saved, model, batch):
    fast = torchopt.load(saved)
    assert type(fast.runners[0]).__name__ == "AOTICompiledModel"
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)


def test_batch_outside_the_profile_is_refused_before_the_package_runs(saved):
    fast = torchopt.load(saved)
    with pytest.raises(ValueError, match=r"input 'x' dim 0 is 33, outside the profile range \[1, 32\]"):
        fast(torch.randn(33, 16))


def test_package_loads_without_torchopt(saved, model):
    """The artifact alone: a fresh interpreter with only torch._inductor.aoti_load_package (what a C++
    AOTIModelPackageLoader reads too); it also shows the package itself does not check the profile's bounds."""
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(5))
    torch.save(x, saved.parent / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch, torch._inductor
        runner = torch._inductor.aoti_load_package({str(saved / AOTI_PACKAGE)!r})
        x = torch.load({str(saved.parent / "x.pt")!r})
        torch.save(runner(x), {str(saved.parent / "y.pt")!r})
        print(tuple(runner(torch.randn(40, 16)).shape))  # batch 40 > max 32: runs, unchecked
        assert "torchopt" not in sys.modules
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(40, 4)")
    with torch.no_grad():
        torch.testing.assert_close(torch.load(saved.parent / "y.pt"), model(x), rtol=1e-5, atol=1e-6)


def test_damaged_package_names_the_file(saved, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in saved.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    package = copy / AOTI_PACKAGE
    package.write_bytes(package.read_bytes()[:1000])
    with pytest.raises(DamagedSaveError, match=r"aoti\.pt2' is damaged: it cannot be read"):
        torchopt.load(copy)
    package.unlink()
    with pytest.raises(DamagedSaveError, match=r"is damaged: aoti\.pt2 is missing"):
        torchopt.load(copy)
