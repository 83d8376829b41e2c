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

from torchopt.export import export_program
from torchopt.inputs import InputSpec
from torchopt.quantize import export_quantized

if TYPE_CHECKING:
    from torchopt.engine import OptimizedModule

__all__ = ["FORMAT_VERSION", "DamagedSaveError", "load", "save"]

FORMAT_VERSION = 1
# meta.json keys `load` reads, with the JSON types they must have.
_META_KEYS: dict[str, type | tuple[type, ...]] = {
    "module_format": str,
    "recipe": dict,
    "profiles": list,
    "dtype": str,
    "quantized": bool,
    "cast_outputs": bool,
    "report": dict,
}
_MODULE_FILES = {"export": "module.pt2", "pickle": "module.pt"}


class DamagedSaveError(ValueError):
    """A saved torchopt module whose files are missing, truncated or not what `save` writes."""


def save(optimized: OptimizedModule, path: str | os.PathLike) -> Path:
    from torchopt.engine import OptimizedModule  # noqa: PLC0415

    if not isinstance(optimized, OptimizedModule):
        raise TypeError(
            f"save needs the OptimizedModule that torchopt.optimize returned, got {type(optimized).__name__}"
        )
    path = _as_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"path {str(path)!r} cannot be created as a directory: {exc}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"path {str(path)!r} is not writable")
    module = optimized.module
    fmt = "pickle"
    try:
        program = export_program(
            module,
            optimized.profiles,
            optimized._device,
            optimized._dtype,
            export_fn=export_quantized if optimized._quantized else None,
        )
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

    path = _as_path(path)
    meta = _read_meta(path)
    module = _read_module(path, meta["module_format"])
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


def _as_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory), got {type(path).__name__} {path!r}")
    return Path(path)


def _damaged(file: Path, what: str) -> DamagedSaveError:
    return DamagedSaveError(f"{str(file)!r} is damaged: {what}; save the optimized module again")


def _read_meta(path: Path) -> dict:
    """meta.json as a dict with every key `load` reads; DamagedSaveError naming the file otherwise."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"path {str(path)!r} is not a saved torchopt module (no meta.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(meta_file, f"not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _damaged(meta_file, f"it holds a JSON {type(meta).__name__}, not the object torchopt writes")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise _damaged(meta_file, f"keys {missing} are missing")
    for key, types_ in _META_KEYS.items():
        if not isinstance(meta[key], types_):
            raise _damaged(meta_file, f"{key!r} is a {type(meta[key]).__name__}")
    if meta["module_format"] not in _MODULE_FILES:
        raise _damaged(meta_file, f"module_format is {meta['module_format']!r}, expected one of {list(_MODULE_FILES)}")
    return meta


def _read_module(path: Path, module_format: str) -> torch.nn.Module:
    """The saved eager module (an exported program's module, or the pickle); DamagedSaveError naming the file."""
    file = path / _MODULE_FILES[module_format]
    if not file.is_file():
        raise _damaged(path, f"{file.name} is missing (meta.json says module_format {module_format!r})")
    try:
        if module_format == "export":
            return torch.export.load(file).module()
        return torch.load(file, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        if module_format == "export":
            raise _damaged(file, f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from exc
        raise ValueError(
            f"{str(file)!r} is a pickled module whose class cannot be imported here ({exc}); import the"
            " package that defines the model first"
        ) from exc
    except Exception as exc:  # zipfile, pickle, EOF and torch's own errors: all mean the file is unreadable
        raise _damaged(file, f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from exc
