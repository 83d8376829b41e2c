"""`DynamicBatcher`: many threads submit single items, one worker runs them through the model in batches.

Contract: ``submit(*tensors)`` takes ONE item per call, each tensor *without* the batch dim (the model's
``forward(x, y)`` becomes ``submit(x_item, y_item)``), and returns a `concurrent.futures.Future` whose result is
the model's output for that item alone: the batched output pytree (tensors, tuples, lists, namedtuples, dicts)
split along dim 0 and indexed at the item's row.

The worker waits for the oldest request, then for up to ``max_delay_ms`` (counted from that request's
submission) or until ``max_batch`` items of the same kind are queued, stacks them along a new dim 0, calls the
model once under ``torch.no_grad()`` and splits the result. Items of the same kind have the same number of
tensors and the same shapes, dtypes and devices; other items wait for a later batch (they are never stacked
together, and each kind keeps its submission order).

Why each rule:

* A request that fails fails alone: when a batch raises, each of its items is run again on its own, so only
  the items that fail by themselves get the error (the model's own exception object); the others get their
  results. A malformed output (no batch dim to split) fails every request of that batch with a ValueError.
* Items are checked at `submit` against the model's input profile when ``fast`` has one (``fast.profiles``,
  e.g. a `torchopt.OptimizedModule`): a bad item raises there and never spoils a batch.
* Buckets: with ``buckets`` the stacked batch is padded up to the next bucket (repeating the last item, or with
  zeros), and the padding rows are dropped from the output, so CUDA graphs or TensorRT profiles only ever see
  those sizes. A profile whose batch range starts above the batch size is padded up to its minimum likewise.
* Back-pressure: at most ``max_queue`` requests wait; `submit` then blocks up to ``submit_timeout`` seconds and
  raises `BatcherFull` (a `queue.Full`), so a burst slows its producers instead of growing memory.
* `close` drains (runs everything queued) or cancels (queued futures raise ``CancelledError``); a batch already
  running always completes. `submit` after `close` raises `BatcherClosed`.
* ``batcher(*tensors)`` is the blocking call: for a model on the CPU, on an idle batcher (nothing queued, no
  model call running) the caller runs its item itself, so at low load a request pays neither the hand-off to the
  worker nor ``max_delay_ms`` (there is nobody to batch with); under load it queues like `submit`. A model on a
  GPU runs in the worker thread only (``BatcherConfig.caller_runs`` says why). The model is never called by two
  threads at once.

The delay and the latency statistics read an injectable ``clock`` (default `time.perf_counter`); blocking
timeouts (`submit_timeout`, `close(timeout=)`) are real seconds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch

from torchopt.config import ConfigBase, check_choice, check_positive, check_range, check_type
from torchopt.inputs import InputSpec
from torchopt.runtime import map_tensors
from torchopt.serve._common import MAX_WAIT_S, LatencySamples, check_clock, split_output

__all__ = ["BatcherClosed", "BatcherConfig", "BatcherFull", "BatcherStats", "DynamicBatcher"]

# max_batch when neither the config, the buckets nor the model's profile gives one.
DEFAULT_MAX_BATCH = 32
# Distinct item kinds (shape/dtype/device combinations) whose batch plans are cached; past it the cache restarts.
_PLAN_CACHE_SIZE = 1024
_UNSET: Any = object()


@dataclasses.dataclass
class BatcherConfig(ConfigBase):
    """Options of `DynamicBatcher`.

    max_batch: most items in one model call. None: the largest bucket when `buckets` is a list, else the batch
        max of the model's input profile (dim 0 of its first input), else 32. It may not exceed the profile's.
    max_delay_ms: how long the oldest queued request may wait for others to join its batch (0: run at once
        what is queued).
    max_queue: requests that may wait; past it `submit` blocks (back-pressure).
    buckets: None (run the batch size as gathered), a list of batch sizes to pad up to (e.g. the sizes CUDA
        graphs were captured for), or "profile": the powers of two inside the model profile's batch range plus
        its min, opt and max.
    pad: what padding rows hold: "repeat" (copies of the last item: real data, so no NaN from a zero input) or
        "zeros".
    submit_timeout: seconds `submit` waits for room in a full queue before raising `BatcherFull`; None waits
        as long as it takes, 0 never waits.
    copy_outputs: give each request a copy of its output rows instead of a view of the batch output; needed
        when the model reuses its output buffers (CUDA graphs), and it lets the batch output be freed sooner.
    caller_runs: whether ``batcher(x)`` on an idle batcher runs the item in the calling thread. None (auto): only
        for a model on the CPU. A model on a GPU is only ever called from the worker thread: torch.compile's CUDA
        graphs are recorded per thread (each thread warms up, records and keeps its own graphs and memory pool),
        so caller threads would each pay that and hold that memory. True also does it on a GPU, for an
        application with one long-lived caller thread.
    """

    max_batch: int | None = None
    max_delay_ms: float = 2.0
    max_queue: int = 1024
    buckets: list[int] | str | None = None
    pad: str = "repeat"
    submit_timeout: float | None = None
    copy_outputs: bool = False
    caller_runs: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch is not None:
            check_positive("BatcherConfig.max_batch", self.max_batch)
        check_range("BatcherConfig.max_delay_ms", self.max_delay_ms, low=0)
        check_positive("BatcherConfig.max_queue", self.max_queue)
        self.buckets = _check_buckets(self.buckets)
        if isinstance(self.buckets, list) and self.max_batch is not None and self.max_batch > self.buckets[-1]:
            raise ValueError(
                f"BatcherConfig.max_batch {self.max_batch} exceeds the largest bucket {self.buckets[-1]}"
                f" (buckets {self.buckets}): a full batch would have no bucket to pad to"
            )
        check_choice("BatcherConfig.pad", self.pad, ["repeat", "zeros"])
        if self.submit_timeout is not None:
            check_range("BatcherConfig.submit_timeout", self.submit_timeout, low=0)
        check_type("BatcherConfig.copy_outputs", self.copy_outputs, bool)
        if self.caller_runs is not None:
            check_type("BatcherConfig.caller_runs", self.caller_runs, bool)


def _check_buckets(buckets: Any) -> list[int] | str | None:
    if buckets is None or buckets == "profile":
        return buckets
    check_type("BatcherConfig.buckets", buckets, (list, tuple), 'a list of batch sizes, "profile" or None')
    if not buckets:
        raise ValueError('BatcherConfig.buckets must name at least one batch size (or be None or "profile"), got []')
    for i, b in enumerate(buckets):
        check_positive(f"BatcherConfig.buckets[{i}]", b)
    return sorted(set(buckets))


class BatcherFull(queue.Full):
    """`submit` found the queue full (``BatcherConfig.max_queue``) for longer than its timeout."""


class BatcherClosed(RuntimeError):
    """`submit` on a `DynamicBatcher` that is closing or closed."""


@dataclasses.dataclass
class BatcherStats:
    """A snapshot of a `DynamicBatcher`'s counters.

    requests: accepted by `submit`; completed / failed / cancelled: how they ended so far.
    batches: model calls (an isolation rerun of one item counts as one); batch_sizes: items per call ->
    calls; run_sizes: rows the model saw (with padding) -> calls; padded_rows: rows of padding in all.
    isolated_batches: batches that raised and were rerun item by item.
    caller_runs: blocking calls (``batcher(x)``) that found the batcher idle and ran the model in their thread.
    queue_depth: requests waiting now. p50_ms / p99_ms: submit-to-result latency of the recent requests
    (by the batcher's clock), None before any finished.
    """

    requests: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    batches: int = 0
    batch_sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    run_sizes: dict[int, int] = dataclasses.field(default_factory=dict)
    padded_rows: int = 0
    isolated_batches: int = 0
    caller_runs: int = 0
    queue_depth: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def mean_batch(self) -> float:
        """Mean items per model call (0.0 before the first)."""
        total = sum(n * c for n, c in self.batch_sizes.items())
        return total / self.batches if self.batches else 0.0


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How batches of one item kind run: `cap` items at most, padded up to an allowed size."""

    cap: int
    ranges: tuple[tuple[int, int], ...]  # batch sizes the model accepts for this kind, sorted
    buckets: tuple[int, ...] | None

    def rows(self, n: int) -> int:
        """The batch size the model runs for `n` items: `n`, or the next allowed size above it."""
        if self.buckets is not None:
            return next(b for b in self.buckets if b >= n)
        for lo, hi in self.ranges:
            if n <= hi:
                return max(n, lo)
        raise AssertionError(f"{n} items exceed the plan's cap {self.cap}")  # submit caps batches at self.cap


@dataclasses.dataclass
class _Request:
    args: tuple[torch.Tensor, ...]
    key: tuple
    plan: _Plan
    future: concurrent.futures.Future
    t_submit: float


class DynamicBatcher:
    """Gather single-item requests from many threads into batched model calls (see the module docs).

    fast: any callable taking batched tensors along dim 0 (``fast(x)`` or ``fast(x, y)``), e.g. a
        `torchopt.OptimizedModule`, whose ``profiles`` then bound the batch and check the items.
    config: a `BatcherConfig`; keyword `overrides` (its field names) replace single options.
    clock: seconds as a float (default `time.perf_counter`): drives `max_delay_ms` and the latency stats.

    Example::

        with DynamicBatcher(fast, max_batch=32, max_delay_ms=2) as batcher:
            futures = [batcher.submit(img) for img in images]   # img: (3, 224, 224), from any thread
            logits = [f.result() for f in futures]              # (1000,) each
    """

    def __init__(self, fast: Any, config: BatcherConfig | None = None, *, clock: Any = None, **overrides: Any):
        if not callable(fast):
            raise TypeError(f"fast must be callable (batched tensors -> output), got {type(fast).__name__}")
        cfg = BatcherConfig.merge(config, where="DynamicBatcher options", **overrides)
        self._fast = fast
        self._clock = check_clock(clock)
        self._profiles = _profiles_of(fast)
        self.buckets = _resolve_buckets(cfg.buckets, self._profiles)
        self.max_batch = _resolve_max_batch(cfg.max_batch, self.buckets, self._profiles)
        self.config = cfg
        self._delay_s = cfg.max_delay_ms / 1e3
        self._plans: dict[tuple, _Plan] = {}
        self._model_on_gpu = _runs_on_gpu(fast)

        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)  # the worker waits here for requests
        self._not_full = threading.Condition(self._lock)  # submitters wait here for room
        self._pending: collections.deque[_Request] = collections.deque()
        self._kind_counts: collections.Counter[tuple] = collections.Counter()
        self._state = "open"  # -> "draining" (close(drain=True)) or "closed"
        self._busy = False  # a model call is running (the worker's batch or a caller's own, see __call__)
        self._stats = BatcherStats()
        self._latency = LatencySamples()
        self._worker = threading.Thread(target=self._work, name="torchopt-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------ submit side

    def submit(self, *item: torch.Tensor, timeout: float | None = _UNSET) -> concurrent.futures.Future:
        """Queue one item (each tensor without the batch dim); its Future gets the model's output for it.

        Raises TypeError/ValueError for an item the model's profile cannot take, `BatcherFull` when the queue
        stays full for `timeout` seconds (default ``BatcherConfig.submit_timeout``), `BatcherClosed` after
        `close`.
        """
        key = _kind(item)
        return self._enqueue(item, key, self._plan(key, item), timeout)

    def _enqueue(self, item: tuple, key: tuple, plan: _Plan, timeout: float | None) -> concurrent.futures.Future:
        """`submit` once the item's kind and plan are known."""
        wait = self.config.submit_timeout if timeout is _UNSET else timeout
        if wait is not None:
            check_range("submit timeout", wait, low=0)
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._raise_if_closed()
            if len(self._pending) >= self.config.max_queue:
                self._not_full.wait_for(self._room_or_closed, wait)
                self._raise_if_closed()
                if len(self._pending) >= self.config.max_queue:
                    raise BatcherFull(
                        f"DynamicBatcher queue is full: {len(self._pending)} requests waiting"
                        f" (BatcherConfig.max_queue={self.config.max_queue}) after waiting {wait} s;"
                        " raise max_queue or submit_timeout, or slow the producers down"
                    )
            self._pending.append(_Request(item, key, plan, future, self._clock()))
            self._kind_counts[key] += 1
            self._stats.requests += 1
            self._not_empty.notify()
        return future

    def __call__(self, *item: torch.Tensor, timeout: float | None = _UNSET) -> Any:
        """The model's output for one item, blocking. When the batcher is idle (nothing queued, no model call
        running) and `BatcherConfig.caller_runs` allows it (by default: a model on the CPU), the calling thread
        runs the model itself, a batch of one with no hand-off to the worker and no `max_delay_ms` wait (nobody
        is there to batch with); otherwise the item is queued as by `submit` and batched with the others. Errors
        and options as for `submit`; the model's own error is raised here.
        """
        key = _kind(item)
        plan = self._plan(key, item)
        if not (self._caller_may_run(key) and self._claim_idle()):
            return self._enqueue(item, key, plan, timeout).result()
        # The caller's own batch of one, without the worker's Future and request record: this path is what a
        # lone client pays on top of a direct call.
        start, failed, rows = self._clock(), True, plan.rows(1)
        try:
            with torch.no_grad():
                out = self._fast(*(self._stack([t], rows) for t in item))
            result = split_output(out, 1, rows)[0]
            failed = False
        finally:
            self._release_caller(rows, failed, start)
        return map_tensors(torch.Tensor.clone, result) if self.config.copy_outputs else result

    def _caller_may_run(self, key: tuple) -> bool:
        """`BatcherConfig.caller_runs`, with None resolved for this item kind: not when the model or the item is on
        a GPU."""
        if self.config.caller_runs is not None:
            return self.config.caller_runs
        return not self._model_on_gpu and all(device.type == "cpu" for _, _, device in key)

    def _claim_idle(self) -> bool:
        """Mark the batcher busy for a caller's own model call when it is idle (nothing queued, no call running)."""
        with self._lock:
            self._raise_if_closed()
            if self._pending or self._busy:
                return False
            self._busy = True
            self._stats.requests += 1
            self._stats.caller_runs += 1
            return True

    def _release_caller(self, rows: int, failed: bool, start: float) -> None:
        """The accounting of a caller's own call (as `_call` and `_finish` do for a batch), and the batcher idle
        again."""
        self._latency.add(self._clock() - start)
        with self._lock:
            _count_batch(self._stats, 1, rows)
            self._stats.failed += failed
            self._stats.completed += not failed
            self._busy = False
            if self._pending:  # requests queued meanwhile; waking the worker for nothing costs a GIL hand-off
                self._not_empty.notify()

    def _room_or_closed(self) -> bool:
        return len(self._pending) < self.config.max_queue or self._state != "open"

    def _raise_if_closed(self) -> None:
        if self._state != "open":
            raise BatcherClosed(f"DynamicBatcher is {self._state} (close() was called); submit before close()")

    def _plan(self, key: tuple, item: Sequence[Any]) -> _Plan:
        plan = self._plans.get(key)
        if plan is None:
            plan = _make_plan(item, self._profiles, self.buckets, self.max_batch)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------------------------------ worker side

    def _work(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            self._count_cancelled(len(batch) - len(live))
            try:
                if live:
                    self._run(live)
            except Exception as exc:  # a bug of ours must not hang the callers or kill the worker
                for r in live:
                    if not r.future.done():
                        self._finish(r, error=exc)
            finally:
                with self._lock:
                    self._busy = False

    def _collect(self) -> list[_Request] | None:
        """The next batch: the oldest request and up to cap - 1 later ones of its kind, once the batch is full
        or the oldest request's delay is over (at once while draining). None when closed and empty."""
        with self._lock:
            while not self._pending or self._busy:  # busy: a caller runs the model (__call__); one call at a time
                if not self._pending and self._state != "open":
                    return None
                self._not_empty.wait()
            first = self._pending[0]
            cap = first.plan.cap
            deadline = first.t_submit + self._delay_s
            while self._state == "open" and self._kind_counts[first.key] < cap:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._not_empty.wait(min(remaining, MAX_WAIT_S))
            if not self._pending or self._pending[0] is not first:  # close(drain=False) cancelled them
                return []
            taken: list[_Request] = []
            kept: collections.deque[_Request] = collections.deque()
            for r in self._pending:
                (taken if len(taken) < cap and r.key == first.key else kept).append(r)
            self._pending = kept
            self._kind_counts[first.key] -= len(taken)
            if not self._kind_counts[first.key]:
                del self._kind_counts[first.key]
            self._busy = True
            self._not_full.notify_all()
            return taken

    def _run(self, requests: list[_Request]) -> None:
        """One model call for `requests`; if it raises, each request runs alone so only failing ones fail."""
        n = len(requests)
        rows = requests[0].plan.rows(n)
        try:
            out = self._call(requests, rows)
        except Exception as exc:
            if n == 1:
                self._finish(requests[0], error=exc)
                return
            with self._lock:
                self._stats.isolated_batches += 1
            for r in requests:
                self._run([r])
            return
        try:
            results = split_output(out, n, rows)
        except ValueError as exc:
            for r in requests:
                self._finish(r, error=exc)
            return
        for r, result in zip(requests, results, strict=True):
            self._finish(r, result=map_tensors(torch.Tensor.clone, result) if self.config.copy_outputs else result)

    def _call(self, requests: list[_Request], rows: int) -> Any:
        n = len(requests)
        args = [self._stack([r.args[j] for r in requests], rows) for j in range(len(requests[0].args))]
        with self._lock:
            _count_batch(self._stats, n, rows)
        with torch.no_grad():
            return self._fast(*args)

    def _stack(self, items: list[torch.Tensor], rows: int) -> torch.Tensor:
        if rows == len(items) == 1:
            return items[0].unsqueeze(0)  # a view: no copy for a batch of one
        extra = rows - len(items)
        if extra:
            filler = items[-1] if self.config.pad == "repeat" else torch.zeros_like(items[-1])
            items = items + [filler] * extra
        return torch.stack(items)

    def _finish(self, request: _Request, *, result: Any = None, error: BaseException | None = None) -> None:
        self._latency.add(self._clock() - request.t_submit)
        with self._lock:
            if error is None:
                self._stats.completed += 1
            else:
                self._stats.failed += 1
        if error is None:
            request.future.set_result(result)
        else:
            request.future.set_exception(error)

    def _count_cancelled(self, n: int) -> None:
        if n:
            with self._lock:
                self._stats.cancelled += n

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; `drain` runs every queued one first, otherwise their futures are cancelled.

        Waits up to `timeout` seconds (None: as long as it takes) for the worker to finish the running batch
        (and the queue, when draining); TimeoutError if it has not. Calling it again is harmless.
        """
        with self._lock:
            if self._state == "open":
                self._state = "draining" if drain else "closed"
            if not drain or self._state == "closed":
                for r in self._pending:
                    # cancel() then notify, as an executor's worker would: concurrent.futures.wait() only
                    # sees a cancelled future once it is notified.
                    if r.future.cancel():
                        r.future.set_running_or_notify_cancel()
                        self._stats.cancelled += 1
                self._pending.clear()
                self._kind_counts.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()
        if threading.current_thread() is self._worker:
            return  # close() from inside the model: the worker ends after this batch
        self._worker.join(timeout)
        if self._worker.is_alive():
            raise TimeoutError(f"DynamicBatcher worker still running {timeout} s after close(); the model call hangs")
        with self._lock:
            self._state = "closed"

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def stats(self) -> BatcherStats:
        """A snapshot of the counters (see `BatcherStats`)."""
        with self._lock:
            snap = dataclasses.replace(
                self._stats,
                batch_sizes=dict(sorted(self._stats.batch_sizes.items())),
                run_sizes=dict(sorted(self._stats.run_sizes.items())),
                queue_depth=len(self._pending),
            )
        snap.p50_ms = self._latency.ms(50)
        snap.p99_ms = self._latency.ms(99)
        return snap

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(drain=True)

    def __repr__(self) -> str:
        return (
            f"DynamicBatcher(max_batch={self.max_batch}, max_delay_ms={self.config.max_delay_ms},"
            f" buckets={self.buckets}, state={self._state!r})"
        )


# ---------------------------------------------------------------------------------------------- profiles


def _count_batch(stats: BatcherStats, n: int, rows: int) -> None:
    """Count one model call of `n` items run as `rows` rows (the caller holds the batcher's lock)."""
    stats.batches += 1
    stats.batch_sizes[n] = stats.batch_sizes.get(n, 0) + 1
    stats.run_sizes[rows] = stats.run_sizes.get(rows, 0) + 1
    stats.padded_rows += rows - n


def _runs_on_gpu(fast: Any) -> bool:
    """Whether `fast` declares a non-CPU device (`torchopt.OptimizedModule.runtime.device`, or an nn.Module's
    parameters); a plain callable declares none."""
    device = getattr(getattr(fast, "runtime", None), "device", None)
    if device is None and isinstance(fast, torch.nn.Module):
        device = next((p.device for p in fast.parameters()), None)
    return device is not None and torch.device(device).type != "cpu"


def _profiles_of(fast: Any) -> list[list[InputSpec]] | None:
    """The model's input profiles when it has them (a `torchopt.OptimizedModule`), else None."""
    profiles = getattr(fast, "profiles", None)
    if not isinstance(profiles, (list, tuple)) or not profiles:
        return None
    if not all(isinstance(p, (list, tuple)) and p and all(isinstance(s, InputSpec) for s in p) for p in profiles):
        return None
    for i, profile in enumerate(profiles):
        for spec in profile:
            if spec.rank == 0:
                raise ValueError(
                    f"fast.profiles[{i}] input {spec.name!r} is a scalar; the batcher stacks items along dim 0"
                )
    return [list(p) for p in profiles]


def _batch_range(profile: list[InputSpec]) -> tuple[int, int]:
    """Batch sizes the profile accepts: where every input's dim 0 range overlaps."""
    return max(s.min[0] for s in profile), min(s.max[0] for s in profile)


def _profile_batch_max(profiles: list[list[InputSpec]]) -> int:
    return max(_batch_range(p)[1] for p in profiles)


def _resolve_buckets(buckets: list[int] | str | None, profiles: list[list[InputSpec]] | None) -> list[int] | None:
    if buckets is None:
        return None
    if buckets == "profile":
        if profiles is None:
            raise ValueError(
                'BatcherConfig.buckets="profile" needs a model with input profiles (fast.profiles, e.g. a'
                " torchopt.OptimizedModule); give a list of batch sizes instead"
            )
        sizes: set[int] = set()
        for p in profiles:
            lo, hi = _batch_range(p)
            sizes.update({lo, hi, min(hi, max(lo, p[0].opt[0]))})
            sizes.update(2**k for k in range(hi.bit_length()) if lo <= 2**k <= hi)
        return sorted(sizes)
    if profiles is not None and buckets[-1] > _profile_batch_max(profiles):
        raise ValueError(
            f"BatcherConfig.buckets {buckets} go up to {buckets[-1]}, above the batch max"
            f" {_profile_batch_max(profiles)} of fast's input profiles {_describe(profiles)}"
        )
    return list(buckets)


def _resolve_max_batch(max_batch: int | None, buckets: list[int] | None, profiles: list[list[InputSpec]] | None):
    limit = _profile_batch_max(profiles) if profiles is not None else None
    if max_batch is None:
        candidates = [v for v in (limit, buckets[-1] if buckets else None) if v is not None]
        return min(candidates) if candidates else DEFAULT_MAX_BATCH
    if limit is not None and max_batch > limit:
        raise ValueError(
            f"BatcherConfig.max_batch {max_batch} exceeds the batch max {limit} of fast's input profiles"
            f" {_describe(profiles)}; use max_batch <= {limit} or leave it None to take the profile's"
        )
    if buckets and max_batch > buckets[-1]:
        raise ValueError(
            f"BatcherConfig.max_batch {max_batch} exceeds the largest bucket {buckets[-1]} (buckets {buckets})"
        )
    return max_batch


def _describe(profiles: list[list[InputSpec]]) -> str:
    return "; ".join(", ".join(f"{s.name}: min {s.min}, max {s.max}" for s in p) for p in profiles)


def _kind(item: Sequence[Any]) -> tuple:
    """What items must share to be stacked: per tensor its shape, dtype and device."""
    if not item:
        raise TypeError("submit needs at least one tensor: one item, without the batch dim")
    for i, t in enumerate(item):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"submit argument {i} must be a torch.Tensor (one item, no batch dim), got {type(t).__name__}"
            )
    return tuple((tuple(t.shape), t.dtype, t.device) for t in item)


def _make_plan(item: Sequence[torch.Tensor], profiles, buckets: list[int] | None, max_batch: int) -> _Plan:
    """The batch plan of an item kind; TypeError/ValueError when the model's profiles cannot take the item."""
    if profiles is None:
        ranges: list[tuple[int, int]] = [(1, max_batch)]
    else:
        ranges = sorted(_batch_range(p) for p in profiles if _item_fits(p, item))
        if not ranges:
            _raise_item_misfit(profiles, item)
    allowed = None
    if buckets is not None:
        allowed = tuple(b for b in buckets if any(lo <= b <= hi for lo, hi in ranges))
        if not allowed:
            raise ValueError(
                f"no bucket of {buckets} is a batch size the profiles accept for items of shapes"
                f" {[tuple(t.shape) for t in item]} (batch ranges {ranges})"
            )
    top = allowed[-1] if allowed else ranges[-1][1]
    return _Plan(cap=min(max_batch, top), ranges=tuple(ranges), buckets=allowed)


def _item_fits(profile: list[InputSpec], item: Sequence[torch.Tensor]) -> bool:
    return len(item) == len(profile) and all(
        t.dim() == s.rank - 1
        and all(lo <= d <= hi for d, lo, hi in zip(t.shape, s.min[1:], s.max[1:], strict=True))
        and t.is_floating_point() == s.torch_dtype.is_floating_point
        for s, t in zip(profile, item, strict=True)
    )


def _raise_item_misfit(profiles: list[list[InputSpec]], item: Sequence[torch.Tensor]) -> None:
    """The precise reason profile 0 rejects the item (inputs, rank, dim range or dtype kind)."""
    profile = profiles[0]
    names = [s.name for s in profile]
    if len(item) != len(profile):
        raise TypeError(f"submit got {len(item)} tensors; the model takes {len(profile)} inputs {names} (one each)")
    for s, t in zip(profile, item, strict=True):
        if t.dim() != s.rank - 1:
            raise ValueError(
                f"input {s.name!r} item has shape {tuple(t.shape)} (rank {t.dim()}); submit takes one item without"
                f" the batch dim, rank {s.rank - 1} for the profile min {s.min}, max {s.max}"
            )
        if t.is_floating_point() != s.torch_dtype.is_floating_point:
            raise TypeError(f"input {s.name!r} item has dtype {t.dtype}, the profile expects {s.dtype}")
        for d, (size, lo, hi) in enumerate(zip(t.shape, s.min[1:], s.max[1:], strict=True)):
            if not lo <= size <= hi:
                raise ValueError(
                    f"input {s.name!r} item dim {d} (model dim {d + 1}) is {size}, outside the profile range"
                    f" [{lo}, {hi}] (item shape {tuple(t.shape)}; profile min {s.min}, max {s.max})"
                )
    shapes = {s.name: tuple(t.shape) for s, t in zip(profile, item, strict=True)}
    raise ValueError(f"item shapes {shapes} fit none of the model's input profiles: {_describe(profiles)}")
