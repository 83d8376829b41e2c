"""The package is a one-way stack of layers: an `ast` walk over the source (no imports) finds every import of a
torchopt module, function-level and `TYPE_CHECKING` ones included, and checks that they form no cycle, that no
function imports torchopt's own modules, and that each module imports only from its own layer or below."""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folders and the package names they install as (pyproject's package-dir).
SOURCES = {"torchopt": "torchopt", "kernels": "torchopt.kernels", "recipes": "torchopt.recipes"}

# Bottom to top (STYLE.md); an exact name wins over a pattern, then the first matching pattern.
# Same-layer imports are fine when they form no cycle.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "bottom",
        [
            "torchopt.config",
            "torchopt.inputs",
            "torchopt.export",
            "torchopt._compat",
            "torchopt.torchvision_compat",
            "torchopt.accuracy",
            "torchopt.report",
            "torchopt.runtime",
            "torchopt.environment",
            "torchopt.models",
        ],
    ),
    (
        "middle",
        [
            "torchopt.quantize*",
            "torchopt.backends*",
            "torchopt.kernels*",
            "torchopt.feeder",
            "torchopt.profile",
            "torchopt.profile.*",
            "torchopt.batch",
            "torchopt.batch.*",
        ],
    ),
    ("recipes", ["torchopt.recipe", "torchopt.recipes*"]),
    (
        "top",
        [
            "torchopt.engine",
            "torchopt.saving",
            "torchopt.serve*",
            "torchopt.cli",
            "torchopt.cli_*",
            "torchopt.calib_source",
            "torchopt.profile.cli",
            "torchopt.batch.cli",
            "torchopt",
            "torchopt.__main__",
        ],
    ),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [SOURCES[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for src in SOURCES for p in sorted((ROOT / src).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The torchopt module an imported name refers to (a module, or the module defining an attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


# Own modules loaded by name on first use, each because it imports a heavy or optional third-party package at
# its top; they count as edges for the cycle check, and nowhere else may a torchopt module be loaded this way.
LAZY_BY_NAME = {
    "torchopt.kernels._preprocess_triton": "imports triton (Linux only; TRITON_INTERPRET must be set before it loads)",
}


def _imported(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in LAZY_BY_NAME:
        return [node.value]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        # `from pkg import sub` names the submodule when there is one, else an attribute of pkg.
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return []


def _edges() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    local: list[tuple[str, str, int]] = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        in_function = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            for target in map(_resolve, _imported(node, package)):
                if target is None or target == name:
                    continue
                edges[name].add(target)
                if id(node) in in_function:
                    local.append((name, target, node.lineno))
    return edges, local


EDGES, LOCAL_IMPORTS = _edges()


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    for i, (_, names) in enumerate(LAYERS):
        if module in names:
            return i
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def test_the_walk_sees_the_package():
    assert {"torchopt", "torchopt.engine", "torchopt.kernels", "torchopt.recipes"} <= set(MODULES)
    assert "torchopt.recipe" in EDGES["torchopt.engine"]


def test_no_import_cycle():
    assert _cycles(EDGES) == []


def test_no_function_level_import_of_torchopt():
    assert [f"{m} imports {t} at line {line}" for m, t, line in LOCAL_IMPORTS] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    mine = _layer(module)
    upward = [f"{t} ({LAYERS[_layer(t)][0]})" for t in sorted(EDGES[module]) if _layer(t) > mine]
    assert upward == [], f"{module} ({LAYERS[mine][0]}) imports from above: {upward}"


def test_lazy_loads_by_name_are_the_listed_ones():
    loaded = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
                arg = node.args[0]
                target = arg.value if isinstance(arg, ast.Constant) else None
                if target is None and isinstance(arg, ast.Name):  # a module-level constant holding the name
                    target = next(
                        (
                            n.value.value
                            for n in ast.walk(ast.parse(path.read_text()))
                            if isinstance(n, ast.Assign)
                            and any(getattr(t, "id", None) == arg.id for t in n.targets)
                            and isinstance(n.value, ast.Constant)
                        ),
                        None,
                    )
                if isinstance(target, str) and target.startswith("torchopt"):
                    loaded.add(target)
    assert loaded <= set(LAZY_BY_NAME), (
        f"torchopt modules loaded by name without a reason: {loaded - set(LAZY_BY_NAME)}"
    )


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
