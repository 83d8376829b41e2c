"""torchvision next to a CPU-only torch: make plain ``import torchvision`` work (models, transforms.v2).

The torchvision wheel on PyPI is a CUDA build. Next to the CPU torch its ``_C`` extension cannot load
(it links libtorch_cuda.so), and ``import torchvision`` raises "operator torchvision::nms does not exist"
(pytorch/vision#9085): its Python meta registrations refer to ops the extension would have defined. Declaring
the ``torchvision::nms`` / ``qnms`` schemas first — only when ``_C`` cannot load — lets the pure-PyTorch parts
(models, transforms) import and run; nms and image io stay unavailable. Where ``_C`` loads (a matching wheel,
a GPU machine) nothing is declared.

Two ways to use it:

- in code, before anything imports torchvision::

      from torchopt.torchvision_compat import enable_cpu_torchvision
      torchvision = enable_cpu_torchvision()

- for a whole environment (what ``.ci/setup`` does)::

      python -c "import torchopt.torchvision_compat as t; print(t.install_pth())"

  writes a ``.pth`` file into site-packages that puts a small import hook on ``sys.meta_path`` at interpreter
  start. The hook imports nothing itself (torch is imported on the first ``import torchvision`` only) and
  removes itself after that import. ``t.uninstall_pth()`` removes it.

This file imports only the standard library at the top: ``--install`` copies it into site-packages as the
hook module, which must not import torch (or torchopt) when the interpreter starts.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

__all__ = ["declare_missing_ops", "enable_cpu_torchvision", "install_import_hook", "install_pth", "uninstall_pth"]

HOOK_MODULE = "torchopt_torchvision_hook"
PTH_NAME = "torchopt-torchvision.pth"

# The op schemas torchvision's Python code registers meta kernels for at import (torchvision/_meta_registrations.py).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_KEEP_ALIVE: list[object] = []  # the declared schemas live as long as their Library object


def _extension_loads(package_dir: str) -> bool:
    import torch

    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd")):
        try:
            torch.ops.load_library(path)
        except OSError:
            return False
        return True
    return False


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def declare_missing_ops() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when torchvision is installed but its ``_C`` extension cannot load
    here. Returns whether it declared them now (False: not needed, or already declared, e.g. by the import
    hook's copy of this module). Call it before torchvision is first imported."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _op_exists("nms"):
        return False
    if _extension_loads(os.path.dirname(spec.origin)):
        return False
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        lib.define(schema)
    _KEEP_ALIVE.append(lib)
    return True


def enable_cpu_torchvision() -> ModuleType:
    """``import torchvision``, declaring the missing ops first where its extension cannot load.

    Raises ImportError when torchvision is not installed. When torchvision was already imported, returns it.
    """
    if "torchvision" not in sys.modules:
        if importlib.util.find_spec("torchvision") is None:
            raise ImportError("this feature needs torchvision: `pip install torchvision`")
        declare_missing_ops()
    return importlib.import_module("torchvision")


class _TorchvisionImportHook:
    """A `sys.meta_path` entry that runs `declare_missing_ops` on the first ``import torchvision``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionImportHook)]
            declare_missing_ops()
        return None  # the regular finders import torchvision itself


def install_import_hook() -> None:
    """Put the hook first on `sys.meta_path` (idempotent). Cheap: imports nothing."""
    if "torchvision" in sys.modules or any(type(f).__name__ == "_TorchvisionImportHook" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionImportHook())


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install_pth(site_packages: str | os.PathLike | None = None) -> Path:
    """Install the hook for every interpreter of this environment: copy this file into `site_packages` (default:
    this interpreter's) as a module of its own and write a ``.pth`` file that installs the hook. Returns the
    ``.pth`` path."""
    target = Path(site_packages) if site_packages is not None else _site_packages()
    if not target.is_dir():
        raise ValueError(f"site_packages {str(target)!r} is not a directory")
    shutil.copyfile(__file__, target / f"{HOOK_MODULE}.py")
    pth = target / PTH_NAME
    # site.py executes .pth lines that start with "import"; an ImportError there would only print a warning.
    pth.write_text(f"import {HOOK_MODULE}; {HOOK_MODULE}.install_import_hook()\n")
    return pth


def uninstall_pth(site_packages: str | os.PathLike | None = None) -> None:
    """Remove what `install_pth` wrote."""
    target = Path(site_packages) if site_packages is not None else _site_packages()
    for name in (PTH_NAME, f"{HOOK_MODULE}.py"):
        (target / name).unlink(missing_ok=True)
