"""Every config dataclass round-trips through a dict and JSON; unknown keys and bad values are clear errors."""

import dataclasses
import importlib
import json
import pkgutil

import pytest
import torch

import torchopt
from torchopt.config import (
    FLOAT_DTYPES,
    ConfigBase,
    check_choice,
    check_positive,
    check_range,
    check_type,
    error_line,
    first_few,
    first_line,
    parse_dtype,
    resolve_device,
)
from torchopt.profile import LatencyConfig


def _all_configs() -> list[type[ConfigBase]]:
    for pkg in ("torchopt", "torchopt.recipes"):
        module = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(module.__path__, prefix=pkg + "."):
            if not info.name.endswith("__main__"):  # importing __main__ would run the CLI
                importlib.import_module(info.name)
    seen, stack = [], list(ConfigBase.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if dataclasses.is_dataclass(cls) and cls not in seen:
            seen.append(cls)
    return seen


def _defaults_constructible(cls) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(cls)
        if f.init
    )


CONFIGS = [c for c in _all_configs() if _defaults_constructible(c)]


def test_configs_found():
    names = {c.__name__ for c in CONFIGS}
    assert {"CastConfig", "CompileConfig", "ValidateConfig", "InductorConfig", "Recipe"} <= names


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_round_trip_json(cls):
    cfg = cls()
    data = json.loads(json.dumps(cfg.to_dict()))
    assert cls.from_dict(data) == cfg


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_unknown_key_names_key_and_valid_ones(cls):
    with pytest.raises(ValueError, match=r"unknown key 'no_such_option'.*valid keys"):
        cls.from_dict({"no_such_option": 1})


def test_input_spec_round_trip():
    spec = torchopt.InputSpec("ids", dtype="int64", min=(1, 16), opt=(4, 64), max=(8, 128), dim_names={0: "batch"})
    assert torchopt.InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_check_helpers_messages():
    with pytest.raises(TypeError, match=r"iters must be int, got str 'x'"):
        check_type("iters", "x", int)
    with pytest.raises(TypeError, match="got bool"):
        check_positive("iters", True)
    with pytest.raises(ValueError, match=r"iters must be > 0, got 0"):
        check_positive("iters", 0)
    with pytest.raises(ValueError, match=r"did you mean 'inductor'"):
        check_choice("backend", "inductr", ["eager", "inductor"])


def test_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="must be a mapping"):
        torchopt.recipes.CastConfig.from_dict(["float16"])


# ------------------------------------------------------------------ the one vocabulary and the shared checks


def test_parse_dtype_takes_names_aliases_and_torch_dtypes():
    assert [parse_dtype("d", v) for v in ("fp16", "half", "float16", torch.float16)] == ["float16"] * 4
    assert parse_dtype("d", "bf16", FLOAT_DTYPES) == "bfloat16" and parse_dtype("d", "long") == "int64"
    with pytest.raises(
        ValueError, match=r"cast.dtype must be one of \['float32', 'float16', 'bfloat16'\], got 'int64'"
    ):
        parse_dtype("cast.dtype", "long", FLOAT_DTYPES)
    with pytest.raises(ValueError, match=r"dtype torch.complex64 is not supported"):
        parse_dtype("d", torch.complex64)
    with pytest.raises(TypeError, match=r"d must be a torch.dtype or a dtype name, got int 3"):
        parse_dtype("d", 3)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("device", None).type == expected and resolve_device("device", "auto").type == expected
    assert resolve_device("device", "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'gpu' is not a valid device string"):
        resolve_device("device", "gpu")
    with pytest.raises(ValueError, match=r"device type must be one of \['cpu', 'cuda'\], got 'meta'"):
        resolve_device("device", "meta")
    with pytest.raises(TypeError, match=r"device must be a device like 'cpu'"):
        resolve_device("device", 1.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda:1' needs CUDA, but CUDA is not available"):
            resolve_device("device", "cuda:1")


def test_check_range_names_the_interval():
    check_range("x", 0.5, low=0, high=1)
    check_range("x", 1, low=0, high=1)
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\), got 1"):
        check_range("x", 1, low=0, high=1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"x must be in \[2, inf\], got 1"):
        check_range("x", 1, low=2)
    with pytest.raises(TypeError, match=r"x must be int, got bool True"):
        check_range("x", True, low=0, types_=int)


def test_merge_is_the_one_way_to_apply_overrides():
    base = LatencyConfig(iters=7)
    assert LatencyConfig.merge(base) is base
    assert LatencyConfig.merge(base, warmup=2) == LatencyConfig(iters=7, warmup=2)
    assert LatencyConfig.merge(None, iters=3) == LatencyConfig(iters=3)
    with pytest.raises(ValueError, match=r"unknown key 'iter' in latency options \(did you mean 'iters'\?\)"):
        LatencyConfig.merge(None, where="latency options", iter=3)
    with pytest.raises(TypeError, match=r"config must be LatencyConfig, got dict"):
        LatencyConfig.merge({"iters": 3})


def test_first_few_names_a_long_list_by_its_first_names_and_a_count():
    assert first_few(["a", "b"]) == "a, b"
    assert first_few(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"
    assert first_few(["a", "b", "c"], shown=1) == "a and 2 more"


def test_first_line_of_an_error_is_its_message_start_or_its_type():
    assert first_line(ValueError("bad value\n  at line 3")) == "bad value"
    assert first_line(RuntimeError("  \n")) == "RuntimeError"
    assert first_line(ValueError("x" * 500)) == "x" * 300
    assert first_line(ValueError("abcdef"), limit=3) == "abc"
    assert error_line(KeyError("k")) == "KeyError: 'k'"
    assert error_line(OSError()) == "OSError: OSError"
