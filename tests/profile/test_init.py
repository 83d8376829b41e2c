"""torchopt.profile's package surface: every module is reachable by its name, and __all__ holds the entry points."""

import importlib
import pkgutil
import types

import torchopt.profile as tp

MODULES = sorted(info.name for info in pkgutil.iter_modules(tp.__path__))


def test_every_module_is_reachable_by_its_name():
    # A module named like a function the package exports (latency.py exporting `latency`) is shadowed by it.
    for name in MODULES:
        module = importlib.import_module(f"torchopt.profile.{name}")
        assert getattr(tp, name) is module, f"torchopt.profile.{name} is {getattr(tp, name)!r}, not the module"
        assert name not in getattr(module, "__all__", []), f"{name}.py exports a name like its own"


def test_all_names_the_public_entry_points_only():
    assert all(hasattr(tp, name) for name in tp.__all__)
    assert not any(isinstance(getattr(tp, name), types.ModuleType) for name in tp.__all__)
    for plumbing in ("write_json", "rss_bytes", "environment", "time_calls", "summarize", "check_output_dir"):
        assert plumbing not in tp.__all__ and not hasattr(tp, plumbing), plumbing
