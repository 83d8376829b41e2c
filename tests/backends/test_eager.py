"""The eager backend: the prepared module itself, one runner per profile, available everywhere."""

import torch

from torchopt.backends import choose_backend, get_backend
from torchopt.backends.eager import EagerBackend


def test_every_profile_runs_the_prepared_module_itself():
    model = torch.nn.Linear(4, 2)
    runners = EagerBackend().build(model, [[], []], None, None, None)
    assert runners == [model, model] and all(r is model for r in runners)


def test_eager_is_always_available_and_chosen_by_name():
    backend, why = choose_backend("eager", torch.device("cpu"))
    assert backend is get_backend("eager") and isinstance(backend, EagerBackend)
    assert backend.unavailable_reason(torch.device("cpu")) is None and why == "eager requested by the recipe"
