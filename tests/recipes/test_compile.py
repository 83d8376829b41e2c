"""The compile step's config: the shared options plus one field per backend with a config class, from the
registry; nested settings given as dicts become their config class, with errors that name where."""

import dataclasses

import pytest

from torchopt import Recipe
from torchopt.backends import BACKENDS, InductorConfig, TensorRTConfig
from torchopt.recipes import CompileConfig


def test_fields_come_from_the_backend_registry():
    names = [f.name for f in dataclasses.fields(CompileConfig)]
    per_backend = [name for name, b in BACKENDS.items() if b.config_class is not None]
    assert names == ["backend", "cuda_graphs", "lowp", *per_backend]
    assert per_backend == ["inductor", "tensorrt"]
    cfg = CompileConfig()
    assert isinstance(cfg.inductor, InductorConfig) and isinstance(cfg.tensorrt, TensorRTConfig)


def test_settings_hand_each_backend_its_own_config():
    cfg = CompileConfig(backend="inductor", cuda_graphs=False, inductor={"mode": "max-autotune"})
    assert cfg.inductor == InductorConfig(mode="max-autotune")
    assert cfg.settings("inductor").config is cfg.inductor and cfg.settings("inductor").cuda_graphs is False
    assert cfg.settings("eager").config is None


def test_round_trip_and_errors_name_the_nested_option():
    cfg = CompileConfig.from_dict({"backend": "eager", "tensorrt": {"optimization_level": 2}})
    assert CompileConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown key 'mod' in compile.inductor \(did you mean 'mode'\?\)"):
        CompileConfig(inductor={"mod": "default"})
    with pytest.raises(TypeError, match=r"compile.tensorrt must be TensorRTConfig, got int 3"):
        CompileConfig(tensorrt=3)
    with pytest.raises(ValueError, match=r"compile.backend must be one of \['auto', 'eager', 'inductor'"):
        CompileConfig(backend="onnx")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"inductor": {"mode": "fastest"}}, r"inductor.mode must be one of"),
        ({"inductor": {"full_graph": True}}, r"unknown key 'full_graph' in .*compile.inductor \(did you mean"),
        ({"tensorrt": {"workspace": 1}}, r"unknown key 'workspace' in .*compile.tensorrt \(did you mean"),
        ({"backend": "tensorrtt"}, r"compile.backend must be one of .* \(did you mean 'tensorrt'\?\)"),
    ],
)
def test_unknown_build_settings_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"steps": [{"compile": options}]})
