"""Every config dataclass round-trips through a dict and JSON; unknown keys and bad values are clear errors."""

import dataclasses
import importlib
import json
import pkgutil

import pytest

import torchopt
from torchopt.config import ConfigBase, check_choice, check_positive, check_type


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
