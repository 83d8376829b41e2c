"""Model specs for the CLI: torchvision names with random weights, module:callable, file.py:callable."""

import pytest
import torch

from torchopt.models import demo_inputs, load_model


def test_torchvision_name_random_weights():
    model = load_model("resnet18")
    assert type(model).__name__ == "ResNet" and not model.training


def test_module_callable_and_file(tmp_path):
    assert isinstance(load_model("torch.nn:Identity"), torch.nn.Identity)
    f = tmp_path / "net_def.py"
    f.write_text("import torch\nmodel = torch.nn.Linear(2, 3)\n")
    assert isinstance(load_model(f"{f}:model"), torch.nn.Linear)


def test_bad_specs():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        load_model("resnet05")
    with pytest.raises(ValueError, match="has no attribute 'Linearr'"):
        load_model("torch.nn:Linearr")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_model("no_such_module_xyz:thing")
    with pytest.raises(TypeError, match="must give a torch.nn.Module"):
        load_model("math:pi")


def test_demo_inputs():
    (spec,) = demo_inputs((1, 4, 8))
    assert spec.min[0] == 1 and spec.opt[0] == 4 and spec.max[0] == 8 and spec.min[1:] == (3, 224, 224)
