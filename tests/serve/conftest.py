"""Deterministic helpers for the serving tests: a clock that only moves when told, and a model that holds its
first call until released (so requests pile up behind it without depending on timing); small saved models for the
Triton tests (`saved_tiny`) and for the Ray tests and the Ray CLI's (`mlp`, `artifact`)."""

import threading

import pytest
import torch

import torchopt
from torchopt import Recipe
from torchopt.recipes import CompileConfig, ValidateConfig

# Failure bound for anything the tests wait for: never reached when the code works.
WAIT_S = 10.0


class FakeClock:
    """A clock the test moves by hand; counts its reads so a test can wait until a worker has looked at it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self._cond:
            self.now += seconds

    def wait_reads(self, n: int) -> None:
        """Block until the clock has been read `n` more times (a worker polled it and found no time passed)."""
        with self._cond:
            target = self.reads + n
            assert self._cond.wait_for(lambda: self.reads >= target, WAIT_S), "the worker stopped reading the clock"


class GatedModel:
    """``x * 2 + 1`` per row; the first call blocks until `release()`; records the batch each call saw."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches = []

    def __call__(self, x):
        self.batches.append(x.clone())
        self.entered.set()
        assert self.gate.wait(WAIT_S), "test never released the model"
        return x * 2 + 1

    def release(self) -> None:
        self.gate.set()

    def wait_entered(self) -> None:
        assert self.entered.wait(WAIT_S), "the model was never called"

    @property
    def sizes(self) -> list[int]:
        return [b.shape[0] for b in self.batches]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def gated():
    model = GatedModel()
    yield model
    model.release()  # never leave a worker blocked


# ---------------------------------------------------------------------------------------------- Triton tests

SERVE_EXTRA_REASON = "the serve extra (tritonclient; nvidia-pytriton --no-deps) is not installed; .ci/setup installs it"
TINY_PROFILE = dict(min=(1, 3, 8, 8), opt=(4, 3, 8, 8), max=(16, 3, 8, 8))


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)
    ).eval()


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """(eager model, directory of its saved eager-fp32 OptimizedModule), batch 1..16 of (3, 8, 8) images."""
    model = _tiny_model()
    fast = torchopt.optimize(model, "eager-fp32", inputs=[torchopt.InputSpec("x", **TINY_PROFILE)], device="cpu")
    path = tmp_path_factory.mktemp("tiny") / "saved"
    fast.save(path)
    return model, path


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="session")
def mlp():
    torch.manual_seed(7)
    return MLP().eval()


@pytest.fixture(scope="session")
def artifact(mlp, tmp_path_factory):
    """`mlp` optimized (eager backend: the serving path, not a compiler, is under test) and saved, batch 1..32."""
    spec = torchopt.InputSpec("x", min=(1, 16), opt=(8, 16), max=(32, 16))
    recipe = Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)])
    fast = torchopt.optimize(mlp, recipe, inputs=[spec], device="cpu", progress=False)
    return fast.save(tmp_path_factory.mktemp("ray") / "mlp.torchopt")
