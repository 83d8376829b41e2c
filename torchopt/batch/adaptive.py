"""`AdaptiveBatchSizer`: a batch size for a running loop that shrinks on OOM and grows back when it can.

After an out-of-memory error the failing size becomes a ceiling that growth never reaches again
(`reset_ceiling()` lifts it, e.g. after other processes released memory) and the size shrinks to
``size · shrink_factor``, or to the largest size that has run below the failure if that is larger. After
`grow_after` consecutive successes it grows by `grow_factor`, at most halfway to the ceiling — so repeated
growth bisects towards the real limit instead of oscillating below it — and, when a memory backend is given,
only if the memory model fitted to the observed peaks predicts the new size within
``capacity · (1 - headroom_fraction)``. Unlike a shrink-only policy, a transient spike does not cost
throughput for the rest of the run.

Thread-safe: the size, the counters and the history change under one lock, and reports carry the size they
ran at, so an OOM seen by a thread that ran a stale, larger size does not shrink twice.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from torchopt.batch._calls import check_batch_limit, oom_text, run_guarded
from torchopt.batch.memory_backends import MemoryBackend, release_memory
from torchopt.batch.memory_fit import fit_memory_model
from torchopt.config import ConfigBase, check_positive, check_range, check_type

__all__ = ["AdaptiveBatchConfig", "AdaptiveBatchSizer", "SizerEvent"]

T = TypeVar("T")
_WHERE = "AdaptiveBatchSizer"
# What the sizer calls on its memory backend (a subset of `MemoryBackend`).
_MEMORY_METHODS = ("used_bytes", "free_bytes", "reset_peak", "peak_bytes", "cleanup")


def _reported_size(method: str, size: Any) -> int | None:
    """`size` as given to a report (None = the current size), checked before the report changes anything."""
    if size is None:
        return None
    where = f"{_WHERE}.{method}: size"
    check_type(where, size, numbers.Integral, "an int batch size >= 1 (None: the current size)")
    if size < 1:
        raise ValueError(f"{where} must be a batch size >= 1 (None: the current size), got {size!r}")
    return int(size)


def _reported_peak(peak_bytes: Any) -> int | None:
    if peak_bytes is None:
        return None
    where = f"{_WHERE}.on_success: peak_bytes"
    check_type(where, peak_bytes, numbers.Integral, "an int number of bytes >= 0 (or None)")
    if peak_bytes < 0:
        raise ValueError(f"{where} must be >= 0 (bytes at the step's peak), got {peak_bytes!r}")
    return int(peak_bytes)


def _check_memory(memory: Any) -> None:
    missing = [name for name in _MEMORY_METHODS if not callable(getattr(memory, name, None))]
    if missing:
        raise TypeError(
            f"{_WHERE}: memory must be a MemoryBackend (e.g. torchopt.batch.CudaMemory()) or None; got"
            f" {type(memory).__name__} {memory!r}, which lacks {', '.join(f'{m}()' for m in missing)}"
        )


@dataclasses.dataclass
class AdaptiveBatchConfig(ConfigBase):
    """Every option of `AdaptiveBatchSizer`.

    min_size / max_size: bounds of the size (max_size None = no bound but memory and the OOM ceiling).
    shrink_factor: size after an OOM = ``floor(size · shrink_factor)`` (at least one less), or the largest
        size that ran below the failing one when that is larger.
    grow_factor / grow_after: grow to ``ceil(size · grow_factor)`` (at most halfway to the smallest size
        that failed) after this many successes in a row.
    headroom_fraction: with a memory backend, grow only while the predicted peak leaves this fraction free.
    max_retries: `run` retries a call this many times after OOMs (shrinking each time) before re-raising.
    max_history: events kept (oldest dropped first).
    """

    min_size: int = 1
    max_size: int | None = None
    shrink_factor: float = 0.75
    grow_factor: float = 1.25
    grow_after: int = 10
    headroom_fraction: float = 0.1
    max_retries: int = 8
    max_history: int = 10_000

    def __post_init__(self) -> None:
        check_batch_limit("min_size", self.min_size)
        if self.max_size is not None:
            check_batch_limit("max_size", self.max_size)
            if self.max_size < self.min_size:
                raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        check_range("shrink_factor", self.shrink_factor, low=0, high=1, low_open=True, high_open=True)
        check_type("grow_factor", self.grow_factor, (int, float))
        if self.grow_factor <= 1:
            raise ValueError(f"grow_factor must be > 1, got {self.grow_factor}")
        check_positive("grow_after", self.grow_after)
        check_range("headroom_fraction", self.headroom_fraction, low=0, high=1, high_open=True)
        check_positive("max_retries", self.max_retries, allow_zero=True)
        check_positive("max_history", self.max_history)


@dataclasses.dataclass
class SizerEvent:
    """A change of the size, or an OOM: `size` before, `new_size` after (equal when nothing changed)."""

    index: int  # how many results (successes + OOMs) had been reported
    event: str  # "oom", "shrink", "grow", "reset_ceiling"
    size: int
    new_size: int
    reason: str
    time: float  # time.time()


class AdaptiveBatchSizer:
    """A thread-safe batch size for a running loop: shrink on OOM, grow back after successes.

    Example::

        sizer = torchopt.batch.AdaptiveBatchSizer(256, grow_after=20)
        for _ in range(steps):
            loss = sizer.run(lambda n: train_step(next_batch(n)))   # retries smaller on OOM
        print(sizer.size, sizer.history)

    or report results yourself: ``n = sizer.size``; run; then ``sizer.on_success(n)`` or ``sizer.on_oom(n)``
    (after leaving the ``except`` block).
    """

    def __init__(
        self,
        initial: int,
        *,
        config: AdaptiveBatchConfig | None = None,
        memory: MemoryBackend | None = None,
        **overrides: Any,
    ):
        self.config = AdaptiveBatchConfig.merge(config, where=f"{_WHERE} options", **overrides)
        cfg = self.config
        check_batch_limit("initial", initial)
        if not cfg.min_size <= initial <= (cfg.max_size or initial):
            raise ValueError(f"initial ({initial}) must be in [min_size, max_size] = [{cfg.min_size}, {cfg.max_size}]")
        if memory is not None:
            _check_memory(memory)
        self._memory = memory
        # What is held before any batch (the weights): the intercept of a one-point memory model.
        self._base_bytes = memory.used_bytes() if memory is not None else 0
        self._lock = threading.Lock()
        self._size = initial
        self._streak = 0
        self._successes = 0
        self._ooms = 0
        self._ceiling: int | None = None
        self._good: int | None = None  # the largest size that ran, below the ceiling
        self._peaks: dict[int, int] = {}
        self._history: collections.deque[SizerEvent] = collections.deque(maxlen=cfg.max_history)

    # -- state ------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        with self._lock:
            return self._size

    @property
    def ceiling(self) -> int | None:
        """The smallest size that ran out of memory (growth stays below it), or None."""
        with self._lock:
            return self._ceiling

    @property
    def successes(self) -> int:
        with self._lock:
            return self._successes

    @property
    def ooms(self) -> int:
        with self._lock:
            return self._ooms

    @property
    def history(self) -> list[SizerEvent]:
        with self._lock:
            return list(self._history)

    def __repr__(self) -> str:
        return (
            f"AdaptiveBatchSizer(size={self.size}, ceiling={self.ceiling}, successes={self.successes},"
            f" ooms={self.ooms})"
        )

    def _record(self, event: str, size: int, new_size: int, reason: str) -> None:
        # Called with the lock held, so the history is in the order the size changed.
        index = self._successes + self._ooms
        self._history.append(SizerEvent(index, event, size, new_size, reason, time.time()))

    # -- reports ------------------------------------------------------------------------------------------
    def on_success(self, size: int | None = None, peak_bytes: int | None = None) -> int:
        """Report a step that ran at `size` (default: the current size) with an optional measured peak; returns
        the size to use next. Bad arguments raise before anything is counted."""
        given = _reported_size("on_success", size)
        peak = _reported_peak(peak_bytes)
        with self._lock:
            size = self._size if given is None else given
            self._successes += 1
            if (self._good is None or size > self._good) and (self._ceiling is None or size < self._ceiling):
                self._good = size
            if peak is not None:
                self._peaks[size] = peak
            if size != self._size:
                return self._size  # ran at a size another thread has since changed: no evidence for growth
            self._streak += 1
            if self._streak >= self.config.grow_after:
                self._streak = 0
                self._grow()
            return self._size

    def _grow(self) -> None:
        cfg, size = self.config, self._size
        new = max(size + 1, math.ceil(size * cfg.grow_factor))
        limits = [] if cfg.max_size is None else [cfg.max_size]
        if self._ceiling is not None:  # halfway to the failure: growth bisects towards the real limit
            limits.append(max(size + 1, (size + self._ceiling) // 2) if size + 1 < self._ceiling else size)
        new = min([new, *limits])
        if new <= size:
            return
        reason = f"{cfg.grow_after} successes in a row"
        if self._memory is not None and self._peaks:
            capacity = self._memory.used_bytes() + self._memory.free_bytes()
            allowed = capacity * (1 - cfg.headroom_fraction)
            model = fit_memory_model(list(self._peaks.items()), base_bytes=self._base_bytes)
            fits = model.largest_batch(allowed)
            if fits < size + 1:
                return  # memory headroom does not allow more now; try again after the next streak
            new = min(new, int(fits))
            reason += f"; predicted peak {model.predict(new) / 2**20:,.0f} MiB of {allowed / 2**20:,.0f} MiB"
        self._record("grow", size, new, reason)
        self._size = new

    def on_oom(self, size: int | None = None) -> int:
        """Report an out-of-memory error at `size` (default: the current size); returns the size to use next.

        Call it after leaving the ``except`` block, once memory was released. A bad `size` raises before the OOM
        is counted or the ceiling moves.
        """
        given = _reported_size("on_oom", size)
        with self._lock:
            size = self._size if given is None else given
            self._ooms += 1
            if self._ceiling is None or size < self._ceiling:
                self._ceiling = size
            if self._good is not None and self._good >= size:
                self._good = None  # what ran before no longer does (memory is held elsewhere now)
            cfg = self.config
            new = max(cfg.min_size, min(math.floor(size * cfg.shrink_factor), size - 1), self._good or 0)
            if new < self._size:
                self._record("shrink", self._size, new, f"out of memory at {size}")
                self._size = new
                self._streak = 0
            else:
                self._record("oom", self._size, self._size, f"out of memory at {size} (size already {self._size})")
            return self._size

    def reset_ceiling(self) -> None:
        """Allow growth past the smallest size that ran out of memory (e.g. once memory was freed)."""
        with self._lock:
            if self._ceiling is not None:
                self._record("reset_ceiling", self._size, self._size, f"ceiling {self._ceiling} lifted")
            self._ceiling = None

    # -- running --------------------------------------------------------------------------------------------
    def run(self, step: Callable[[int], T]) -> T:
        """Call ``step(size)`` at the current size; after an OOM, shrink and retry (up to max_retries).

        Memory is released after leaving the ``except`` block; non-OOM errors propagate unchanged, with the
        size noted. With a memory backend, the peak of each call is recorded for the growth check (peaks are
        process-wide: with several threads running at once they over-estimate, which only slows growth).
        """
        if not callable(step):
            raise TypeError(f"{_WHERE}.run: step must be a callable step(batch_size), got {type(step).__name__}")
        memory = self._memory
        cleanup = memory.cleanup if memory is not None else release_memory
        for _ in range(self.config.max_retries + 1):
            size = self.size
            if memory is not None:
                memory.reset_peak()
            result, failure = run_guarded(lambda n=size: step(n), size, f"{_WHERE}.run", cleanup)
            if failure is None:
                peak = memory.peak_bytes() if memory is not None else None
                self.on_success(size, peak)
                return result
            if self.on_oom(size) >= size:
                break  # cannot shrink any more
        failure.add_note(
            f"{_WHERE}: out of memory at batch size {size} ({oom_text(failure)}) after"
            f" {self.config.max_retries} retries or at min_size={self.config.min_size}"
        )
        raise failure
