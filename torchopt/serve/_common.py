"""Pieces the serving modules share: the clock seam, bounded latency samples, output splitting, and the one rule
that turns a latency budget into a batcher's wait (Triton's queue delay, Ray Serve's batch wait)."""

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
        return [out[0]] if n == 1 else list(out[:n].unbind(0))  # one item: an index, cheaper than unbind
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


def full_batch_ms(measured_ms: float, measured_batch: int, batch: int) -> float:
    """A latency measured at `measured_batch` scaled to a batch of `batch`: linear in the batch, an upper bound
    once the device is saturated; never scaled down (a smaller batch is rarely proportionally faster)."""
    return measured_ms * max(1.0, batch / max(measured_batch, 1))


def budget_wait_ms(budget_ms: float, batch_p99_ms: float) -> tuple[float, str]:
    """How long a batcher may hold a batch open for more requests and still meet `budget_ms`, and why.

    In the worst case a request arrives just after a full batch started: it waits for that batch (one batch's
    p99), then for the batcher's wait, then runs in the next full batch (another p99). So the wait is
    ``budget − 2 × batch p99``, and 0 when that is negative (batches then form only from the requests that queue
    while the model runs). ValueError when one batch alone takes the budget. A server's own round trip is not
    in the measured p99: leave room for it in the budget.
    """
    if batch_p99_ms >= budget_ms:
        raise ValueError(
            f"a full batch's p99 {batch_p99_ms:.3f} ms is not below the {budget_ms} ms latency budget: no wait"
            " can meet it; raise the budget or lower the maximum batch size"
        )
    wait = max(0.0, budget_ms - 2 * batch_p99_ms)
    rule = f"budget {budget_ms} ms − 2 × a full batch's p99 {batch_p99_ms:.3f} ms (the batch in flight and its own)"
    return wait, rule + ("" if wait else ", below 0: no wait")
