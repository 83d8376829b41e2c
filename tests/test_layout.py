"""tests/ mirrors the source tree: every module `torchopt/<path>/<name>.py` has `tests/<path>/test_<name>.py`,
`kernels/<name>.py` has `tests/kernels/test_<name>.py` and `recipes/<name>.py` has `tests/recipes/test_<name>.py`."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the tests folder its tree is mirrored under.
SOURCES = {"torchopt": "tests", "kernels": "tests/kernels", "recipes": "tests/recipes"}

# Private modules are tested through the public module that uses them (the value says which test file), and
# __main__ through the CLI's tests. Keep this list short: a module worth its own file is worth its own test.
COVERED_ELSEWHERE = {
    "torchopt/__main__.py": "tests/test_cli.py (it only runs torchopt.cli.main, which those tests call)",
    "torchopt/_compat.py": "tests/test_torchvision_compat.py, tests/quantize/ (the lazy third-party imports)",
    "torchopt/batch/_calls.py": "tests/batch/test_max_batch.py, tests/batch/test_optimal.py (the calls they time)",
    "torchopt/quantize/_core.py": "tests/quantize/test_api.py (quantize() is the core with its checks)",
    "torchopt/quantize/_tables.py": "tests/quantize/test_comparison.py, test_layer_sensitivity.py (their tables)",
    "torchopt/serve/_common.py": "tests/serve/test_batcher.py, tests/serve/test_pipeline.py",
    "kernels/_preprocess_common.py": "tests/kernels/test_preprocess_errors.py (options, argument checks, geometry)",
    "kernels/_preprocess_layout.py": "tests/kernels/test_preprocess_lowering.py (the descriptor layout)",
    "kernels/_preprocess_triton.py": "tests/kernels/test_preprocess_op.py, test_preprocess_lowering.py",
}

# Public modules whose tests still live under another name, with the reason (move them, then drop the line).
NOT_YET_MIRRORED: dict[str, str] = {}


def _expected_test_file(module: Path) -> str:
    source = module.relative_to(ROOT).parts[0]
    inner = module.relative_to(ROOT / source)
    return str(Path(SOURCES[source], *inner.parts[:-1], f"test_{module.stem}.py"))


def _modules() -> list[str]:
    found = []
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            if path.name != "__init__.py":
                found.append(str(path.relative_to(ROOT)))
    return found


def test_every_module_has_its_test_file():
    listed = {**COVERED_ELSEWHERE, **NOT_YET_MIRRORED}
    missing = [
        f"{module} -> {_expected_test_file(ROOT / module)}"
        for module in _modules()
        if module not in listed and not (ROOT / _expected_test_file(ROOT / module)).exists()
    ]
    assert missing == [], "modules without their mirrored test file"


def test_the_exceptions_are_still_needed():
    modules = set(_modules())
    for module in {**COVERED_ELSEWHERE, **NOT_YET_MIRRORED}:
        assert module in modules, f"{module} is gone: drop its line"
        assert not (ROOT / _expected_test_file(ROOT / module)).exists(), f"{module} has its test file: drop its line"
    assert all(Path(m).name.startswith("_") for m in COVERED_ELSEWHERE), "only private modules are covered elsewhere"
