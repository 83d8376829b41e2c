"""torchvision next to the CPU torch: plain `import torchvision` works in the environment .ci/setup builds."""

import importlib.util
import subprocess
import sys
import sysconfig

import pytest

from torchopt.torchvision_compat import HOOK_MODULE, PTH_NAME, install_pth, uninstall_pth

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed in this environment"
)

USE_TORCHVISION = (
    "import torch, torchvision; from torchvision.transforms import v2;"
    "m = torchvision.models.resnet18().eval(); print(tuple(m(torch.rand(1, 3, 32, 32)).shape),"
    " tuple(v2.Resize(8)(torch.rand(3, 16, 16)).shape))"
)


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300)


def test_plain_import_torchvision_works_in_this_environment():
    # .ci/setup installs the hook; without it the CPU torch + PyPI (CUDA) torchvision pair raises
    # "operator torchvision::nms does not exist" at `import torchvision`.
    proc = _run(USE_TORCHVISION)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["(1,", "1000)", "(3,", "8,", "8)"]


def test_the_pth_hook_alone_makes_torchvision_import_and_costs_no_torch_at_startup(tmp_path):
    pth = install_pth(tmp_path)
    assert pth.name == PTH_NAME and (tmp_path / f"{HOOK_MODULE}.py").is_file()
    purelib = sysconfig.get_paths()["purelib"]
    # -S: no site processing, so only the hook in tmp_path runs (not one already in this environment's
    # site-packages); the environment's packages are then put on sys.path without their .pth files.
    code = (
        f"import site, sys; site.addsitedir({str(tmp_path)!r}); sys.path.append({purelib!r});"
        "assert 'torch' not in sys.modules, 'the hook imported torch at startup';"
        "hooks = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == '_TorchvisionImportHook'];"
        "assert hooks == ['_TorchvisionImportHook'], hooks;" + USE_TORCHVISION
    )
    proc = _run(code, "-S")
    assert proc.returncode == 0, proc.stderr[-2000:]
    uninstall_pth(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_enable_cpu_torchvision_in_code():
    code = (
        "from torchopt.torchvision_compat import enable_cpu_torchvision; tv = enable_cpu_torchvision();"
        "print(tv.models.get_model('mobilenet_v3_small', weights=None).__class__.__name__)"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "MobileNetV3"
