"""The Backend contract: `build` returns one runner per profile and each call reaches its profile's runner;
`save` / `load` write and read the runners in the backend's own files (meta.json holds what `load` needs)."""

from __future__ import annotations

import json

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.backends import BACKENDS, Backend
from torchopt.backends.tensorrt import export_profile
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig

# Programs loaded from torch.export files vs eager in float32 on CPU.
TOLERANCES = {"cpu": {"rtol": 1e-4, "atol": 1e-4}}


def _recipe(backend: str) -> Recipe:
    return Recipe([CastConfig(dtype="float32"), CompileConfig(backend=backend), ValidateConfig(measure_latency=False)])


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


MLP_PROFILES = [
    [InputSpec("input", min=(lo, 16), opt=(opt, 16), max=(hi, 16))] for lo, opt, hi in [(1, 4, 8), (9, 16, 24)]
]


def _out_of_profile_message(fast: torch.nn.Module, x: torch.Tensor) -> str:
    with pytest.raises(ValueError) as info:
        fast(x)
    return str(info.value)


def test_calls_reach_the_runner_of_their_profile(recording, seed):
    model = _mlp().eval()
    fast = torchopt.optimize(model, _recipe("recording"), inputs=MLP_PROFILES, progress=False)
    recording.calls.clear()
    for batch in (1, 8, 9, 24, 3, 17):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(fast(x), model(x))
    assert recording.calls == [(0, (1, 16)), (0, (8, 16)), (1, (9, 16)), (1, (24, 16)), (0, (3, 16)), (1, (17, 16))]
    with pytest.raises(ValueError, match=r"input shapes \{'input': \(25, 16\)\} fit none of the 2 profiles"):
        fast(torch.randn(25, 16))
    assert len(recording.calls) == 6  # rejected before dispatch


class _ProgramRunner:
    def __init__(self, program: torch.export.ExportedProgram):
        self.program, self.module = program, program.module()

    def __call__(self, *args):
        return self.module(*args)


class _ExportPerProfileBackend(Backend):
    """The TensorRT backend's flow without TensorRT: one torch.export program per profile (with that profile's
    dim ranges, checked by the program at call time), saved in the backend's own files."""

    name = "export-per-profile"

    def build(self, model, profiles, runtime, settings, log):
        self.builds = getattr(self, "builds", 0) + 1
        return [
            _ProgramRunner(export_profile(model, prof, device=runtime.device, dtype=runtime.dtype, index=p))
            for p, prof in enumerate(profiles)
        ]

    def save(self, runners, path):
        files = [f"program{i}.pt2" for i in range(len(runners))]
        for name, runner in zip(files, runners, strict=True):
            torch.export.save(runner.program, path / name)
        return {"files": files}

    def load(self, path, meta, profiles, runtime, log):
        return [_ProgramRunner(torch.export.load(path / name)) for name in meta["files"]]


def test_backend_files_are_saved_and_loaded_per_profile(monkeypatch, tmp_path, seed):
    backend = _ExportPerProfileBackend()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    model = _mlp().eval()
    fast = torchopt.optimize(model, _recipe(backend.name), inputs=MLP_PROFILES, progress=False)
    fast.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["backend_files"] == {"backend": backend.name, "files": ["program0.pt2", "program1.pt2"]}
    loaded = torchopt.load(tmp_path / "m")
    assert backend.builds == 1  # the runners came from the files, not from a new compile
    assert loaded.report.backend == backend.name
    with pytest.raises(AssertionError, match="Guard failed"):  # a runner accepts only its profile's range...
        loaded.runners[0](torch.randn(20, 16))
    for batch in (1, 8, 9, 24):  # ...so these pass only when each call reaches the right runner
        x = torch.randn(batch, 16)
        torch.testing.assert_close(loaded(x), model(x), **TOLERANCES["cpu"])
    big = torch.randn(25, 16)
    assert _out_of_profile_message(loaded, big) == _out_of_profile_message(fast, big)
