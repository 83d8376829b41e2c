"""Every package's surface against the README: each `__all__` name is importable and documented in the package's
README section, every `torchopt.X` / `tq.X` / `tp.X` / `tb.X` the README uses exists (and, on a package, is one of
its exports), and no module is shadowed by a name its package exports."""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Each package, the README section that documents its exports, and the short names the README's code gives it.
PACKAGES: dict[str, tuple[str | tuple[str, ...], tuple[str, ...]]] = {
    "torchopt": ("The Python API", ()),
    "torchopt.quantize": ("Quantization", ("tq",)),
    "torchopt.profile": ("Profiling", ("tp",)),
    "torchopt.batch": ("Batch size", ("tb",)),
    "torchopt.kernels": ("Preprocessing kernels", ()),
    "torchopt.recipes": ("Recipes", ()),
    "torchopt.backends": ("TensorRT and dynamic shapes", ()),
    "torchopt.serve": (("Serving in-process", "Serving with Triton Inference Server", "Scaling out on Ray"), ()),
}
ALIASES = {alias: package for package, (_, aliases) in PACKAGES.items() for alias in aliases}

# Modules whose own __all__ holds a name like the module's, each with why it is not shadowed.
SAME_NAME_EXPORTS = {
    "torchopt.environment": "environment(): torchopt does not re-export it, so torchopt.environment stays the module",
    "torchopt.quantize": "quantize(): the subpackage's entry point (tq.quantize); torchopt exports the subpackage",
}


def _section(heading: str | tuple[str, ...]) -> str:
    """The README section under `heading` (several headings: their sections together)."""
    if isinstance(heading, tuple):
        return "".join(_section(h) for h in heading)
    text = README.read_text()
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _is_documented(name: str, section: str, package: str) -> bool:
    prefixes = "|".join(re.escape(p) for p in (package, *PACKAGES[package][1]))
    as_code = rf"(`|\b(?:{prefixes})\.){re.escape(name)}\b"  # `name...` or torchopt.pkg.name / tq.name
    imported = rf"\bimport (?:\w+, )*{re.escape(name)}\b"  # from torchopt.serve import A, name
    return bool(re.search(as_code, section) or re.search(imported, section))


def _all_packages() -> set[str]:
    """The packages in the source tree (`kernels/` and `recipes/` install as torchopt.kernels / .recipes)."""
    found = set()
    for source, name in (("torchopt", "torchopt"), ("kernels", "torchopt.kernels"), ("recipes", "torchopt.recipes")):
        for init in (ROOT / source).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / source).parts]))
    return found


def _submodules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return sorted(info.name for info in pkgutil.iter_modules(pkg.__path__) if info.name != "__main__")


def test_every_package_has_its_readme_section():
    assert _all_packages() == set(PACKAGES), "add the package and its README section to PACKAGES"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_export_is_importable(package):
    pkg = importlib.import_module(package)
    assert len(pkg.__all__) == len(set(pkg.__all__)), f"{package}.__all__ repeats a name"
    missing = [name for name in pkg.__all__ if not hasattr(pkg, name)]
    assert missing == [], f"{package}.__all__ names {missing}, which it does not define"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_export_is_documented_in_its_readme_section(package):
    heading = PACKAGES[package][0]
    section = _section(heading)
    undocumented = [n for n in importlib.import_module(package).__all__ if not _is_documented(n, section, package)]
    assert undocumented == [], f"exported by {package} but not in README's {heading!r} section"


def _readme_references() -> list[str]:
    """Every dotted `torchopt.X...` / `tq.X...` the README uses, aliases spelled out."""
    refs = set()
    for head, tail in re.findall(r"\b(torchopt|tq|tp|tb)((?:\.\w+)+)", README.read_text()):
        refs.add(ALIASES.get(head, head) + tail)
    return sorted(refs)


@pytest.mark.parametrize("reference", _readme_references())
def test_every_name_the_readme_uses_exists(reference):
    parts = reference.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        where = ".".join(parts[:i])
        if isinstance(obj, types.ModuleType) and not hasattr(obj, part):
            obj = importlib.import_module(f"{where}.{part}")  # a module reached by name, e.g. torchopt.profile.timing
            continue
        assert hasattr(obj, part), f"README uses {reference}, but {where} has no {part}"
        value = getattr(obj, part)
        if where in PACKAGES and not isinstance(value, types.ModuleType):
            assert part in obj.__all__, f"README uses {reference}, which {where} does not export"
        obj = value


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_module_is_reachable_by_its_name(package):
    # A module named like a function the package exports (profile/latency.py beside `latency`) is shadowed by it.
    pkg = importlib.import_module(package)
    for name in _submodules(package):
        module = importlib.import_module(f"{package}.{name}")
        assert getattr(pkg, name) is module, f"{package}.{name} is {getattr(pkg, name)!r}, not the module"
        if module.__name__ not in SAME_NAME_EXPORTS:
            assert name not in getattr(module, "__all__", []), f"{module.__name__} exports a name like its own"


def test_same_name_exports_are_still_there():
    # The allowlist above shrinks when one of them goes.
    for module, why in SAME_NAME_EXPORTS.items():
        name = module.rpartition(".")[2]
        assert name in importlib.import_module(module).__all__, f"{module} no longer exports {name}: drop it ({why})"
