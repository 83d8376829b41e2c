"""The eager backend: run the prepared module as is (the reference point and the CPU fallback)."""

from __future__ import annotations

from torchopt.backends.base import Backend

__all__ = ["EagerBackend"]


class EagerBackend(Backend):
    name = "eager"

    def build(self, model, profiles, runtime, settings, log):
        return [model for _ in profiles]
