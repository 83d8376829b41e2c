"""torchopt.profile's package surface: __all__ holds the entry points, not the plumbing. (That every module is
reachable by its name, and that README and exports match, is checked for every package in tests/test_exports.py.)"""

import types

import torchopt.profile as tp


def test_all_names_the_public_entry_points_only():
    assert all(hasattr(tp, name) for name in tp.__all__)
    assert not any(isinstance(getattr(tp, name), types.ModuleType) for name in tp.__all__)
    for plumbing in ("write_json", "rss_bytes", "environment", "time_calls", "summarize", "check_output_dir"):
        assert plumbing not in tp.__all__ and not hasattr(tp, plumbing), plumbing
