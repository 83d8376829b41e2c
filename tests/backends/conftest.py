"""Shared by the backend tests: a backend that records where each call goes (registered for one test), and the
small models, profiles and recipes they build (`kit`; test modules cannot import each other under pytest's
importlib mode)."""

import types

import pytest
import torch

from torchopt import InputSpec, Recipe
from torchopt.backends import BACKENDS, Backend
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig


def backend_recipe(backend: str) -> Recipe:
    return Recipe([CastConfig(dtype="float32"), CompileConfig(backend=backend), ValidateConfig(measure_latency=False)])


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def batch_profiles(feature: tuple[int, ...], ranges: list[tuple[int, int, int]], name: str = "input"):
    return [[InputSpec(name, min=(lo, *feature), opt=(opt, *feature), max=(hi, *feature))] for lo, opt, hi in ranges]


@pytest.fixture(scope="session")
def kit():
    return types.SimpleNamespace(
        recipe=backend_recipe,
        ConvNet=ConvNet,
        mlp=mlp,
        profiles=batch_profiles,
        MLP_PROFILES=batch_profiles((16,), [(1, 4, 8), (9, 16, 24)]),
    )


class _RecordingBackend(Backend):
    """Runs the eager module but records which profile's runner each call reached."""

    name = "recording"

    def build(self, model, profiles, runtime, settings, log):
        self.calls: list[tuple[int, tuple[int, ...]]] = []

        def runner(index):
            def run(*args):
                self.calls.append((index, tuple(args[0].shape)))
                return model(*args)

            return run

        return [runner(p) for p in range(len(profiles))]


@pytest.fixture
def recording(monkeypatch):
    backend = _RecordingBackend()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    return backend
