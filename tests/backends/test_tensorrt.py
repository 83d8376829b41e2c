"""CPU tests of the TensorRT backend's pure parts: settings, Input kwargs and their pitfalls, export and its
errors, the partition report, Q/DQ format checks, and what happens where TensorRT is absent. The engine build
itself is in test_tensorrt_e2e.py (needs torch_tensorrt + CUDA); the keyword contract in
test_tensorrt_contract.py."""

from __future__ import annotations

import copy
import json
import operator
import re

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.backends import BACKENDS, choose_backend
from torchopt.backends.tensorrt import (
    TensorRTConfig,
    _check_keep_patterns,
    _check_quantized,
    _check_writable_dir,
    build_compile_kwargs,
    engine_cache_subdir,
    explain_export_error,
    export_profile,
    input_kwargs,
    keep_pattern_regex,
    partition_report,
    resolve_torch_ops,
)
from torchopt.recipes import CompileConfig, ValidateConfig

CPU = torch.device("cpu")
CUDA0 = torch.device("cuda", 0)


# ----------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"optimization_level": 6}, ValueError, r"tensorrt.optimization_level must be in \[0, 5\], got 6"),
        ({"optimization_level": -1}, ValueError, "tensorrt.optimization_level must be >= 0"),
        ({"optimization_level": True}, TypeError, "tensorrt.optimization_level must be int, got bool"),
        ({"workspace_size": 0}, ValueError, "tensorrt.workspace_size must be > 0"),
        ({"engine_cache_dir": ""}, ValueError, "tensorrt.engine_cache_dir must be a non-empty path"),
        ({"engine_cache_size": 10}, ValueError, "engine_cache_size is set but tensorrt.engine_cache_dir is not"),
        ({"torch_executed_ops": ["aten.softmaxx"]}, ValueError, "no op aten.softmaxx is registered"),
        ({"torch_executed_ops": ["aten._softmax.defualt"]}, ValueError, r"no overload 'defualt' \(did you mean"),
        ({"torch_executed_ops": ["softmax"]}, ValueError, "is not an op name like 'aten._softmax.default'"),
        (
            {"torch_executed_ops": ["aten.relu"], "require_full_compilation": True},
            ValueError,
            "cannot be combined with tensorrt.torch_executed_ops",
        ),
        ({"autocast": "int8"}, ValueError, r"tensorrt.autocast must be one of \['float16', 'bfloat16', None\]"),
        ({"autocast_keep": ["head"]}, ValueError, "autocast_keep .* needs tensorrt.autocast"),
        ({"dryrun": "yes"}, TypeError, "tensorrt.dryrun must be bool, got str 'yes'"),
    ],
)
def test_config_rejects_bad_settings(options, error, match):
    with pytest.raises(error, match=match):
        TensorRTConfig(**options)


def test_unknown_setting_names_the_key_and_a_suggestion():
    with pytest.raises(
        ValueError,
        match=r"unknown key 'optimisation_level' in recipe.steps\[0\].compile.tensorrt \(did you"
        r" mean 'optimization_level'\?\)",
    ):
        Recipe.from_dict({"steps": [{"compile": {"backend": "tensorrt", "tensorrt": {"optimisation_level": 3}}}]})


def test_config_round_trips_through_json_and_recipes():
    cfg = TensorRTConfig(
        optimization_level=4,
        engine_cache_dir="/tmp/e",
        autocast="fp16",
        autocast_keep=["head*"],
        torch_executed_ops=["aten._softmax.default"],
        min_block_size=2,
        dryrun=True,
    )
    assert cfg.autocast == "float16"  # alias normalized
    assert TensorRTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    recipe = Recipe([CompileConfig(backend="tensorrt", tensorrt=cfg)], name="trt")
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_resolve_torch_ops_accepts_the_usual_spellings():
    assert resolve_torch_ops(["aten._softmax.default"]) == ["torch.ops.aten._softmax.default"]
    assert resolve_torch_ops(["aten::_softmax.default"]) == ["torch.ops.aten._softmax.default"]
    assert resolve_torch_ops(["torch.ops.aten.relu.default"]) == ["torch.ops.aten.relu.default"]
    every = resolve_torch_ops(["aten._softmax"])  # a packet: all its overloads
    assert "torch.ops.aten._softmax.default" in every and "torch.ops.aten._softmax.out" in every


def test_default_kwargs_are_minimal():
    assert build_compile_kwargs(TensorRTConfig(), device=CUDA0) == {
        "device": CUDA0,
        "require_full_compilation": False,
        "truncate_double": False,
        "dryrun": False,
    }


def test_quantized_models_get_min_block_size_1_unless_set():
    assert build_compile_kwargs(TensorRTConfig(), device=CUDA0, quantized=True)["min_block_size"] == 1
    assert build_compile_kwargs(TensorRTConfig(min_block_size=3), device=CUDA0, quantized=True)["min_block_size"] == 3
    assert "min_block_size" not in build_compile_kwargs(TensorRTConfig(), device=CUDA0)


def test_autocast_kwargs():
    kw = build_compile_kwargs(TensorRTConfig(autocast="bf16", autocast_keep=["head", "body.*"]), device=CUDA0)
    assert kw["enable_autocast"] is True and kw["autocast_low_precision_type"] is torch.bfloat16
    assert kw["autocast_excluded_nodes"] == sorted([keep_pattern_regex("head"), keep_pattern_regex("body.*")])


def test_engine_cache_dir_keys_by_calibration_and_holds_the_timing_cache(tmp_path):
    cfg = TensorRTConfig(engine_cache_dir=str(tmp_path))
    a = build_compile_kwargs(cfg, device=CUDA0, calib_fingerprint="aaa")
    b = build_compile_kwargs(cfg, device=CUDA0, calib_fingerprint="bbb")
    none = build_compile_kwargs(cfg, device=CUDA0)
    assert len({a["engine_cache_dir"], b["engine_cache_dir"], none["engine_cache_dir"]}) == 3
    assert a["engine_cache_dir"] == str(engine_cache_subdir(tmp_path, "aaa"))
    assert a["immutable_weights"] is False
    assert a["timing_cache_path"] == str(tmp_path / "timing_cache.bin")
    explicit = build_compile_kwargs(
        TensorRTConfig(engine_cache_dir=str(tmp_path), timing_cache_path="/x/t.bin"), device=CUDA0
    )
    assert explicit["timing_cache_path"] == "/x/t.bin"


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="tensorrt.engine_cache_dir '.*a_file/uncalibrated' cannot be created"):
        _check_writable_dir("tensorrt.engine_cache_dir", engine_cache_subdir(blocker, None))
    _check_writable_dir("tensorrt.engine_cache_dir", tmp_path / "fine" / "sub")
    assert (tmp_path / "fine" / "sub").is_dir()


# ------------------------------------------------------------------------------------------ Input kwargs


def test_static_input():
    kw, notes = input_kwargs(InputSpec("x", shape=(2, 3, 8, 8)), torch.float16)
    assert kw == {"shape": (2, 3, 8, 8), "dtype": torch.float16, "name": "x"} and notes == []


def test_dynamic_input_is_named_and_its_dims_listed():
    spec = InputSpec("x", min=(1, 3, 8, 8), opt=(4, 3, 16, 16), max=(16, 3, 32, 32))
    kw, notes = input_kwargs(spec, torch.float32)
    assert kw == {
        "min_shape": (1, 3, 8, 8),
        "opt_shape": (4, 3, 16, 16),
        "max_shape": (16, 3, 32, 32),
        "dtype": torch.float32,
        "name": "x",
        "shared_dims": {0: "x_dim0", 2: "x_dim2", 3: "x_dim3"},
    }
    assert notes == []


def test_opt_of_1_on_a_dynamic_axis_becomes_2_with_a_note():
    kw, notes = input_kwargs(InputSpec("x", min=(1, 4), opt=(1, 4), max=(8, 4)), torch.float32)
    assert kw["opt_shape"] == (2, 4)
    assert len(notes) == 1 and "input 'x' dim 0: opt 1" in notes[0] and "TensorRT tunes for 2" in notes[0]


def test_tied_dims_share_a_name_and_int_inputs_keep_their_dtype():
    ids = InputSpec("ids", dtype="int64", min=(1, 16), opt=(4, 64), max=(8, 128), dim_names={0: "batch", 1: "seq"})
    mask = InputSpec("mask", dtype="int64", min=(1, 16), opt=(4, 64), max=(8, 128), dim_names={0: "batch", 1: "seq"})
    a, _ = input_kwargs(ids, ids.torch_dtype)
    b, _ = input_kwargs(mask, mask.torch_dtype)
    assert a["shared_dims"] == b["shared_dims"] == {0: "batch", 1: "seq"}
    assert a["dtype"] is torch.int64


# ------------------------------------------------------------------------------------------ keep patterns


class _Blocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3)
        self.layer1 = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
        self.head_norm = torch.nn.LayerNorm(2)


@pytest.mark.parametrize("pattern", ["head", "head*", "*head*", "layer1.?", "layer1.*", "*", "stem", "?tem"])
def test_keep_regex_matches_what_the_quantize_keep_rules_keep(pattern):
    """The autocast regex keeps exactly the modules the quantize step's keep rule would (descendants too)."""
    from torchopt.quantize.keep import KeepRule, resolve_keep

    model = _Blocks()
    names = [n for n, _ in model.named_modules() if n]
    regex = re.compile(keep_pattern_regex(pattern))
    assert {n for n in names if regex.match(n)} == set(resolve_keep(model, [KeepRule(pattern=pattern)]))


def test_keep_pattern_that_matches_nothing_names_nearby_modules():
    with pytest.raises(
        ValueError, match=r"tensorrt.autocast_keep: keep\[0\]: pattern 'haed' matches no module.*'head'"
    ):
        _check_keep_patterns(_Blocks(), ["haed"])


# ------------------------------------------------------------------------------------------ torch.export


class _FixedBatch(torch.nn.Module):
    def forward(self, x):
        return x.reshape(4, -1).sum(1)


class _SmallBatchOnly(torch.nn.Module):
    def forward(self, x):
        return x * 3 if x.shape[0] > 16 else x * 2


class _Pair(torch.nn.Module):
    def forward(self, a, b):
        return a + b


def test_export_keeps_the_profile_dims():
    spec = InputSpec("input", min=(1, 3), opt=(4, 3), max=(32, 3))  # nn.Linear.forward(input)
    program = export_profile(torch.nn.Linear(3, 2), [spec], device=CPU)
    (sym,) = [s for s in program.range_constraints]
    rng = program.range_constraints[sym]
    assert (int(rng.lower), int(rng.upper)) == (1, 32)
    out = program.module()(torch.randn(7, 3))
    assert out.shape == (7, 2)


def test_export_explains_a_dim_the_model_fixes():
    spec = InputSpec("x", min=(1, 3), opt=(4, 3), max=(32, 3))
    with pytest.raises(
        ValueError,
        match=r"input 'x' dim 0 is declared dynamic over \[1, 32\] but the model only works"
        r" with size 4: make it static in the InputSpec \(min = opt = max = 4\)",
    ):
        export_profile(_FixedBatch(), [spec], device=CPU)


def test_export_explains_a_range_the_model_narrows():
    spec = InputSpec("x", min=(1, 3), opt=(4, 3), max=(32, 3))
    with pytest.raises(
        ValueError,
        match=r"input 'x' dim 0 is declared dynamic over \[1, 32\] but the model does not"
        r" accept that whole range .*torch.export suggests x_dim0 = Dim\('x_dim0', max=16\)",
    ):
        export_profile(_SmallBatchOnly(), [spec], device=CPU)


def test_export_error_names_every_input_of_a_tied_dim():
    specs = [InputSpec(n, min=(1, 3), opt=(4, 3), max=(8, 3), dim_names={0: "batch"}) for n in ("a", "b")]
    err = explain_export_error(
        RuntimeError(
            "Constraints violated (batch)!\n  - You marked batch as dynamic but"
            " your code specialized it to be a constant (4)."
        ),
        specs,
    )
    assert isinstance(err, ValueError)
    assert "input 'a' dim 0 and input 'b' dim 0 is declared dynamic over [1, 8]" in str(err)
    program = export_profile(_Pair(), specs, device=CPU)  # tied dims export as one symbol
    assert len(program.range_constraints) == 1


def test_other_export_failures_keep_torch_words():
    err = explain_export_error(TypeError("unsupported operand"), [InputSpec("x", shape=(2, 3))], index=1)
    assert isinstance(err, RuntimeError) and "torch.export failed on profile 1 (TypeError: unsupported" in str(err)


# ------------------------------------------------------------------------------------- partition report


class _Partitioned(torch.nn.Module):
    """Shaped like Torch-TensorRT's output: `_run_on_acc_*` (TensorRT) and `_run_on_gpu_*` (PyTorch) blocks."""

    def __init__(self, acc: torch.nn.Module):
        super().__init__()
        self._run_on_acc_0 = acc
        self._run_on_gpu_1 = torch.fx.symbolic_trace(lambda x: torch.nonzero(x)[0] + torch.cumsum(x, 0))
        self._run_on_acc_2 = copy.deepcopy(acc)

    def forward(self, x):
        y = self._run_on_acc_0(x)
        z = self._run_on_gpu_1(y)
        return self._run_on_acc_2(torch.sort(z)[0])


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return qualname.startswith("_run_on") or super().is_leaf_module(m, qualname)


def _partitioned(acc: torch.nn.Module) -> torch.fx.GraphModule:
    root = _Partitioned(acc)
    return torch.fx.GraphModule(root, _LeafTracer().trace(root))


def test_partition_report_of_a_dry_run():
    acc = torch.fx.symbolic_trace(lambda x: torch.relu(x) * 2)  # a dry run leaves the TensorRT blocks as graphs
    report = partition_report(_partitioned(acc))
    assert report["tensorrt_blocks"] == 2 and report["pytorch_blocks"] == 1
    assert report["tensorrt_ops"] == 4  # relu and mul in each TensorRT block
    # nonzero/add/cumsum in the PyTorch block, sort inline in the parent (global partitioner); not getitem
    assert report["fallback_ops"] == {"_operator.add": 1, "torch.cumsum": 1, "torch.nonzero": 1, "torch.sort": 1}
    assert report["fully_in_tensorrt"] is False
    assert all(operator.getitem.__name__ not in k for k in report["fallback_ops"])


def test_partition_report_of_built_engines():
    class Engine(torch.nn.Module):  # stands for TorchTensorRTModule: an opaque block without a graph
        def forward(self, x):
            return x

    report = partition_report(_partitioned(Engine()))
    assert report["tensorrt_blocks"] == 2 and "tensorrt_ops" not in report


def test_fully_converted_graph():
    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._run_on_acc_0 = torch.nn.Identity()

        def forward(self, x):
            return self._run_on_acc_0(x)

    report = partition_report(torch.fx.GraphModule(Whole(), _LeafTracer().trace(Whole())))
    assert report == {"tensorrt_blocks": 1, "pytorch_blocks": 0, "fallback_ops": {}, "fully_in_tensorrt": True}


# ------------------------------------------------------------------------------------------- Q/DQ formats


def _quantized(preset: str) -> torch.nn.Module:
    from torchopt._compat import import_modelopt_quantization

    mtq = import_modelopt_quantization()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).eval()
    batches = [torch.randn(4, 128) for _ in range(2)]
    mtq.quantize(model, copy.deepcopy(getattr(mtq, preset)), lambda m: [m(b) for b in batches])
    return model


@pytest.mark.parametrize(
    ("preset", "capability", "fmt", "note"),
    [
        ("INT8_DEFAULT_CFG", (8, 0), "int8", None),
        ("FP8_DEFAULT_CFG", (9, 0), "fp8", None),
        ("FP8_DEFAULT_CFG", (8, 6), "fp8", "needs a GPU of compute capability sm_89+"),
    ],
)
def test_quantized_models_are_checked_before_the_build(preset, capability, fmt, note):
    got_fmt, got_note = _check_quantized(_quantized(preset), capability)
    assert got_fmt == fmt
    assert (got_note is None) if note is None else (note in got_note)


def test_formats_tensorrt_cannot_convert_are_an_error():
    with pytest.raises(ValueError, match="quantized to 'int4_awq', which Torch-TensorRT 2.13 cannot convert"):
        _check_quantized(_quantized("INT4_AWQ_CFG"), (9, 0))


def test_quantized_export_needs_cuda():
    spec = InputSpec("input", min=(1, 128), opt=(4, 128), max=(8, 128))
    with pytest.raises(ValueError, match="export_quantized needs the model and the example inputs on CUDA"):
        export_profile(_quantized("INT8_DEFAULT_CFG"), [spec], device=CPU, quantized=True)


# ------------------------------------------------------------------------------------ where TRT is absent


def test_registered_and_unavailable_on_cpu_with_how_to_install():
    assert "tensorrt" in BACKENDS
    why = BACKENDS["tensorrt"].unavailable_reason(CPU)
    assert "a CUDA device (the recipe runs on cpu)" in why and "pip install torch-tensorrt" in why
    with pytest.raises(RuntimeError, match="backend 'tensorrt' was requested but is unavailable on cpu: .*pip install"):
        choose_backend("tensorrt", CPU)


def test_explicit_tensorrt_recipe_fails_before_any_work():
    recipe = Recipe([CompileConfig(backend="tensorrt"), ValidateConfig(measure_latency=False)])
    model = torch.nn.Linear(4, 2)
    with pytest.raises(RuntimeError, match="Torch-TensorRT is missing a CUDA device"):
        torchopt.optimize(model, recipe, inputs=[InputSpec("input", min=(1, 4), max=(8, 4))], progress=False)


def test_builtin_tensorrt_recipes_load():
    fp16 = torchopt.recipes.get("tensorrt-fp16")
    assert fp16.step("compile").backend == "tensorrt" and fp16.step("cast").dtype == "float16"
    int8 = torchopt.recipes.get("tensorrt-int8")
    assert [s.step for s in int8.steps] == ["cast", "quantize", "compile", "validate"]
    assert int8.step("quantize").format == "int8" and int8.step("compile").backend == "tensorrt"
