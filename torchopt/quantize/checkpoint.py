"""Save and restore a ModelOpt-quantized module without `torch.export` (which fails on CPU for Q/DQ models).

A converted module cannot be pickled as is: ModelOpt swaps each quantized layer's class for one it generates at
run time (`modelopt.torch.opt.dynamic.QuantConv2d`), which pickle cannot find by name. So the checkpoint holds
what ModelOpt's own `mto.save` / `mto.restore` need, plus the architecture they leave to the caller:

    float_module     a copy of the module with every ModelOpt conversion undone (`DynamicModule.export`): the
                     user's classes only, so it pickles like any model (its class must be importable to load)
    modelopt_state   `mto.modelopt_state(module)`: the modes and quantizer configs ModelOpt re-applies
    state_dict       the quantized module's weights and calibrated amax values

`save_quantized` writes it with `torch.save`; `load_quantized` rebuilds the quantizers on the float copy
(`mto.restore_from_modelopt_state`) and loads the state dict: the restored module computes exactly what the
saved one did.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization

__all__ = ["CHECKPOINT_KEYS", "float_copy", "load_quantized", "pack_quantized", "save_quantized", "unpack_quantized"]

CHECKPOINT_KEYS = ("float_module", "modelopt_state", "state_dict")


def _modelopt_opt() -> Any:
    """``modelopt.torch.opt``, after the import that names ModelOpt clearly when it is missing."""
    import_modelopt_quantization()
    import modelopt.torch.opt as mto  # noqa: PLC0415

    return mto


def pack_quantized(module: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint of a ModelOpt-converted module (see the module docstring); `module` is left unchanged."""
    mto = _modelopt_opt()
    from modelopt.torch.opt.conversion import ModeloptStateManager  # noqa: PLC0415

    if not ModeloptStateManager.is_converted(module):
        raise ValueError(
            f"module ({type(module).__name__}) holds no ModelOpt conversion; save it as a plain module instead"
        )
    state = mto.modelopt_state(module)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"float_module": float_copy(module), "modelopt_state": state, "state_dict": weights}


def float_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `module` with every ModelOpt conversion undone (`DynamicModule.export`): the user's classes
    with the current weights (SmoothQuant's, when it ran), no quantizer; `module` is left unchanged."""
    _modelopt_opt()
    from modelopt.torch.opt.conversion import ModeloptStateManager  # noqa: PLC0415
    from modelopt.torch.opt.dynamic import DynamicModule  # noqa: PLC0415

    copied = copy.deepcopy(module)
    for sub in list(copied.modules()):
        while isinstance(sub, DynamicModule):  # one export per conversion level, back to the user's class
            sub = sub.export()
    for sub in copied.modules():
        for attr in [a for a in vars(sub) if a.startswith(ModeloptStateManager._state_key)]:
            delattr(sub, attr)  # restore_from_modelopt_state refuses a module that still carries a state
        forward = vars(sub).get("forward")
        if getattr(getattr(forward, "__func__", None), "__module__", "").startswith("modelopt"):
            del sub.forward  # AWQ calibration leaves ModelOpt's forward bound on the instance, past the export
    return copied


def unpack_quantized(checkpoint: dict[str, Any]) -> torch.nn.Module:
    """The quantized module a `pack_quantized` checkpoint describes, on the CPU."""
    mto = _modelopt_opt()
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"the quantized-module checkpoint lacks {missing}; it holds {sorted(checkpoint)}")
    module = mto.restore_from_modelopt_state(checkpoint["float_module"], checkpoint["modelopt_state"])
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def save_quantized(module: torch.nn.Module, file: str | os.PathLike) -> None:
    """Write `pack_quantized(module)` to `file` (`torch.save`)."""
    torch.save(pack_quantized(module), file)


def load_quantized(file: str | os.PathLike) -> torch.nn.Module:
    """The quantized module `save_quantized` wrote, on the CPU; ImportError naming ModelOpt when it is missing
    (checked before the file is read: the checkpoint refers to ModelOpt's classes)."""
    _modelopt_opt()
    checkpoint = torch.load(file, weights_only=False, map_location="cpu")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"it holds a {type(checkpoint).__name__}, not the checkpoint save_quantized writes")
    return unpack_quantized(checkpoint)
