"""The TensorRT backend's calls, checked against the real torch-tensorrt 2.13 sources without importing them.

Importing torch_tensorrt needs TensorRT (it raises a bare Exception here), and `torch_tensorrt.dynamo.compile`
ignores unknown keywords silently, so a misspelled or removed setting would only show as a slower engine.
These tests parse `dynamo/_compiler.py`, `_Input.py`, `_compile.py` and `runtime/` with `ast` and check every
keyword the backend can produce, for every combination of settings that changes the keyword set. CI installs
the sources with `pip install --no-deps torch-tensorrt==2.13.0`.
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import importlib.util
import itertools
import logging
import re
import typing
import warnings
from collections.abc import Collection
from pathlib import Path

import pytest
import torch

from torchopt import InputSpec
from torchopt.backends import tensorrt as trt_backend
from torchopt.backends.tensorrt import (
    TensorRTConfig,
    build_compile_kwargs,
    input_kwargs,
    keep_pattern_regex,
    save_kwargs,
    serialized_engine_kwargs,
)


def _source_dir() -> Path | None:
    spec = importlib.util.find_spec("torch_tensorrt")  # finds the package without executing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


SRC = _source_dir()
pytestmark = pytest.mark.skipif(
    SRC is None,
    reason="torch_tensorrt sources are not installed (CI: `pip install --no-deps torch-tensorrt==2.13.0`)",
)

# Keywords Torch-TensorRT 2.13 removed or deprecated: the backend must never pass them.
REMOVED = {
    "enabled_precisions",
    "use_explicit_typing",
    "use_python_runtime",
    "debug",
    "truncate_long_and_double",
    "refit",
    "make_refittable",
}

# Options whose values change which keywords build_compile_kwargs returns: enumerated as a full product.
KEYSET_VARIANTS: dict[str, list] = {
    "optimization_level": [None, 5],
    "workspace_size": [None, 1 << 30],
    "timing_cache_path": [None, "/tmp/torchopt-trt/timing.bin"],
    "engine_cache_dir": [None, "/tmp/torchopt-trt/engines"],
    "engine_cache_size": [None, 1 << 32],
    "torch_executed_ops": [[], ["aten._softmax.default"]],
    "min_block_size": [None, 3],
    "autocast": [None, "float16", "bfloat16"],
    "use_fp32_acc": [False, True],
    "offload_module_to_cpu": [False, True],
    "lazy_engine_init": [False, True],
}
# Options that change only keyword values; test_value_only_options_keep_the_keyword_set checks that claim.
VALUE_ONLY: dict[str, object] = {
    "require_full_compilation": True,
    "truncate_double": True,
    "dryrun": True,
    "autocast_keep": ["body*"],
}
CALL_VARIANTS = list(itertools.product([False, True], [None, "calib-0123"]))  # quantized, calib fingerprint
DEVICE = torch.device("cuda", 0)


def _tree(rel: str) -> ast.Module:
    return ast.parse((SRC / rel).read_text(), filename=str(SRC / rel))


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"no top-level function {name!r} in the torch_tensorrt source")


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"no class {name!r} in the torch_tensorrt source")


def _keyword_params(fn: ast.FunctionDef) -> dict[str, str]:
    """Parameter name → annotation text for the parameters a caller can pass by keyword."""
    args = fn.args
    params = [*args.args, *args.kwonlyargs]
    return {a.arg: ast.unparse(a.annotation) if a.annotation else "" for a in params}


@pytest.fixture(scope="module")
def compile_params() -> dict[str, str]:
    fn = _function(_tree("dynamo/_compiler.py"), "compile")
    assert fn.args.kwarg is not None  # the **kwargs sink that makes unknown keywords pass silently
    return {k: v for k, v in _keyword_params(fn).items() if k in {a.arg for a in fn.args.kwonlyargs}}


def _configs():
    names = list(KEYSET_VARIANTS)
    for combo in itertools.product(*KEYSET_VARIANTS.values()):
        try:
            yield TensorRTConfig(**dict(zip(names, combo, strict=True)))
        except ValueError:
            continue  # an invalid combination (e.g. engine_cache_size without engine_cache_dir)


def _accepts(annotation: str, value: object) -> bool | None:
    """Whether `value` fits a torch_tensorrt parameter annotation; None for annotations not understood."""
    ann = annotation.replace("typing.", "").strip()
    if m := re.fullmatch(r"Optional\[(.+)\]", ann):
        return value is None or _accepts(m.group(1), value)
    if ann == "bool":
        return isinstance(value, bool)
    if ann == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if ann == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann == "str":
        return isinstance(value, str)
    if re.fullmatch(r"(Collection|Set|List)\[.+\]", ann):
        return isinstance(value, Collection) and not isinstance(value, (str, bytes))
    if ann == "Union[torch.dtype, dtype]":
        return isinstance(value, torch.dtype)
    if ann == "Union[Device, torch.device, str]":
        return isinstance(value, torch.device)
    return None


def test_sources_are_the_version_the_backend_targets():
    text = (SRC / "_version.py").read_text()
    version = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text).group(1)
    major_minor = tuple(int(v) for v in version.split(".")[:2])
    assert major_minor == trt_backend.MIN_TORCH_TENSORRT, f"re-check the backend against torch_tensorrt {version}"


def test_every_setting_is_classified():
    fields = set(TensorRTConfig.field_names())
    assert set(KEYSET_VARIANTS) | set(VALUE_ONLY) == fields, "classify each new TensorRTConfig field above"
    assert not set(KEYSET_VARIANTS) & set(VALUE_ONLY)


def test_compile_keywords_exist_for_every_combination(compile_params):
    seen_keys: set[str] = set()
    n_configs = 0
    for cfg in _configs():
        n_configs += 1
        for quantized, fingerprint in CALL_VARIANTS:
            kw = build_compile_kwargs(cfg, device=DEVICE, quantized=quantized, calib_fingerprint=fingerprint)
            unknown = set(kw) - set(compile_params)
            assert not unknown, f"{cfg} passes {sorted(unknown)}, not parameters of torch_tensorrt.dynamo.compile"
            assert not set(kw) & REMOVED, f"{cfg} passes removed keywords {sorted(set(kw) & REMOVED)}"
            assert not set(kw) & {
                "inputs",
                "arg_inputs",
                "kwarg_inputs",
            }  # the backend passes arg_inputs itself
            for key, value in kw.items():
                ok = _accepts(compile_params[key], value)
                assert ok is not None, f"annotation {compile_params[key]!r} of {key!r} not understood by _accepts"
                assert ok, f"{key}={value!r} does not fit torch_tensorrt's annotation {compile_params[key]!r}"
            seen_keys |= set(kw)
    assert n_configs >= 1000  # the product really ran (2^10 x 3 minus the invalid combinations)
    # Every keyword the backend knows about was produced by some combination.
    assert {
        "optimization_level",
        "workspace_size",
        "timing_cache_path",
        "engine_cache_dir",
        "immutable_weights",
        "cache_built_engines",
        "reuse_cached_engines",
        "engine_cache_size",
        "torch_executed_ops",
        "min_block_size",
        "enable_autocast",
        "autocast_low_precision_type",
        "autocast_excluded_nodes",
        "use_fp32_acc",
        "offload_module_to_cpu",
        "lazy_engine_init",
        "require_full_compilation",
        "truncate_double",
        "dryrun",
        "device",
    } <= seen_keys


def test_value_only_options_keep_the_keyword_set():
    for base in itertools.islice(_configs(), 0, None, 97):
        ref = set(build_compile_kwargs(base, device=DEVICE))
        for name, value in VALUE_ONLY.items():
            if name == "autocast_keep" and base.autocast is None:
                continue  # keep patterns need autocast (a config error otherwise)
            if name == "require_full_compilation" and base.torch_executed_ops:
                continue
            changed = dataclasses.replace(base, **{name: value})
            assert set(build_compile_kwargs(changed, device=DEVICE)) == ref, name


def test_engine_cache_implies_refittable_engines_and_keys_by_calibration():
    cfg = TensorRTConfig(engine_cache_dir="/tmp/torchopt-trt/engines")
    a = build_compile_kwargs(cfg, device=DEVICE, quantized=True, calib_fingerprint="calib-a")
    b = build_compile_kwargs(cfg, device=DEVICE, quantized=True, calib_fingerprint="calib-b")
    assert a["immutable_weights"] is False and a["cache_built_engines"] and a["reuse_cached_engines"]
    assert a["engine_cache_dir"] != b["engine_cache_dir"]
    assert a["timing_cache_path"] == b["timing_cache_path"]  # timings do not depend on the scales
    assert a["min_block_size"] == 1


def _input_init_keys() -> set[str]:
    init = next(
        n for n in _class(_tree("_Input.py"), "Input").body if isinstance(n, ast.FunctionDef) and n.name == "__init__"
    )
    keys: set[str] = set()
    for node in ast.walk(init):
        # kwargs["x"], kwargs.get("x"), "x" in kwargs
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "kwargs":
            if isinstance(node.slice, ast.Constant):
                keys.add(node.slice.value)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "kwargs.get":
            keys.add(node.args[0].value)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Constant)
            and any(ast.unparse(c) == "kwargs" for c in node.comparators)
        ):
            keys.add(node.left.value)
    return keys


SPECS = [
    InputSpec("x", shape=(2, 3, 8, 8)),
    InputSpec("x", min=(1, 3, 8, 8), opt=(4, 3, 8, 8), max=(16, 3, 8, 8)),
    InputSpec("x", min=(1, 3, 8, 8), opt=(1, 3, 8, 8), max=(16, 3, 16, 16)),
    InputSpec("ids", dtype="int64", min=(1, 16), opt=(4, 128), max=(8, 512), dim_names={0: "batch"}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.min}-{s.max}")
def test_input_keywords_exist(spec):
    accepted = _input_init_keys()
    assert {"min_shape", "opt_shape", "max_shape", "shape", "dtype", "name", "shared_dims"} <= accepted
    kw, _ = input_kwargs(spec, torch.float16)
    assert set(kw) <= accepted, f"{sorted(set(kw) - accepted)} are not read by torch_tensorrt.Input.__init__"
    if spec.is_dynamic:  # Input needs all three of min/opt/max, or shape alone
        assert {"min_shape", "opt_shape", "max_shape"} <= set(kw) and "shape" not in kw
        assert kw["name"] == spec.name


@pytest.mark.parametrize("spec", [s for s in SPECS if s.is_dynamic], ids=lambda s: f"{s.name}-{s.min}-{s.max}")
def test_shared_dims_pass_the_real_validation(spec):
    """Run `Input._parse_shared_dims` from the real source on the backend's shared_dims."""
    fn = next(
        n
        for n in _class(_tree("_Input.py"), "Input").body
        if isinstance(n, ast.FunctionDef) and n.name == "_parse_shared_dims"
    )
    fn.decorator_list = []
    ns = {"Any": typing.Any, "Dict": typing.Dict, "Tuple": typing.Tuple}  # noqa: UP006
    exec(compile(ast.Module([fn], []), "_Input.py", "exec"), ns)
    kw, _ = input_kwargs(spec, torch.float32)
    parsed = ns["_parse_shared_dims"](kw["shared_dims"], {k: kw[k] for k in ("min_shape", "opt_shape", "max_shape")})
    assert parsed == {d: spec.dim_name(d) for d in spec.dynamic_dims}


def test_save_and_load_keywords_exist():
    tree = _tree("_compile.py")
    save_fn, load_fn = _function(tree, "save"), _function(tree, "load")
    save_kw = {a.arg for a in save_fn.args.kwonlyargs}
    kw = save_kwargs([])
    assert set(kw) <= save_kw, f"{sorted(set(kw) - save_kw)} are not keyword parameters of torch_tensorrt.save"
    assert [a.arg for a in save_fn.args.args[:2]] == [
        "module",
        "file_path",
    ]  # called as save(module, path, ...)
    assert load_fn.args.args[0].arg == "file_path"  # called as load(path)
    formats = [
        n for n in ast.walk(save_fn) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "accepted_formats"
    ]
    assert formats and kw["output_format"] in ast.literal_eval(formats[0].value)
    exported = ast.literal_eval(
        next(n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__all__")
    )
    assert {"save", "load"} <= set(exported)  # re-exported by `from torch_tensorrt._compile import *`


def _imported_names(rel: str) -> set[str]:
    names = set()
    for node in ast.walk(_tree(rel)):
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_entry_points_the_backend_uses_exist():
    assert "Input" in _imported_names("__init__.py")
    assert "dynamo" in _imported_names("__init__.py")
    assert "compile" in _imported_names("dynamo/__init__.py")
    assert "enable_cudagraphs" in _imported_names("runtime/__init__.py")
    cg = _function(_tree("runtime/_cudagraphs.py"), "enable_cudagraphs")
    assert cg.args.args[0].arg == "compiled_module" and len(cg.args.args) == 1  # enable_cudagraphs(module)


def test_backend_call_sites_use_real_keywords(compile_params):
    """The explicit keywords at the backend's call sites (besides **kwargs from the helpers above)."""
    tree = ast.parse(Path(trt_backend.__file__).read_text())
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            calls.setdefault(ast.unparse(node.func), []).append({k.arg for k in node.keywords if k.arg})
    assert "trt.dynamo.compile" in calls and "trt.save" in calls and "trt.load" in calls
    for kws in calls["trt.dynamo.compile"]:
        assert kws <= set(compile_params) and "arg_inputs" in kws
    save_kw = {a.arg for a in _function(_tree("_compile.py"), "save").args.kwonlyargs}
    for kws in calls["trt.save"]:
        assert kws <= save_kw
    for kws in calls["trt.load"]:
        assert not kws


def test_partition_block_names_match_the_partitioner():
    text = "\n".join(p.read_text() for p in (SRC / "dynamo").rglob("*.py"))
    assert '"_run_on_acc"' in text and "_run_on_gpu" in text


class _KeepModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 4)
        self.headroom = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.headroom(self.head(self.body(x)))


@pytest.fixture(scope="module")
def exported_nodes() -> list[torch.fx.Node]:
    """call_function nodes of a real exported + decomposed graph, as Torch-TensorRT's autocast pass sees them."""
    with warnings.catch_warnings():
        # torch 2.13's run_decompositions deep-copies pytree specs, tripping its own LeafSpec deprecation.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.export.export(_KeepModel(), (torch.randn(2, 8),)).run_decompositions()
    return [n for n in program.graph.nodes if n.op == "call_function" and n.meta.get("nn_module_stack")]


@pytest.mark.parametrize(
    ("patterns", "kept"),
    [
        (["head"], {"head"}),
        (["body"], {"body.0", "body.1"}),
        (["head*"], {"head", "headroom"}),
        (["*.0"], {"body.0"}),
        ([], set()),
    ],
)
def test_autocast_keep_patterns_with_the_real_node_rule(exported_nodes, patterns, kept):
    """Run Torch-TensorRT's own `DisabledNodeNameRegexRule` (from its source) on a real exported graph."""
    tree = _tree("dynamo/lowering/passes/nodeclassifier.py")
    classes = [_class(tree, "NodeRuleBase"), _class(tree, "DisabledNodeNameRegexRule")]
    ns = {"abc": abc, "re": re, "logger": logging.getLogger("nodeclassifier-under-test")}
    exec(compile(ast.Module(classes, []), "nodeclassifier.py", "exec"), ns)
    rule = ns["DisabledNodeNameRegexRule"]([keep_pattern_regex(p) for p in patterns])
    paths = {n: n.meta["nn_module_stack"][next(reversed(n.meta["nn_module_stack"]))][0] for n in exported_nodes}
    assert set(paths.values()) == {"body.0", "body.1", "head", "headroom"}
    assert {paths[n] for n in exported_nodes if rule.check(n)} == kept


# ---------------------------------------------------------------------------------------------------------
# save(format="tensorrt"): convert_exported_program_to_serialized_trt_engine

SERIALIZE = "convert_exported_program_to_serialized_trt_engine"


@pytest.fixture(scope="module")
def serialize_fn() -> ast.FunctionDef:
    return _function(_tree("dynamo/_compiler.py"), SERIALIZE)


@pytest.fixture(scope="module")
def serialize_params(serialize_fn) -> dict[str, str]:
    assert serialize_fn.args.kwarg is not None  # unknown keywords pass silently here too
    kwonly = {a.arg for a in serialize_fn.args.kwonlyargs}
    return {k: v for k, v in _keyword_params(serialize_fn).items() if k in kwonly}


def _refused(cfg: TensorRTConfig) -> bool:
    return bool(cfg.autocast or cfg.torch_executed_ops or cfg.dryrun)


def test_serialized_engine_keywords_exist_for_every_accepted_combination(serialize_params):
    accepted = refused = 0
    for cfg in _configs():
        for quantized, fingerprint in CALL_VARIANTS:
            if _refused(cfg):
                with pytest.raises(ValueError, match=r"cannot be used for a serialized TensorRT engine"):
                    serialized_engine_kwargs(cfg, device=DEVICE, quantized=quantized, calib_fingerprint=fingerprint)
                refused += 1
                continue
            kw = serialized_engine_kwargs(cfg, device=DEVICE, quantized=quantized, calib_fingerprint=fingerprint)
            unknown = set(kw) - set(serialize_params)
            assert not unknown, f"{cfg} passes {sorted(unknown)}, not parameters of {SERIALIZE}"
            assert not set(kw) & REMOVED and not set(kw) & {"inputs", "arg_inputs", "kwarg_inputs"}
            for key, value in kw.items():
                ok = _accepts(serialize_params[key], value)
                assert ok is not None, f"annotation {serialize_params[key]!r} of {key!r} not understood by _accepts"
                assert ok, f"{key}={value!r} does not fit torch_tensorrt's annotation {serialize_params[key]!r}"
            accepted += 1
    assert accepted >= 100 and refused >= 100


def test_serialized_engine_refusals_are_what_the_function_cannot_do(serialize_fn, serialize_params, compile_params):
    """autocast: its keywords are compile's only (here they would vanish into **kwargs); torch_executed_ops: the
    function converts the whole lowered graph into one engine, with no partitioner to leave ops in PyTorch."""
    autocast_keys = {"enable_autocast", "autocast_low_precision_type", "autocast_excluded_nodes"}
    assert autocast_keys <= set(compile_params) and not autocast_keys & set(serialize_params)
    called = {ast.unparse(n.func) for n in ast.walk(serialize_fn) if isinstance(n, ast.Call)}
    assert "interpret_module_to_result" in called  # the whole graph, one engine
    assert not [c for c in called if "partition" in c]  # compile_module() partitions; this function does not
    for option, value in {
        "autocast": "float16",
        "torch_executed_ops": ["aten._softmax.default"],
        "dryrun": True,
    }.items():
        with pytest.raises(
            ValueError, match=rf"tensorrt\.{option}=.* serialized TensorRT engine \(save format 'tensorrt'\)"
        ):
            serialized_engine_kwargs(TensorRTConfig(**{option: value}), device=DEVICE)


def test_serialized_engine_call_site(serialize_fn, serialize_params):
    assert SERIALIZE in _imported_names("dynamo/__init__.py")
    assert serialize_fn.args.args[0].arg == "exported_program"  # called with the program positionally
    tree = ast.parse(Path(trt_backend.__file__).read_text())
    calls = [
        {k.arg for k in node.keywords if k.arg}
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == f"trt.dynamo.{SERIALIZE}"
    ]
    assert calls and all("arg_inputs" in kws and kws <= set(serialize_params) for kws in calls)
