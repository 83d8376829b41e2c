"""Deterministic helpers for the serving tests: a clock that only moves when told, and a model that holds its
first call until released (so requests pile up behind it without depending on timing)."""

import threading

import pytest

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
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)
    ).eval()


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """(eager model, directory of its saved eager-fp32 OptimizedModule), batch 1..16 of (3, 8, 8) images."""
    import torchopt

    model = _tiny_model()
    fast = torchopt.optimize(model, "eager-fp32", inputs=[torchopt.InputSpec("x", **TINY_PROFILE)], device="cpu")
    path = tmp_path_factory.mktemp("tiny") / "saved"
    fast.save(path)
    return model, path
