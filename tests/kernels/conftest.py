"""Fixtures of the kernel tests. Triton's interpreter is switched on for CPU-only machines by tests/conftest.py,
before anything imports triton."""

import pytest


@pytest.fixture
def tvf():
    """`torchvision.transforms.v2.functional` (through torchopt's CPU-torch workaround), or skip."""
    from torchopt._compat import import_torchvision

    try:
        import_torchvision()
    except ImportError as exc:
        pytest.skip(f"needs torchvision: {exc}")
    from torchvision.transforms.v2 import functional

    return functional
