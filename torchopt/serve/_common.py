"""Pieces the batcher and the pipeline share: the clock seam, bounded latency samples, output splitting."""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

Clock = Callable[[], float]
# Latency percentiles are taken over this many most recent samples, so memory stays bounded in a long run.
LATENCY_WINDOW = 10_000
# The longest a worker sleeps before it reads the clock again. With the real clock a worker wakes when its
# deadline is due; an injected clock only moves when a test advances it, and this bound makes the worker see
# that within a few polls.
MAX_WAIT_S = 0.02


def default_clock() -> float:
    return time.perf_counter()


def check_clock(clock: Any) -> Clock:
    if clock is None:
        return default_clock
    if not callable(clock):
        raise TypeError(f"clock must be a callable returning seconds (like time.perf_counter), got {clock!r}")
    return clock


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0-100) by the nearest-rank rule; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class LatencySamples:
    """A thread-safe window of the last `LATENCY_WINDOW` durations (seconds) with p50/p99 in milliseconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def ms(self, q: float) -> float | None:
        with self._lock:
            values = list(self._values)
        p = percentile(values, q)
        return None if p is None else p * 1e3


def split_output(out: Any, n: int, rows: int, where: str = "the model's output") -> list[Any]:
    """Split a batched output pytree (tensors in tuples, lists, namedtuples, dicts) along dim 0 into its first
    `n` items; `rows` is the batch size the model ran (padding rows beyond `n` are dropped). None leaves stay
    None in every item. Anything else is a ValueError naming where in the output it sits."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != rows:
            raise ValueError(
                f"{where} has shape {tuple(out.shape)}; the batcher needs dim 0 to be the batch ({rows} rows)"
                " to split it per request"
            )
        return list(out[:n].unbind(0))
    if out is None:
        return [None] * n
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # namedtuple
        parts = [split_output(v, n, rows, f"{where}.{f}") for f, v in zip(out._fields, out, strict=True)]
        return [type(out)(*items) for items in zip(*parts, strict=True)] if parts else [out] * n
    if isinstance(out, (tuple, list)):
        parts = [split_output(v, n, rows, f"{where}[{i}]") for i, v in enumerate(out)]
        return [type(out)(items) for items in zip(*parts, strict=True)] if parts else [type(out)()] * n
    if isinstance(out, dict):
        keys = list(out)
        parts = [split_output(out[k], n, rows, f"{where}[{k!r}]") for k in keys]
        return [dict(zip(keys, items, strict=True)) for items in zip(*parts, strict=True)] if parts else [{}] * n
    raise ValueError(
        f"{where} is a {type(out).__name__}; the batcher can split tensors, tuples, lists and dicts of them along dim 0"
    )


def add_note(exc: BaseException, note: str) -> None:
    """Attach `note` to `exc` where Python supports notes (3.11+); the exception itself is kept unchanged."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
