"""How a prepared module runs: the `Runtime` record and the `Dispatch` that calls one runner per profile.

`Runtime` is what a backend builds for and what saving writes out: the device, the compute dtype floating inputs
are cast to, whether the module holds Q/DQ quantizers, and whether floating outputs go back to float32.
`Dispatch` is the call path of an optimized module: inputs are checked against the profiles before any backend
sees them, the matching profile's runner runs under no_grad, and outputs are cast back. `OptimizedModule` and
the `validate` step both call through it, so what is validated is exactly what the user calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from torchopt.config import DTYPES, check_type, dtype_name
from torchopt.inputs import InputSpec, check_call

__all__ = ["Dispatch", "Runtime", "cast_floats", "map_tensors"]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and in which precision a prepared module runs.

    device: the device of the module and of its inputs.
    dtype: the compute dtype floating inputs are cast to (float32 unless a cast step changed it).
    quantized: the module holds ModelOpt Q/DQ quantizers.
    cast_outputs: floating outputs are returned in float32, as the original model returns them.
    calib_fingerprint: the calibration data's fingerprint (keys the TensorRT engine cache), None when unquantized.
    lowp: the real low-precision mode its Linear GEMMs run (`torchopt.quantize.LOWP_MODES`), None when none.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    quantized: bool = False
    cast_outputs: bool = True
    calib_fingerprint: str | None = None
    lowp: str | None = None

    def __post_init__(self) -> None:
        check_type("Runtime.device", self.device, torch.device)
        check_type("Runtime.dtype", self.dtype, torch.dtype)
        check_type("Runtime.quantized", self.quantized, bool)
        check_type("Runtime.cast_outputs", self.cast_outputs, bool)
        if self.lowp is not None:
            check_type("Runtime.lowp", self.lowp, str, "a low-precision mode name or None")

    @property
    def casts_outputs(self) -> bool:
        """Whether outputs are cast back (only a module computing below float32 changes them)."""
        return self.cast_outputs and self.dtype != torch.float32

    def adapt(self, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs as the prepared module expects them: on its device, floats in its compute dtype."""
        return [a.to(self.device, self.dtype) if a.is_floating_point() else a.to(self.device) for a in args]

    def examples(self, profile: list[InputSpec], which: str = "opt", seed: int = 0) -> list[torch.Tensor]:
        """Seeded random inputs at a profile point, adapted to the prepared module."""
        return self.adapt([s.example(which, seed=seed + i) for i, s in enumerate(profile)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": dtype_name(self.dtype),
            "quantized": self.quantized,
            "cast_outputs": self.cast_outputs,
            "calib_fingerprint": self.calib_fingerprint,
            "lowp": self.lowp,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], device: torch.device) -> Runtime:
        return cls(
            device=device,
            dtype=DTYPES[data["dtype"]],
            quantized=data["quantized"],
            cast_outputs=data["cast_outputs"],
            calib_fingerprint=data.get("calib_fingerprint"),
            lowp=data.get("lowp"),
        )


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """`tree` (tensors in tuples, lists, namedtuples, dicts) with `fn` applied to every tensor; other leaves kept.
    Containers are rebuilt with their own type (a namedtuple stays that namedtuple)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple: its constructor takes the fields
        return type(tree)(*(map_tensors(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    if isinstance(tree, dict):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    return tree


def cast_floats(out: Any, dtype: torch.dtype) -> Any:
    """`out` with every floating tensor in it (tensors, lists, tuples, namedtuples, dicts) cast to `dtype`."""
    return map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, out)


class Dispatch:
    """Call the runner of the profile that contains the inputs (given flat, in the profile's order)."""

    def __init__(self, runners: list[Callable[..., Any]], profiles: list[list[InputSpec]], runtime: Runtime):
        if len(runners) != len(profiles):
            raise ValueError(f"{len(runners)} runners for {len(profiles)} profiles; one runner per profile")
        self.runners = runners
        self.profiles = profiles
        self.runtime = runtime

    def __call__(self, *inputs: Any) -> Any:
        index = check_call(self.profiles, inputs, self.runtime.device)
        inputs = [a.to(self.runtime.dtype) if a.is_floating_point() else a for a in inputs]
        # Runners were compiled under no_grad; calling them with grad enabled would change dynamo's global
        # state guard and recompile. The optimized module is for inference.
        with torch.no_grad():
            out = self.runners[index](*inputs)
        return cast_floats(out, torch.float32) if self.runtime.casts_outputs else out
