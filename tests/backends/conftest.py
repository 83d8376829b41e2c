"""A backend that records where each call goes, registered for one test (shared by the Backend-contract and the
Inductor tests)."""

import pytest

from torchopt.backends import BACKENDS, Backend


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
