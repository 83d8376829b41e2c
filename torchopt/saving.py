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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchopt.backends import BuildLog, get_backend
from torchopt.config import resolve_device
from torchopt.export import export_program
from torchopt.inputs import InputSpec
from torchopt.quantize import export_quantized
from torchopt.recipe import Recipe
from torchopt.report import OptimizeReport
from torchopt.runtime import Runtime

__all__ = ["FORMAT_VERSION", "DamagedSaveError", "Loaded", "load", "save"]

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


@dataclasses.dataclass
class Loaded:
    """What `load` read back: the parts `torchopt.load` assembles into an `OptimizedModule`."""

    module: torch.nn.Module
    runners: list[Callable[..., Any]]
    profiles: list[list[InputSpec]]
    recipe: Recipe
    report: OptimizeReport
    runtime: Runtime


def save(optimized: Any, path: str | os.PathLike) -> Path:
    """Write an `OptimizedModule` (its prepared module, runners, profiles, recipe, report and runtime)."""
    if not isinstance(getattr(optimized, "runtime", None), Runtime):
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
    runtime: Runtime = optimized.runtime
    fmt = _write_module(optimized.module, optimized.profiles, runtime, optimized.report, path)
    meta = {
        "format_version": FORMAT_VERSION,
        "module_format": fmt,
        "recipe": optimized.recipe.to_dict(),
        "profiles": [[s.to_dict() for s in p] for p in optimized.profiles],
        **runtime.to_dict(),
        "report": optimized.report.to_dict(),
    }
    backend = get_backend(optimized.report.backend)
    backend_meta = backend.save(optimized.runners, path)
    if backend_meta is not None:  # the backend's own files (e.g. TensorRT engines) replace a rebuild on load
        meta["backend_files"] = {"backend": backend.name, **backend_meta}
    (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def _write_module(module: torch.nn.Module, profiles, runtime: Runtime, report: OptimizeReport, path: Path) -> str:
    """Save the prepared module as an exported program, else as a pickle; returns the format written."""
    try:
        program = export_program(
            module,
            profiles,
            runtime.device,
            runtime.dtype,
            export_fn=export_quantized if runtime.quantized else None,
        )
        with warnings.catch_warnings():
            # torch.export.save warns about channels_last (non-contiguous) weights on CPU; they save correctly.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(program, path / "module.pt2")
        return "export"
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
                    if runtime.quantized
                    else ""
                )
            ) from exc
        report.notes.append(f"saved as a pickle: {reason}")
        return "pickle"


def load(path: str | os.PathLike, *, device: torch.device | str | None = None) -> Loaded:
    """Read what `save` wrote: the module on `device` and its runners, with the backend that was saved (a
    backend's own files when it wrote some, else built again from the saved module with the saved settings;
    an `auto` choice is not timed again)."""
    path = _as_path(path)
    meta = _read_meta(path)
    module = _read_module(path, meta["module_format"])
    dev = resolve_device("device", device)
    module = module.to(dev)
    recipe = Recipe.from_dict(meta["recipe"])
    profiles = [[InputSpec.from_dict(s) for s in p] for p in meta["profiles"]]
    runtime = Runtime.from_dict(meta, dev)  # dtype: the inputs' dtype (differs from the precision under autocast)
    saved = meta["report"]
    report = OptimizeReport(recipe=recipe.name, device=str(dev), profiles=meta["profiles"])
    report.notes.append(f"loaded from {path}")
    report.precision, report.precision_reason = saved["precision"], saved["precision_reason"]
    report.backend, report.backend_reason = saved["backend"], f"restored from {path} ({saved['backend_reason']})"
    log = BuildLog()
    backend = get_backend(saved["backend"])
    backend_files = meta.get("backend_files")
    compile_step = recipe.step("compile")
    if backend_files is not None:
        runners = backend.load(path, backend_files, profiles, runtime, log)
    elif compile_step is not None and backend.name != "eager":
        runners = backend.build(module, profiles, runtime, compile_step.settings(backend.name), log)
    else:
        runners = [module for _ in profiles]
    report.notes.extend(log.notes)
    return Loaded(module, runners, profiles, recipe, report, runtime)


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
