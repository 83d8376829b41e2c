"""Recipe construction from Python, dicts and YAML; built-ins; clear errors for bad recipes."""

import pytest

import torchopt
from torchopt import Recipe
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig


def test_python_dict_yaml_round_trip(tmp_path):
    recipe = Recipe(
        [CastConfig(dtype="float16"), CompileConfig(backend="eager"), ValidateConfig(min_cosine=0.9)], name="mine"
    )
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    path = tmp_path / "mine.yaml"
    recipe.to_yaml(path)
    assert Recipe.from_yaml(path) == recipe


def test_builtins_listed_and_loadable():
    names = torchopt.recipes.available()
    assert {"default", "eager-fp32", "inductor-fp32", "inductor-fp16", "inductor-bf16"} <= set(names)
    for name in names:
        recipe = torchopt.recipes.get(name)
        assert recipe.name == name and recipe.description and recipe.steps


def test_unknown_recipe_lists_available():
    with pytest.raises(ValueError, match=r"unknown recipe 'defualt' \(did you mean 'default'\?\); available recipes:"):
        torchopt.recipes.get("defualt")


def test_unknown_step_and_key():
    with pytest.raises(ValueError, match=r"unknown step 'compil' at recipe.steps\[0\] \(did you mean 'compile'\?\)"):
        Recipe.from_dict({"steps": [{"compil": {}}]})
    with pytest.raises(ValueError, match=r"unknown key 'backnd' in recipe.steps\[0\].compile .*valid keys"):
        Recipe.from_dict({"steps": [{"compile": {"backnd": "eager"}}]})
    with pytest.raises(ValueError, match="unknown key 'step' in recipe"):
        Recipe.from_dict({"step": []})


def test_bad_values():
    with pytest.raises(ValueError, match=r"compile.backend must be one of .* got 'tensorrtt'"):
        Recipe.from_dict({"steps": [{"compile": {"backend": "tensorrtt"}}]})
    with pytest.raises(ValueError, match="cast.dtype must be one of"):
        CastConfig(dtype="int3")
    with pytest.raises(ValueError, match="after 'compile'"):
        Recipe([CompileConfig(), CastConfig()])
    with pytest.raises(ValueError, match="2 'compile' steps"):
        Recipe([CompileConfig(), CompileConfig()])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps:\n  - cast: {dtype: float16\n  - compile: {}\n")
    with pytest.raises(ValueError, match=r"malformed YAML in recipe file '.*bad.yaml' line 3"):
        Recipe.from_yaml(path)


def test_yaml_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text("steps:\n  - compile: {backend: eager}\n")
    assert Recipe.from_yaml(path).name == "fast"
