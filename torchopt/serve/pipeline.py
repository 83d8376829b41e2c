"""`AsyncPipeline`: stages such as decode → preprocess → infer → postprocess, each on its own threads, joined by
bounded queues, so that every stage works on a different item at the same time.

Each item travels through the stages in order; a stage's function takes the previous stage's result. An item
whose stage raises stops there and its Future gets that exception (with a note naming the stage); the other
items are not affected. Queues are bounded (``PipelineConfig.queue_size`` per stage, or the stage's own), so a
slow stage blocks the ones before it and finally `submit`: memory stays bounded and the producer slows down.

Statistics per stage: items, failures, busy time (inside the stage function, by the pipeline's clock), the
time per item, queue depth, p50/p99 of the stage time, and the time spent blocked on a full downstream queue.
``stats().bottleneck`` is the stage with the largest busy time per item divided by its thread count, i.e. the
lowest capacity in items per second: the stage that limits the pipeline's throughput, and the one to give more
threads (or a faster implementation).

On CUDA (with ``PipelineConfig.cuda_streams``) each worker thread runs its stage on its own CUDA stream; an item
carries an event recorded after each stage, the next stage's stream waits on it (and its tensors are recorded
on that stream for the caching allocator), and the last stage synchronizes the event before the Future is
resolved, so results are ready for any stream and for the CPU. On the CPU the stages simply run on threads;
PyTorch releases the GIL inside its operators, so tensor-heavy stages overlap.

A `torchopt.FrameFeeder` can feed a pipeline (``pipeline.map(x.clone() for x in feeder)``: its batches are
valid only until its next one) and ``torchopt.kernels.preprocess`` can be a stage.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from torchopt.config import ConfigBase, check_positive, check_range, check_type, resolve_device
from torchopt.serve._common import LatencySamples, add_note, check_clock

__all__ = ["AsyncPipeline", "PipelineClosed", "PipelineConfig", "PipelineStats", "Stage", "StageStats"]

_STOP: Any = object()  # end-of-work marker: one per worker thread, after every item queued before it
_UNSET: Any = object()


@dataclasses.dataclass
class PipelineConfig(ConfigBase):
    """Options of `AsyncPipeline`.

    queue_size: items that may wait in front of each stage (a `Stage` may set its own).
    submit_timeout: seconds `submit` waits for room in the first queue before raising `queue.Full`; None
        waits as long as it takes.
    cuda_streams: on CUDA, one stream per worker thread with event hand-offs between stages (see the module
        docs); False runs every stage on the default stream. Ignored without CUDA.
    device: the CUDA device the stages run on ("cuda:1", "cuda" or an index); the workers' streams and
        current device are set to it. None: the current device of the thread that builds the pipeline.
    """

    queue_size: int = 8
    submit_timeout: float | None = None
    cuda_streams: bool = True
    device: str | int | None = None

    def __post_init__(self) -> None:
        check_positive("PipelineConfig.queue_size", self.queue_size)
        if self.submit_timeout is not None:
            check_range("PipelineConfig.submit_timeout", self.submit_timeout, low=0)
        check_type("PipelineConfig.cuda_streams", self.cuda_streams, bool)
        if self.device is not None:
            check_type("PipelineConfig.device", self.device, (str, int), "a CUDA device like 'cuda:1' or an index")


def _stage_device(device: str | int | None) -> torch.device | None:
    """The CUDA device of the stages: the configured one, else the current one on CUDA; None without CUDA."""
    if device is not None:
        return resolve_device("PipelineConfig.device", device, kinds=("cuda",))
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


@dataclasses.dataclass
class Stage:
    """One pipeline stage: `fn(item) -> item` run by `threads` threads; `queue_size` overrides the config's."""

    name: str
    fn: Callable[[Any], Any]
    threads: int = 1
    queue_size: int | None = None

    def __post_init__(self) -> None:
        check_type("Stage.name", self.name, str)
        if not self.name:
            raise ValueError("Stage.name must be a non-empty string, got ''")
        if not callable(self.fn):
            raise TypeError(f"Stage {self.name!r} fn must be callable (item -> item), got {type(self.fn).__name__}")
        check_positive(f"Stage {self.name!r} threads", self.threads)
        if self.queue_size is not None:
            check_positive(f"Stage {self.name!r} queue_size", self.queue_size)


class PipelineClosed(RuntimeError):
    """`submit` or `map` on an `AsyncPipeline` that is closing or closed."""


@dataclasses.dataclass
class StageStats:
    """A snapshot of one stage: items done and failed, busy seconds inside its function (by the pipeline's
    clock), blocked seconds waiting for room downstream, queue depth now and at most, and p50/p99 of its time
    per item in milliseconds."""

    name: str
    threads: int
    items: int = 0
    failures: int = 0
    busy_s: float = 0.0
    blocked_s: float = 0.0
    queue_depth: int = 0
    max_queue_depth: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def time_per_item_ms(self) -> float | None:
        """Busy time per item (ms), None before the first item."""
        runs = self.items + self.failures
        return self.busy_s / runs * 1e3 if runs else None

    @property
    def capacity_per_s(self) -> float | None:
        """Items per second the stage could do with all its threads busy (threads / time per item)."""
        t = self.time_per_item_ms
        return self.threads / (t / 1e3) if t else None


@dataclasses.dataclass
class PipelineStats:
    """A snapshot of an `AsyncPipeline`: per-stage stats (in stage order), items submitted, completed, failed
    and cancelled, end-to-end p50/p99 latency (ms), completed items per second since the first submit, and the
    `bottleneck` stage (largest busy time per item per thread; None before any stage ran)."""

    stages: dict[str, StageStats]
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput_per_s: float | None = None

    @property
    def bottleneck(self) -> str | None:
        loads = {
            name: s.busy_s / (s.items + s.failures) / s.threads
            for name, s in self.stages.items()
            if s.items + s.failures
        }
        return max(loads, key=loads.__getitem__) if loads else None

    @property
    def in_flight(self) -> int:
        return self.submitted - self.completed - self.failed - self.cancelled


@dataclasses.dataclass
class _Job:
    payload: Any
    future: concurrent.futures.Future
    t_submit: float
    event: Any = None  # torch.cuda.Event after the previous stage, on CUDA with streams


class _StageRuntime:
    def __init__(self, stage: Stage, queue_size: int) -> None:
        self.stage = stage
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self.threads: list[threading.Thread] = []
        self.stats = StageStats(stage.name, stage.threads)
        self.latency = LatencySamples()
        self.running = stage.threads  # worker threads not yet stopped


class AsyncPipeline:
    """Run items through `stages` concurrently, each stage on its own threads, with bounded queues between.

    stages: `Stage` records or ``(name, fn)`` / ``(name, fn, threads)`` tuples, in order.
    config: a `PipelineConfig`; keyword `overrides` (its field names) replace single options.
    clock: seconds as a float (default `time.perf_counter`) for busy times and latencies.

    Example::

        stages = [
            Stage("decode", decode_jpeg, threads=4),
            Stage("preprocess", functools.partial(torchopt.kernels.preprocess, size=224, layout="NCHW")),
            Stage("infer", fast),
            Stage("postprocess", lambda logits: logits.argmax(-1).tolist()),
        ]
        with AsyncPipeline(stages, queue_size=4) as pipe:
            for labels in pipe.map(jpeg_bytes_iter):   # results in input order
                ...
            print(pipe.stats().bottleneck)
    """

    def __init__(
        self,
        stages: Iterable[Stage | tuple],
        config: PipelineConfig | None = None,
        *,
        clock: Any = None,
        **overrides: Any,
    ):
        cfg = PipelineConfig.merge(config, where="AsyncPipeline options", **overrides)
        self.config = cfg
        self.stages = _as_stages(stages)
        self._clock = check_clock(clock)
        self._streams = cfg.cuda_streams and torch.cuda.is_available()
        self.device = _stage_device(cfg.device)
        self._runtimes = [_StageRuntime(s, s.queue_size or cfg.queue_size) for s in self.stages]

        self._lock = threading.Lock()  # counters and state
        self._submit_lock = threading.Lock()  # orders submits before close()'s stop markers
        self._state = "open"  # -> "draining" / "cancelling" -> "closed"
        self._submitted = self._completed = self._failed = self._cancelled = 0
        self._t_first: float | None = None
        self._latency = LatencySamples()
        for i, rt in enumerate(self._runtimes):
            for j in range(rt.stage.threads):
                t = threading.Thread(
                    target=self._work, args=(i,), name=f"torchopt-pipeline-{rt.stage.name}-{j}", daemon=True
                )
                rt.threads.append(t)
                t.start()

    # ------------------------------------------------------------------------------------------ input side

    def submit(self, item: Any, timeout: float | None = _UNSET) -> concurrent.futures.Future:
        """Queue `item` for the first stage; its Future gets the last stage's result or the failing stage's
        exception. Blocks while the first queue is full, up to `timeout` seconds (default
        ``PipelineConfig.submit_timeout``), then raises `queue.Full`; `PipelineClosed` after `close`."""
        wait = self.config.submit_timeout if timeout is _UNSET else timeout
        if wait is not None:
            check_range("submit timeout", wait, low=0)
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._submit_lock.acquire(timeout=-1 if wait is None else wait):
            raise queue.Full(f"AsyncPipeline.submit: other submits held the first queue for {wait} s")
        try:
            self._raise_if_closed()
            now = self._clock()
            job = _Job(item, future, now, self._ready_event())
            try:
                self._runtimes[0].queue.put(job, timeout=wait)
            except queue.Full:
                raise queue.Full(
                    f"AsyncPipeline's first stage {self.stages[0].name!r} queue is full"
                    f" ({self._runtimes[0].queue.maxsize} items) after waiting {wait} s; the bottleneck stage is"
                    f" {self.stats().bottleneck!r}"
                ) from None
            with self._lock:
                self._submitted += 1
                if self._t_first is None:
                    self._t_first = now
            self._note_depth(self._runtimes[0])
        finally:
            self._submit_lock.release()
        return future

    def map(
        self,
        items: Iterable[Any],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        window: int | None = None,
    ) -> Iterator[Any]:
        """Results of `items` through the pipeline: in input order (`ordered`) or as they complete.

        At most `window` items are in flight (default: what the queues and threads hold, enough to keep every
        stage busy). A failed item raises its exception when its turn comes (ending the iteration), or is
        yielded as the exception object with `return_exceptions`. Leaving the loop early cancels the items
        not yet started.
        """
        if window is None:
            window = sum(rt.queue.maxsize + rt.stage.threads for rt in self._runtimes)
        check_positive("map window", window)
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        source = iter(items)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(self.submit(item))
                if not pending:
                    return
                yield _outcome(_next_future(pending, ordered), return_exceptions)
        finally:
            for f in pending:
                f.cancel()

    def _raise_if_closed(self) -> None:
        if self._state != "open":
            raise PipelineClosed(f"AsyncPipeline is {self._state} (close() was called); submit before close()")

    def _ready_event(self) -> Any:
        """On CUDA, an event after the caller's queued work, so the first stage's stream waits for its inputs."""
        if not self._streams:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # ------------------------------------------------------------------------------------------ workers

    def _work(self, index: int) -> None:
        rt = self._runtimes[index]
        if self.device is not None:
            torch.cuda.set_device(self.device)  # the current device is per thread: cuda:0 in a new one
        stream = torch.cuda.Stream(self.device) if self._streams else None
        while True:
            job = rt.queue.get()
            if job is _STOP:
                self._stop_after(index)
                return
            if not self._start(index, job):
                continue
            try:
                result = self._apply(rt, job, stream)
            except Exception as exc:
                add_note(exc, f"in AsyncPipeline stage {rt.stage.name!r}")
                self._resolve(rt, job, error=exc)
                continue
            job.payload = result
            if index + 1 == len(self._runtimes):
                if job.event is not None:
                    job.event.synchronize()
                self._resolve(rt, job)
            else:
                self._hand_on(rt, self._runtimes[index + 1], job)

    def _start(self, index: int, job: _Job) -> bool:
        """False when the job is not to be run: cancelled by its caller, or by close(drain=False)."""
        if index == 0 and not job.future.set_running_or_notify_cancel():
            with self._lock:
                self._cancelled += 1
            return False
        if self._state == "cancelling":
            job.future.set_exception(concurrent.futures.CancelledError("AsyncPipeline closed with drain=False"))
            with self._lock:
                self._cancelled += 1
            return False
        return True

    def _apply(self, rt: _StageRuntime, job: _Job, stream: Any) -> Any:
        """Run the stage function on `job`, timing it; on CUDA on this thread's stream after the job's event."""
        t0 = self._clock()
        try:
            if stream is None:
                return rt.stage.fn(job.payload)
            with torch.cuda.stream(stream):
                if job.event is not None:
                    stream.wait_event(job.event)
                _record_on(job.payload, stream)
                result = rt.stage.fn(job.payload)
                job.event = torch.cuda.Event()
                job.event.record(stream)
                return result
        finally:
            elapsed = self._clock() - t0
            rt.latency.add(elapsed)
            with self._lock:
                rt.stats.busy_s += elapsed

    def _hand_on(self, rt: _StageRuntime, nxt: _StageRuntime, job: _Job) -> None:
        t0 = self._clock()
        nxt.queue.put(job)  # blocks while the next stage is behind: back-pressure
        blocked = self._clock() - t0
        with self._lock:
            rt.stats.items += 1
            rt.stats.blocked_s += blocked
        self._note_depth(nxt)

    def _resolve(self, rt: _StageRuntime, job: _Job, error: BaseException | None = None) -> None:
        """Finish a job in stage `rt`: the last stage with its result, or any stage with `error`."""
        self._latency.add(self._clock() - job.t_submit)
        with self._lock:
            if error is None:
                self._completed += 1
                rt.stats.items += 1
            else:
                self._failed += 1
                rt.stats.failures += 1
        if error is None:
            job.future.set_result(job.payload)
        else:
            job.future.set_exception(error)

    def _note_depth(self, rt: _StageRuntime) -> None:
        depth = rt.queue.qsize()
        with self._lock:
            rt.stats.max_queue_depth = max(rt.stats.max_queue_depth, depth)

    def _stop_after(self, index: int) -> None:
        """A worker of stage `index` got its stop marker; the last one passes the markers to the next stage,
        behind every item it queued there."""
        rt = self._runtimes[index]
        with self._lock:
            rt.running -= 1
            last = rt.running == 0
        if last and index + 1 < len(self._runtimes):
            nxt = self._runtimes[index + 1]
            for _ in range(nxt.stage.threads):
                nxt.queue.put(_STOP)

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting items; `drain` finishes every queued item, otherwise the items not yet finished get
        ``CancelledError``. Waits up to `timeout` seconds per stage for the threads (TimeoutError if they do not
        end: a stage function hangs). Calling it again is harmless."""
        with self._lock:
            first_call = self._state == "open"
            if first_call:
                self._state = "draining" if drain else "cancelling"
            elif not drain and self._state == "draining":
                self._state = "cancelling"
        if first_call:
            with self._submit_lock:  # a submit in progress gets its item in ahead of the markers
                for _ in range(self.stages[0].threads):
                    self._runtimes[0].queue.put(_STOP)
        for rt in self._runtimes:
            for t in rt.threads:
                if t is not threading.current_thread():
                    t.join(timeout)
                if t.is_alive() and t is not threading.current_thread():
                    raise TimeoutError(
                        f"AsyncPipeline stage {rt.stage.name!r} thread still running {timeout} s after close()"
                    )
        with self._lock:
            self._state = "closed"

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def stats(self) -> PipelineStats:
        """A snapshot of the counters (see `PipelineStats` and `StageStats`)."""
        stages = {}
        for rt in self._runtimes:
            with self._lock:
                snap = dataclasses.replace(rt.stats, queue_depth=rt.queue.qsize())
            snap.p50_ms, snap.p99_ms = rt.latency.ms(50), rt.latency.ms(99)
            stages[rt.stage.name] = snap
        now = self._clock()
        with self._lock:
            elapsed = now - self._t_first if self._t_first is not None else 0.0
            out = PipelineStats(
                stages,
                submitted=self._submitted,
                completed=self._completed,
                failed=self._failed,
                cancelled=self._cancelled,
                throughput_per_s=self._completed / elapsed if elapsed > 0 else None,
            )
        out.p50_ms, out.p99_ms = self._latency.ms(50), self._latency.ms(99)
        return out

    def __enter__(self) -> AsyncPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(drain=True)

    def __repr__(self) -> str:
        stages = " -> ".join(f"{s.name}×{s.threads}" for s in self.stages)
        return f"AsyncPipeline({stages}, state={self._state!r})"


def _as_stages(stages: Any) -> list[Stage]:
    check_type("stages", stages, (list, tuple), "a list of Stage or (name, fn[, threads]) tuples")
    if not stages:
        raise ValueError("stages must name at least one stage, got an empty list")
    out = []
    for i, s in enumerate(stages):
        if isinstance(s, Stage):
            out.append(s)
        elif isinstance(s, tuple) and len(s) in (2, 3):
            out.append(Stage(*s))
        else:
            raise TypeError(f"stages[{i}] must be a Stage or a (name, fn[, threads]) tuple, got {s!r}")
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"stage names must be unique; {dupes} appear more than once in {names}")
    return out


def _next_future(pending: collections.deque[concurrent.futures.Future], ordered: bool) -> concurrent.futures.Future:
    if ordered:
        return pending.popleft()
    done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
    future = next(f for f in pending if f in done)  # the oldest of those done
    pending.remove(future)
    return future


def _outcome(future: concurrent.futures.Future, return_exceptions: bool) -> Any:
    try:
        return future.result()
    except (Exception, concurrent.futures.CancelledError) as exc:
        if return_exceptions:
            return exc
        raise


def _record_on(tree: Any, stream: Any) -> None:
    """Tell the caching allocator that the CUDA tensors in `tree` are used on `stream` too."""
    if isinstance(tree, torch.Tensor):
        if tree.is_cuda:
            tree.record_stream(stream)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _record_on(v, stream)
    elif isinstance(tree, dict):
        for v in tree.values():
            _record_on(v, stream)
