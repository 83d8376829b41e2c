"""Save and load optimized modules.

A saved optimized module is a directory:

    meta.json          format version, recipe, profiles, precision, backend, the report, the artifact written
    module.pt2         the prepared (cast / quantized) eager module as a `torch.export` program with the
                       profiles' dynamic dims, so loading needs no Python class; or
    module.modelopt.pt a ModelOpt-quantized module that cannot be exported (Q/DQ models on CPU): the float
                       architecture, ModelOpt's state and the calibrated weights (`torchopt.quantize.checkpoint`);
                       or
    module.pt          the pickled module (`torch.save`) when it cannot be exported (the class must be importable)

`save(..., format=)` adds a deployment artifact next to these (one of `SAVE_FORMATS`):

    "directory"  nothing more.
    "aoti"       aoti.pt2: an AOTInductor package compiled from the exported program over the profiles' dims;
                 it runs without Python (C++ `torch::inductor::AOTIModelPackageLoader`). `torchopt.load` runs
                 it through the optimized module's call path, which checks inputs against the profiles; the
                 package itself does NOT check the export's dim bounds (a bare `aoti_load_package` or the C++
                 loader runs batch 65 on a package exported for at most 64).
    "tensorrt"   tensorrt_profile<i>.engine: one serialized TensorRT engine per profile, for TensorRT's runtime or
                 Triton's `tensorrt_plan` (needs Torch-TensorRT, TensorRT and CUDA); `torchopt.load` loads the
                 directory as for "directory", the engines are for other runtimes. Each engine checks its own
                 profile's bounds.

Loading rebuilds the compiled runners by running the recipe's compile step again on the loaded module, with
the backend that was saved (an `auto` choice is not timed again: loading restores what was saved), or loads the
AOTInductor package. Backends with their own serialized format (TensorRT programs) add their files next to these
(`Backend.save`, listed under "backend_files" in meta.json) and rebuild the runners from them (`Backend.load`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchopt.backends import BuildLog, get_backend
from torchopt.backends.tensorrt import TensorRTConfig, build_serialized_engines
from torchopt.config import check_choice, check_type, resolve_device
from torchopt.export import export_program
from torchopt.inputs import InputSpec
from torchopt.quantize import export_quantized
from torchopt.quantize.checkpoint import load_quantized, save_quantized
from torchopt.quantize.deployment import lowp_unsupported
from torchopt.recipe import Recipe
from torchopt.report import OptimizeReport
from torchopt.runtime import Runtime

__all__ = [
    "AOTI_PACKAGE",
    "FORMAT_VERSION",
    "SAVE_FORMATS",
    "DamagedSaveError",
    "Loaded",
    "check_saved",
    "load",
    "read_meta",
    "save",
]

FORMAT_VERSION = 1
# What `save(format=...)` writes besides the directory (see the module docstring).
SAVE_FORMATS = ("directory", "aoti", "tensorrt")
AOTI_PACKAGE = "aoti.pt2"  # aoti_compile_and_package requires the .pt2 suffix
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
_MODULE_FILES = {"export": "module.pt2", "modelopt": "module.modelopt.pt", "pickle": "module.pt"}


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


def save(optimized: Any, path: str | os.PathLike, *, format: str = "directory") -> Path:
    """Write an `OptimizedModule` (its prepared module, runners, profiles, recipe, report and runtime) as a
    directory, plus the deployment artifact `format` names (one of `SAVE_FORMATS`; see the module docstring).

    Raises ValueError for an unknown format and for "aoti" on a module torch.export cannot export,
    BackendUnavailableError for "tensorrt" without Torch-TensorRT, TensorRT or CUDA; nothing is written then.
    """
    if not isinstance(getattr(optimized, "runtime", None), Runtime):
        raise TypeError(
            f"save needs the OptimizedModule that torchopt.optimize returned, got {type(optimized).__name__}"
        )
    check_type("format", format, str)
    check_choice("format", format, SAVE_FORMATS)
    path = _as_path(path)
    runtime: Runtime = optimized.runtime
    # Deployment artifacts are built before anything is written into `path`, so a failure leaves no half save.
    with tempfile.TemporaryDirectory(prefix="torchopt-save-") as scratch:
        program, artifact, staged = None, None, []
        if format == "aoti":
            program = _export_for_aoti(optimized.module, optimized.profiles, runtime)
            artifact, staged = _compile_aoti(program, Path(scratch), runtime)
        elif format == "tensorrt":
            artifact, staged = _write_engines(_serialized_engines(optimized, runtime), Path(scratch))
        return _write_directory(optimized, path, program, artifact, staged)


def _write_directory(
    optimized: Any,
    path: Path,
    program: torch.export.ExportedProgram | None,
    artifact: dict[str, Any] | None,
    staged: list[Path],
) -> Path:
    """Write the directory: the module, the backend's files, the staged artifact files and meta.json (last)."""
    runtime: Runtime = optimized.runtime
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"path {str(path)!r} cannot be created as a directory: {exc}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"path {str(path)!r} is not writable")
    fmt = _write_module(optimized.module, optimized.profiles, runtime, optimized.report, path, program)
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
    if artifact is not None:
        for file in staged:
            shutil.move(file, path / file.name)
        meta["artifact"] = artifact
    (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


def _export(module: torch.nn.Module, profiles: list[list[InputSpec]], runtime: Runtime) -> torch.export.ExportedProgram:
    return export_program(
        module,
        profiles,
        runtime.device,
        runtime.dtype,
        export_fn=export_quantized if runtime.quantized else None,
    )


def _export_for_aoti(
    module: torch.nn.Module, profiles: list[list[InputSpec]], runtime: Runtime
) -> torch.export.ExportedProgram:
    """The program AOTInductor compiles; ValueError naming torch.export's reason when the module cannot export."""
    try:
        return _export(module, profiles, runtime)
    except Exception as exc:  # torch.export raises UserError, RuntimeError, GuardOnDataDependent...
        head = " ".join(str(exc).strip().splitlines()[:3])[:300]
        raise ValueError(
            f"format 'aoti' needs a module torch.export can export over the profiles' dynamic dims, and"
            f" torch.export failed ({type(exc).__name__}: {head}); save with format 'directory' instead"
        ) from exc


def _compile_aoti(
    program: torch.export.ExportedProgram, scratch: Path, runtime: Runtime
) -> tuple[dict[str, Any], list[Path]]:
    """Compile the AOTInductor package into `scratch`; its meta.json entry and the file."""
    package = scratch / AOTI_PACKAGE
    try:
        with warnings.catch_warnings():
            # torch 2.13's own AOTInductor code trips its pytree deprecation; nothing the caller can change.
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    except Exception as exc:  # a C++ compiler missing or an op inductor cannot lower: say so, keep the cause
        head = " ".join(str(exc).strip().splitlines()[:3])[:300]
        raise RuntimeError(f"AOTInductor could not compile the exported module ({type(exc).__name__}: {head})") from exc
    return {"format": "aoti", "files": [AOTI_PACKAGE], "device": runtime.device.type}, [package]


def _serialized_engines(optimized: Any, runtime: Runtime) -> list[tuple[bytes, list[dict[str, Any]]]]:
    """One serialized TensorRT engine per profile, built with the recipe's tensorrt settings."""
    compile_step = optimized.recipe.step("compile")
    config = getattr(compile_step, "tensorrt", None) or TensorRTConfig()
    return build_serialized_engines(optimized.module, optimized.profiles, runtime, config, BuildLog())


def _write_engines(
    engines: list[tuple[bytes, list[dict[str, Any]]]], scratch: Path
) -> tuple[dict[str, Any], list[Path]]:
    """Write the engines into `scratch`; their meta.json entry (files and each profile's inputs) and the files."""
    files, inputs = [], []
    for i, (engine, specs_kw) in enumerate(engines):
        file = scratch / f"tensorrt_profile{i}.engine"
        file.write_bytes(engine)
        files.append(file)
        inputs.append([{k: str(v) if isinstance(v, torch.dtype) else v for k, v in kw.items()} for kw in specs_kw])
    return {"format": "tensorrt", "files": [f.name for f in files], "inputs": inputs}, files


def _write_module(
    module: torch.nn.Module,
    profiles: list[list[InputSpec]],
    runtime: Runtime,
    report: OptimizeReport,
    path: Path,
    program: torch.export.ExportedProgram | None = None,
) -> str:
    """Save the prepared module as an exported program (`program` when already exported), else as a ModelOpt
    checkpoint (quantized modules) or a pickle; returns the module format written."""
    try:
        program = program if program is not None else _export(module, profiles, runtime)
        with warnings.catch_warnings():
            # torch.export.save warns about channels_last (non-contiguous) weights on CPU; they save correctly.
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(program, path / _MODULE_FILES["export"])
        return "export"
    except Exception as exc:  # export has many failure modes; the fallbacks keep the module loadable anyway
        reason = f"torch.export failed ({type(exc).__name__}: {exc})"[:300]
    fmt = "modelopt" if runtime.quantized else "pickle"
    try:
        if runtime.quantized:
            save_quantized(module, path / _MODULE_FILES[fmt])
        else:
            torch.save(module, path / _MODULE_FILES[fmt])
    except Exception as exc:
        how = "as a ModelOpt checkpoint" if runtime.quantized else "as a pickle"
        raise ValueError(f"cannot save this optimized module: {reason}; saving it {how} failed too ({exc})") from exc
    report.notes.append(f"saved as a {'ModelOpt checkpoint' if runtime.quantized else 'pickle'}: {reason}")
    return fmt


def load(path: str | os.PathLike, *, device: torch.device | str | None = None) -> Loaded:
    """Read what `save` wrote: the module on `device` and its runners, with the backend that was saved (a
    backend's own files when it wrote some, else built again from the saved module with the saved settings;
    an `auto` choice is not timed again), or the AOTInductor package of a format "aoti" save. The report is the
    one saved (its latency, accuracy, steps and notes), with a note that it was loaded and where it was measured."""
    path = _as_path(path)
    meta = read_meta(path)
    module = _read_module(path, meta["module_format"])
    dev = resolve_device("device", device)
    module = module.to(dev)
    recipe = Recipe.from_dict(meta["recipe"])
    profiles = [[InputSpec.from_dict(s) for s in p] for p in meta["profiles"]]
    runtime = Runtime.from_dict(meta, dev)  # dtype: the inputs' dtype (differs from the precision under autocast)
    _check_lowp_runs(path, runtime)
    report = _loaded_report(meta, path, dev)
    log = BuildLog()
    backend = get_backend(report.backend)
    backend_files = meta.get("backend_files")
    compile_step = recipe.step("compile")
    artifact = meta.get("artifact")
    if isinstance(artifact, dict) and artifact.get("format") == "aoti":
        runners = _load_aoti(path, artifact, dev, len(profiles))
        report.notes.append(
            f"runs the AOTInductor package {AOTI_PACKAGE} (inputs checked against the profiles before it runs)"
        )
    elif backend_files is not None:
        runners = backend.load(path, backend_files, profiles, runtime, log)
    elif compile_step is not None and backend.name != "eager":
        runners = backend.build(module, profiles, runtime, compile_step.settings(backend.name), log)
    else:
        runners = [module for _ in profiles]
    report.notes.extend(log.notes)
    return Loaded(module, runners, profiles, recipe, report, runtime)


def _check_lowp_runs(path: Path, runtime: Runtime) -> None:
    """A module saved with real low-precision GEMMs loads only where they run (another GPU generation, the CPU)."""
    why = runtime.lowp and lowp_unsupported(runtime.lowp, runtime.device)
    if why:
        raise ValueError(
            f"{str(path)!r} runs real {runtime.lowp} GEMMs, which cannot run on {runtime.device}: {why}. Load it"
            " on a GPU that runs them, or optimize the original model again here (compile.lowp: auto picks what"
            " this device runs)"
        )


def _loaded_report(meta: dict[str, Any], path: Path, device: torch.device) -> OptimizeReport:
    """The report that was saved (latency, accuracy, steps, notes), marked as loaded: its figures describe the
    module as measured at save time, not on `device` now."""
    try:
        report = OptimizeReport.from_dict(meta["report"])
    except (TypeError, ValueError) as exc:
        raise _damaged(path / "meta.json", f"its report cannot be read ({exc})") from None
    report.backend_reason = f"restored from {path} ({report.backend_reason})"
    report.notes.append(
        f"loaded from {path} on {device}; latency, accuracy and memory figures were measured at save time on"
        f" {report.device}"
    )
    return report


def _load_aoti(path: Path, artifact: dict[str, Any], device: torch.device, n_profiles: int) -> list[Any]:
    """The AOTInductor package as the runner of every profile (it was compiled over all their dims)."""
    file = path / AOTI_PACKAGE
    if not file.is_file():
        raise _damaged(path, f"{AOTI_PACKAGE} is missing (meta.json says artifact format 'aoti')")
    built_for = artifact.get("device")
    if built_for != device.type:
        raise ValueError(
            f"{str(file)!r} was compiled for {built_for}; it cannot run on {device}: load it with"
            f" device={built_for!r}, or save again from a module optimized on {device.type}"
        )
    try:
        runner = torch._inductor.aoti_load_package(str(file), device_index=-1 if device.index is None else device.index)
    except Exception as exc:  # zip, missing .so, metadata: all mean the package is unreadable
        raise _damaged(file, f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from exc
    return [runner for _ in range(n_profiles)]


def _as_path(path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a directory), got {type(path).__name__} {path!r}")
    return Path(path)


def _damaged(file: Path, what: str) -> DamagedSaveError:
    return DamagedSaveError(f"{str(file)!r} is damaged: {what}; save the optimized module again")


def read_meta(path: Path) -> dict:
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
    artifact = meta.get("artifact")
    if artifact is not None and (not isinstance(artifact, dict) or artifact.get("format") not in SAVE_FORMATS):
        raise _damaged(meta_file, f"artifact is {artifact!r}, expected an object whose format is one of {SAVE_FORMATS}")
    if meta["module_format"] not in _MODULE_FILES:
        raise _damaged(meta_file, f"module_format is {meta['module_format']!r}, expected one of {list(_MODULE_FILES)}")
    return meta


def check_saved(path: str | os.PathLike) -> None:
    """Whether `path` holds what `save` writes, without loading it: meta.json with every key `load` reads, the
    module file and, for "aoti", the package, each present and readable as the zip archive torch writes (only
    its directory is read). DamagedSaveError naming the file, or ValueError for no saved module, otherwise.

    For a process that must not load the module itself, e.g. before a server does (`torchopt.serve`).
    """
    path = _as_path(path)
    meta = read_meta(path)
    files = [path / _MODULE_FILES[meta["module_format"]]]
    if (meta.get("artifact") or {}).get("format") == "aoti":
        files.append(path / AOTI_PACKAGE)
    for file in files:
        if not file.is_file():
            raise _damaged(path, f"{file.name} is missing (meta.json lists it)")
        if not zipfile.is_zipfile(file):
            raise _damaged(file, "it is not the zip archive torch writes (truncated or overwritten)")


def _read_module(path: Path, module_format: str) -> torch.nn.Module:
    """The saved eager module (an exported program's module, the ModelOpt checkpoint's or the pickle);
    DamagedSaveError naming the file when it is unreadable."""
    file = path / _MODULE_FILES[module_format]
    if not file.is_file():
        raise _damaged(path, f"{file.name} is missing (meta.json says module_format {module_format!r})")
    try:
        if module_format == "export":
            return torch.export.load(file).module()
        if module_format == "modelopt":
            return load_quantized(file)
        return torch.load(file, weights_only=False)
    except ImportError as exc:
        if module_format == "modelopt" and "ModelOpt" in str(exc):
            raise ImportError(f"{str(file)!r} holds a ModelOpt-quantized module: {exc}") from exc
        raise _unimportable(file, module_format, exc) from exc
    except AttributeError as exc:
        raise _unimportable(file, module_format, exc) from exc
    except Exception as exc:  # zipfile, pickle, EOF and torch's own errors: all mean the file is unreadable
        raise _damaged(file, f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _unimportable(file: Path, module_format: str, exc: Exception) -> Exception:
    if module_format == "export":
        return _damaged(file, f"it cannot be read ({type(exc).__name__}: {str(exc)[:200]})")
    return ValueError(
        f"{str(file)!r} is a pickled module whose class cannot be imported here ({exc}); import the"
        " package that defines the model first"
    )
