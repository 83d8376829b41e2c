"""Save and load optimized modules.

A saved optimized module is a directory:

    meta.json      format version, recipe, profiles, precision, backend, the report
    module.pt2     the prepared (cast / quantized) eager module as a `torch.export` program with the profiles'
                   dynamic dims, so loading needs no Python class; or
    module.pt      the pickled module (`torch.save`) when it cannot be exported (the class must be importable)

Loading rebuilds the compiled runners by running the recipe's compile step again on the loaded module, with
the backend that was saved (an `auto` choice is not timed again: loading restores what was saved).
Backends with their own serialized format (TensorRT engines) add their files next to these (`Backend.save`,
listed under "backend_files" in meta.json) and rebuild the runners from them (`Backend.load`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from torchopt.inputs import InputSpec

if TYPE_CHECKING:
    from torchopt.engine import OptimizedModule

__all__ = ["FORMAT_VERSION", "export_dynamic_shapes", "export_program", "load", "save"]

FORMAT_VERSION = 1


def export_dynamic_shapes(profiles: list[list[InputSpec]]) -> dict[str, dict[int, object]]:
    """`torch.export` dynamic_shapes covering every profile (one Dim per named dim, union of the ranges)."""
    from torch.export import Dim  # noqa: PLC0415

    ranges: dict[str, tuple[int, int]] = {}
    for prof in profiles:
        for s in prof:
            for d in s.dynamic_dims:
                name = s.dim_name(d)
                lo, hi = ranges.get(name, (s.min[d], s.max[d]))
                ranges[name] = (min(lo, s.min[d]), max(hi, s.max[d]))
    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in ranges.items()}
    return {s.name: {d: dims[s.dim_name(d)] for d in s.dynamic_dims} for s in profiles[0]}


def _export_args(profiles: list[list[InputSpec]], device: torch.device, dtype: torch.dtype):
    """Examples at the opt point with every dynamic dim >= 2 (export specializes sizes 0 and 1)."""
    args = []
    for s in profiles[0]:
        shape = tuple(max(2, o) if d in s.dynamic_dims else o for d, o in enumerate(s.opt))
        shape = tuple(min(v, mx) for v, mx in zip(shape, s.max, strict=True))
        t = torch.rand(shape) if s.torch_dtype.is_floating_point else torch.randint(0, 2, shape)
        t = t.to(device=device, dtype=dtype if s.torch_dtype.is_floating_point else s.torch_dtype)
        args.append(t)
    return tuple(args)


def export_program(
    module: torch.nn.Module,
    profiles: list[list[InputSpec]],
    device: torch.device,
    dtype: torch.dtype,
    quantized: bool,
) -> torch.export.ExportedProgram:
    """`torch.export` of a prepared module over `profiles`' dynamic dims (examples from `_export_args`).

    Q/DQ models go through ModelOpt's `export_torch_mode()` (`torchopt.quantize.export_quantized`, CUDA only),
    so their quantizers become `tensorrt::quantize_op` nodes.
    """
    args = _export_args(profiles, device, dtype)
    dynamic = export_dynamic_shapes(profiles)
    with torch.no_grad():
        if quantized:
            from torchopt.quantize import export_quantized  # noqa: PLC0415

            return export_quantized(module, args, dynamic_shapes=dynamic)
        return torch.export.export(module, args, dynamic_shapes=dynamic)


def save(optimized: OptimizedModule, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"path {str(path)!r} cannot be created as a directory: {exc}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"path {str(path)!r} is not writable")
    module = optimized.module
    fmt = "pickle"
    try:
        program = export_program(module, optimized.profiles, optimized._device, optimized._dtype, optimized._quantized)
        with warnings.catch_warnings():
            # torch.export.save warns about channels_last (non-contiguous) weights on CPU; they save correctly.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(program, path / "module.pt2")
        fmt = "export"
    except Exception as exc:  # export has many failure modes; the pickle keeps the module loadable anyway
        reason = f"torch.export failed ({type(exc).__name__}: {exc})"[:300]
        try:
            torch.save(module, path / "module.pt")
        except Exception as pickle_exc:
            raise ValueError(
                f"cannot save this optimized module: {reason}; pickling failed too ({pickle_exc})."
                + (
                    " Quantized models export on CUDA only; on CPU keep the calibrated state with"
                    " QuantizeConfig(cache_dir=...) and rebuild with torchopt.optimize."
                    if optimized._quantized
                    else ""
                )
            ) from exc
        optimized.report.notes.append(f"saved as a pickle: {reason}")
    meta = {
        "format_version": FORMAT_VERSION,
        "module_format": fmt,
        "recipe": optimized.recipe.to_dict(),
        "profiles": [[s.to_dict() for s in p] for p in optimized.profiles],
        "dtype": str(optimized._dtype).removeprefix("torch."),
        "quantized": optimized._quantized,
        "cast_outputs": optimized._cast_outputs,
        "report": optimized.report.to_dict(),
    }
    from torchopt.backends import BACKENDS  # noqa: PLC0415

    backend = BACKENDS.get(optimized.report.backend)
    backend_meta = backend.save(optimized, path) if backend is not None else None
    if backend_meta is not None:  # the backend's own files (e.g. TensorRT engines) replace a rebuild on load
        meta["backend_files"] = {"backend": backend.name, **backend_meta}
    (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def load(path: str | os.PathLike, *, device: torch.device | str | None = None) -> OptimizedModule:
    from torchopt.engine import OptimizedModule, StepContext, _resolve_device  # noqa: PLC0415
    from torchopt.recipe import Recipe, get_handler  # noqa: PLC0415
    from torchopt.report import OptimizeReport  # noqa: PLC0415

    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"path {str(path)!r} is not a saved torchopt module (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if meta["module_format"] == "export":
        module = torch.export.load(path / "module.pt2").module()
    else:
        module = torch.load(path / "module.pt", weights_only=False)
    dev = _resolve_device(device, module)
    module = module.to(dev)
    recipe = Recipe.from_dict(meta["recipe"])
    profiles = [[InputSpec.from_dict(s) for s in p] for p in meta["profiles"]]
    saved = meta["report"]
    report = OptimizeReport(recipe=recipe.name, device=str(dev), profiles=meta["profiles"])
    report.notes.append(f"loaded from {path}")
    ctx = StepContext(model=module, profiles=profiles, device=dev, calib_data=None, report=report, progress=False)
    ctx.set_precision(saved["precision"], saved["precision_reason"])
    ctx.dtype = getattr(torch, meta["dtype"])  # the inputs' dtype (differs from the precision under autocast)
    ctx.quantized = bool(meta["quantized"])
    ctx.cast_outputs = bool(meta["cast_outputs"])
    compile_step = recipe.step("compile")
    backend_files = meta.get("backend_files")
    if backend_files is not None:
        from torchopt.backends import get_backend  # noqa: PLC0415

        ctx.runners = get_backend(backend_files["backend"]).load(path, backend_files, ctx)
    elif compile_step is not None and saved["backend"] != "eager":
        get_handler(compile_step)(dataclasses.replace(compile_step, backend=saved["backend"]), ctx)
    ctx.set_backend(saved["backend"], f"restored from {path} ({saved['backend_reason']})")
    runners = ctx.runners or [module for _ in profiles]
    return OptimizedModule(module, runners, profiles, recipe, report, ctx)
