"""`ModuleSnapshot`: a module tree put back as it was when a quantization fails half way.

``mtq.quantize`` converts a model in place (module classes swapped, quantizer submodules and hooks added) and
some calibration algorithms rewrite weights in place (SmoothQuant and AWQ fold their scales into them), so an
error in a later calibration batch, or one raised by ModelOpt after the conversion, would leave the caller's
model half quantized, and every later `quantize` refuses a model that already carries quantizers.

The snapshot keeps, per module, its class and a copy of its attribute dict (the parameter, buffer, submodule
and hook tables included), and per parameter and buffer its storage and a CPU copy of its values: restoring
puts the classes, tables and storages back and copies the values in, so the caller's objects are the ones
they were. The CPU copy costs host memory the size of the model, for the duration of the quantization.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ModuleSnapshot"]


def _copy_tables(attributes: dict[str, Any]) -> dict[str, Any]:
    # The tables nn.Module keeps (_parameters, _modules, _forward_hooks, ...) are changed in place: copy them.
    return {k: v.copy() if isinstance(v, (dict, list, set)) else v for k, v in attributes.items()}


class ModuleSnapshot:
    """The state of `model` and every module under it, restorable with `restore()`.

    Example::

        snapshot = ModuleSnapshot(model)
        try:
            model = mtq.quantize(model, cfg, loop)
        except BaseException:
            snapshot.restore()
            raise
    """

    def __init__(self, model: torch.nn.Module):
        self._modules = [(m, type(m), _copy_tables(vars(m))) for m in model.modules()]
        self._tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        seen: set[int] = set()
        for module in model.modules():
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                self._tensors.append((tensor, tensor.data, tensor.detach().to("cpu", copy=True)))

    def restore(self) -> None:
        """Put every module's class, attributes, parameters and buffers back as they were at the snapshot."""
        for module, cls, attributes in self._modules:
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(_copy_tables(attributes))
        with torch.no_grad():
            for tensor, storage, values in self._tensors:
                tensor.data = storage
                storage.copy_(values)
