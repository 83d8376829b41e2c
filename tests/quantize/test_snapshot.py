"""ModuleSnapshot: a module tree put back as it was (classes, tables, hooks, the same tensors, their values)."""

import torch

from torchopt.quantize.snapshot import ModuleSnapshot


class _Swapped(torch.nn.Linear):
    pass


def test_restore_puts_classes_tables_and_values_back_on_the_same_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    weight, before = model[0].weight, model[0].weight.detach().clone()
    mean = model[1].running_mean.detach().clone()
    snapshot = ModuleSnapshot(model)

    # What a failed quantization leaves behind: a swapped class, a new submodule and hook, rewritten values.
    model[0].__class__ = _Swapped
    model[0].add_module("quantizer", torch.nn.Identity())
    model[0].register_forward_hook(lambda *a: None)
    with torch.no_grad():
        weight.mul_(3)
        model[1].running_mean.add_(1)
    model[0].weight.data = torch.zeros(4, 4)

    snapshot.restore()
    assert type(model[0]) is torch.nn.Linear and "quantizer" not in model[0]._modules
    assert not model[0]._forward_hooks
    assert model[0].weight is weight and torch.equal(weight, before)
    assert torch.equal(model[1].running_mean, mean)
