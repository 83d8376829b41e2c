"""`FrameFeeder`: host video frames in, model-ready GPU batches out, the upload hidden behind the GPU work.

Pipeline (a batch of ``batch_size`` frames moves through the stages; each stage works on a different batch)::

    producer (your decoder thread, or a thread over `source`)
      put(frame) ── host memcpy (see async_copy) ──► pinned staging slot s            (ring of `num_slots`)
    dispatcher thread
      copy stream:    slot s ── H2D, uint8 ──► device input buffer s                  (ring of `num_slots`)
      compute stream: transform(device input s, out=output buffer r)                  (ring of `num_outputs`)
    consumer (your loop)
      for x in feeder: model(x)          # x is output buffer r, ordered after the transform by an event

So the H2D copy of batch k+1 runs on the copy engine while the SMs preprocess batch k and run the model on it,
and the producer fills slot k+2 on the CPU at the same time. All buffers and CUDA events are allocated at
warm-up (the first frame, or construction when `FeederConfig.frame_shape` is set, and the first batch on the
device); afterwards no memory is allocated per batch, provided the transform writes into the ``out=`` tensor
it is given (the default transform, `torchopt.kernels.preprocess`, does).

Design (measurements and rejected alternatives: benchmarks/results/feeder_notes.md): only raw uint8 crosses
PCIe and the preprocessing runs on the GPU after the upload (the fp16 batch would be 2x the bytes, host resizing
costs more CPU than the copy); the pipeline is bound by bytes moved, so the goal is a busy copy engine. DMA needs
page-locked memory: frames are staged explicitly into the pinned ring, by one parallel `copy_` per frame in
`put` (the caller may reuse its buffer on return) or, with ``async_copy=True``, on `copy_threads` threads
(`put` returns at once; the frame must stay untouched). A decoder that can write into a given buffer should
write straight into the slot through `frame_buffer()`: no host memcpy at all.

The staging slots are ordinary host tensors page-locked with ``cudaHostRegister`` rather than
``pin_memory=True``: PyTorch's caching host allocator rounds every block up to a power of two (a 199 MB slot
would take 256 MB) and keeps freed blocks cached, while `close()` must give the pinned memory back.

Lifetime contract: a batch returned by ``next(feeder)`` / `get` stays valid until your next call to
``next``/`get`/`close`. That call records an event on your current CUDA stream, and the feeder overwrites the
buffer only after that event, so GPU work you queued on the current stream (the model) is safe without any
synchronization. To keep a batch longer, ``.clone()`` it; if you used it on another stream, make the current
stream wait for that stream before asking for the next batch. One consumer thread at a time.

Back-pressure: at most ``num_slots + num_outputs`` batches wait ahead of the batch the consumer holds; then
`put` blocks (or raises TimeoutError after `put_timeout`), which slows the decoder down instead of dropping
frames or growing memory.

On a machine without CUDA (or with ``device="cpu"``) the same pipeline runs with plain host buffers, no
streams and no H2D step: the transform runs on the CPU in the dispatcher thread, so ordering, back-pressure,
errors and `close` behave exactly as on the GPU.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from torchopt import kernels
from torchopt.config import ConfigBase, check_positive, check_type, resolve_device

__all__ = ["FeederClosedError", "FeederConfig", "FeederStats", "FrameFeeder", "default_transform"]

# Options of the default transform: model-ready fp16, ImageNet normalization (the preprocessing options are
# declared, defaulted and checked by torchopt.kernels.preprocess; these only override its defaults).
DEFAULT_PREPROCESS: dict[str, Any] = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "dtype": "float16",
}
# preprocess() arguments the feeder sets itself.
_FEEDER_OWNED = {
    "size": "use FeederConfig.size",
    "out": "the feeder passes its output buffer",
    "return_params": "the feeder needs a tensor result",
}
# How long close() waits for the `source` thread when it is stuck inside the source (e.g. a camera read).
_SOURCE_JOIN_S = 5.0
_END = object()  # end-of-stream marker in the ready queue
_UNSET: Any = object()


@dataclasses.dataclass
class FeederConfig(ConfigBase):
    """Options of `FrameFeeder`.

    batch_size: frames per batch (the last batch may be smaller, see `drop_last`).
    size, preprocess: the default transform is ``torchopt.kernels.preprocess(batch, size, **preprocess)``;
        `preprocess` holds its keyword options (mean, std, dtype, layout, format, interpolation, fit, ...),
        checked by the kernels when the frame shape is known; a dict you pass replaces the default (fp16,
        ImageNet mean/std) as a whole. Ignored when you pass your own transform.
    frame_shape: shape of every frame, (H, W, C) or (rows, W) for 2-D formats such as NV12; None takes it
        from the first frame. Given, the host buffers are allocated at construction, not on the first `put`.
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    num_slots: batches in the pinned staging ring (and in the device uint8 ring); 2 is the minimum for
        overlap, 3 lets the producer fill one slot while one uploads and one waits.
    num_outputs: model-ready batches in the output ring: one held by the consumer, the rest computed ahead.
    async_copy: False (default): `put` returns once the frame is in the staging slot, so the caller may reuse
        its buffer; the copy runs on torch's intra-op threads (`torch.set_num_threads`). True: `put` returns at
        once and `copy_threads` threads copy whole frames in parallel (1080p on a 16-core host: 42 GB/s against
        26 GB/s); the caller must then not modify a frame after putting it. That holds for decoders that return
        a new array per frame (PyAV, torchcodec, OpenCV ``read()`` without a buffer argument); a decoder that
        can write into a buffer it is given should use `frame_buffer` instead (no copy at all).
    copy_threads: with `async_copy`, the threads copying frames into the pinned slots (about 3/4 of the cores
        was best on a 16-core host; more threads compete with the DMA engine for memory bandwidth).
    put_timeout: seconds `put` waits for a free slot before raising TimeoutError; None waits forever.
    get_timeout: seconds ``next``/`get` waits for a batch before raising TimeoutError; None waits forever.
    drop_last: drop a last batch smaller than `batch_size` instead of delivering it.

    Memory: num_slots × batch_size × frame bytes of pinned host memory (3 × 32 × 6.2 MB = 597 MB for 1080p),
    as much device memory for the uint8 inputs, and num_outputs model-ready batches.
    """

    batch_size: int = 32
    size: tuple[int, int] = (224, 224)
    preprocess: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PREPROCESS))
    frame_shape: tuple[int, ...] | None = None
    device: str = "auto"
    num_slots: int = 3
    num_outputs: int = 3
    async_copy: bool = False
    copy_threads: int = 8
    put_timeout: float | None = None
    get_timeout: float | None = None
    drop_last: bool = False

    def __post_init__(self) -> None:
        check_positive("FeederConfig.batch_size", self.batch_size)
        self.size = _int_tuple("FeederConfig.size", self.size, 2)
        check_type("FeederConfig.preprocess", self.preprocess, dict, "a dict of preprocess() keyword options")
        for key, value in list(self.preprocess.items()):
            check_type(f"FeederConfig.preprocess key {key!r}", key, str)
            if key in _FEEDER_OWNED:
                raise ValueError(f"FeederConfig.preprocess must not set {key!r}: {_FEEDER_OWNED[key]}, got {value!r}")
            if isinstance(value, torch.dtype):  # JSON-friendly: "float16", not torch.float16
                self.preprocess[key] = str(value).removeprefix("torch.")
            elif isinstance(value, list):  # a JSON round trip turns tuples into lists
                self.preprocess[key] = tuple(value)
        if self.frame_shape is not None:
            check_type("FeederConfig.frame_shape", self.frame_shape, (list, tuple), "(H, W, C) or (rows, W)")
            self.frame_shape = _int_tuple("FeederConfig.frame_shape", self.frame_shape, len(self.frame_shape))
            if len(self.frame_shape) not in (2, 3):
                raise ValueError(f"FeederConfig.frame_shape must be (H, W, C) or (rows, W), got {self.frame_shape}")
        check_type("FeederConfig.device", self.device, str)
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(
                    f"FeederConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
                ) from exc
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(
                    f"FeederConfig.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
                    f" (the feeder's streams and pinned memory are CUDA features)"
                )
        for name in ("num_slots", "num_outputs"):
            check_positive(f"FeederConfig.{name}", getattr(self, name))
            if getattr(self, name) < 2:
                raise ValueError(
                    f"FeederConfig.{name} must be >= 2 (one buffer in use while the next one is filled),"
                    f" got {getattr(self, name)}"
                )
        check_type("FeederConfig.async_copy", self.async_copy, bool)
        check_positive("FeederConfig.copy_threads", self.copy_threads)
        for name in ("put_timeout", "get_timeout"):
            value = getattr(self, name)
            if value is not None:
                check_positive(f"FeederConfig.{name}", value, types_=(int, float))
        check_type("FeederConfig.drop_last", self.drop_last, bool)


def _int_tuple(name: str, value: Any, length: int) -> tuple[int, ...]:
    check_type(name, value, (list, tuple), f"a sequence of {length} ints")
    if len(value) != length:
        raise ValueError(f"{name} must have {length} values, got {len(value)}: {tuple(value)}")
    for i, v in enumerate(value):
        check_positive(f"{name}[{i}]", v)
    return tuple(value)


@dataclasses.dataclass
class FeederStats:
    """Counters of a `FrameFeeder` (a snapshot; `FrameFeeder.stats` returns a fresh one).

    put_wait_s is time producers spent blocked on a full ring (the consumer or the GPU is the bottleneck),
    get_wait_s time the consumer spent waiting for a batch (the producer or the upload is the bottleneck),
    copy_s time spent copying frames into the staging slots.
    """

    frames: int = 0
    batches: int = 0
    delivered: int = 0
    put_wait_s: float = 0.0
    get_wait_s: float = 0.0
    copy_s: float = 0.0


class FeederClosedError(RuntimeError):
    """Raised by `put`/`get` on a `FrameFeeder` that was closed (also to a producer blocked in `put`)."""


def default_transform(config: FeederConfig) -> Callable[..., torch.Tensor]:
    """``torchopt.kernels.preprocess`` with `config.size` and the options in `config.preprocess` bound.

    Example::

        fn = default_transform(FeederConfig(size=(224, 224), preprocess={"dtype": "float16"}))
        x = fn(torch.zeros(2, 1080, 1920, 3, dtype=torch.uint8))  # (2, 3, 224, 224) float16
    """
    signature = inspect.signature(kernels.preprocess)
    try:
        signature.bind(None, config.size, **config.preprocess)
    except TypeError as exc:
        valid = [n for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY and n not in _FEEDER_OWNED]
        raise TypeError(
            f"FeederConfig.preprocess={config.preprocess} does not fit torchopt.kernels.preprocess: {exc};"
            f" its options: {', '.join(valid)}"
        ) from exc
    return functools.partial(kernels.preprocess, size=config.size, **config.preprocess)


def _accepts_out(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == "out" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _frame_array(frame: Any, index: int) -> np.ndarray:
    """A numpy view of one host HWC uint8 frame, or a TypeError/ValueError naming the frame."""
    where = f"frame #{index}"
    if isinstance(frame, torch.Tensor):
        if frame.device.type != "cpu":
            raise ValueError(
                f"{where} must be in host memory (a CPU tensor or a numpy array), got a tensor on {frame.device}"
            )
        if frame.dtype != torch.uint8:
            raise TypeError(f"{where} must have dtype uint8 (decoded 8-bit pixels), got {frame.dtype}")
        frame = frame.numpy()  # a view: strided tensors map to strided arrays, no copy
    elif not isinstance(frame, np.ndarray):
        raise TypeError(
            f"{where} must be a numpy.ndarray or a CPU torch.Tensor of uint8 with shape (H, W, C),"
            f" got {type(frame).__name__}"
        )
    if frame.dtype != np.uint8:
        raise TypeError(f"{where} must have dtype uint8 (decoded 8-bit pixels), got {frame.dtype}")
    if frame.ndim not in (2, 3):
        hint = " (a batch? put() takes one frame at a time)" if frame.ndim == 4 else ""
        raise ValueError(
            f"{where} must be one image of shape (H, W, C), or (rows, W) for NV12/I420/gray, got shape"
            f" {frame.shape}{hint}"
        )
    if frame.size == 0:
        raise ValueError(f"{where} is empty: shape {frame.shape}")
    return frame


def _copy_frame(dst: torch.Tensor, dst_np: np.ndarray, src: np.ndarray | torch.Tensor) -> None:
    """Copy one frame on torch's intra-op threads (one C++ parallel region: no per-band Python hand-off,
    which costs more than it saves), or with numpy where torch cannot view the array."""
    if isinstance(src, torch.Tensor):
        dst.copy_(src)
    elif src.flags.writeable and all(st >= 0 for st in src.strides):
        dst.copy_(torch.from_numpy(src))  # read-only or negatively strided arrays cannot be viewed by torch
    else:
        np.copyto(dst_np, src)


def _chw_hint(shape: tuple[int, ...]) -> str:
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4):
        return f"; shape {shape} looks like CHW, frames must be HWC (e.g. array.transpose(1, 2, 0))"
    return ""


def _empty_batch_like(t: torch.Tensor, batch: int) -> torch.Tensor:
    """An uninitialized (batch, *t.shape[1:]) tensor with t's dim order (e.g. channels_last stays so)."""
    # Dim 0 outermost so that out[:n] of a partial batch is a dense prefix of the buffer.
    order = [0, *sorted(range(1, t.dim()), key=lambda d: -t.stride(d))]
    shape = (batch, *t.shape[1:])
    base = torch.empty([shape[d] for d in order], dtype=t.dtype, device=t.device)
    return base.permute([order.index(d) for d in range(t.dim())])


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _host_buffer(shape: tuple[int, ...], pin: bool) -> torch.Tensor:
    """An uninitialized uint8 host tensor, page-locked with cudaHostRegister when `pin` (see module docs)."""
    t = torch.empty(shape, dtype=torch.uint8)
    if pin:
        cudart = torch.cuda.cudart()
        # Flag 1 = cudaHostRegisterPortable: pinned for every CUDA context, not only the current device's.
        torch.cuda.check_error(cudart.cudaHostRegister(t.data_ptr(), t.numel(), 1))
    return t


def _free_host_buffer(t: torch.Tensor, pinned: bool) -> None:
    if pinned:
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(t.data_ptr()))


class FrameFeeder:
    """Turn host HWC uint8 frames into model-ready device batches, overlapping copy, upload and compute.

    Feed it either from an iterable `source` (a thread pulls frames from it) or by calling `put` from your own
    producer thread, then `finish`; consume by iterating (or `get`). See the module docs for the pipeline,
    the bottleneck analysis and the lifetime contract of returned batches (valid until the next ``next``).

    transform: ``fn(batch_uint8_NHWC) -> tensor`` on the feeder's device (default: `default_transform` of
        the config, i.e. `torchopt.kernels.preprocess`). If it accepts ``out=``, it gets the output buffer to
        write into (no allocation per batch); otherwise its result is copied into the output buffer.

    Example::

        cfg = FeederConfig(batch_size=32, size=(224, 224), preprocess={"dtype": "float16", "layout": "NCHW"})
        with FrameFeeder(cfg, source=decoder) as feeder:  # decoder yields (1080, 1920, 3) uint8 arrays
            for x in feeder:                               # (32, 3, 224, 224) float16 on the GPU
                logits = model(x)

        # or with your own producer thread:
        feeder = FrameFeeder(cfg)
        def produce():
            try:
                for frame in decoder:
                    feeder.put(frame)                      # blocks when the ring is full (back-pressure)
            except BaseException as exc:
                feeder.finish(error=exc)                   # the consumer raises it after the earlier batches
            else:
                feeder.finish()
        threading.Thread(target=produce).start()
        with feeder:
            for x in feeder: ...
    """

    def __init__(
        self,
        config: FeederConfig | dict[str, Any] | None = None,
        *,
        source: Iterable[Any] | None = None,
        transform: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.config = config if isinstance(config, FeederConfig) else FeederConfig.from_dict(config)
        cfg = self.config
        self.device = resolve_device("FeederConfig.device", cfg.device)
        self._cuda = self.device.type == "cuda"
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (batch -> tensor), got {type(transform).__name__}")
        if source is not None and not isinstance(source, Iterable):
            raise TypeError(f"source must be an iterable of frames, got {type(source).__name__}")
        self._default_transform = transform is None
        self._transform = default_transform(cfg) if transform is None else transform
        self._pass_out = _accepts_out(self._transform)

        self._cond = threading.Condition()
        # Serializes producers (frames keep call order); reentrant so that close() works in frame_buffer().
        self._put_lock = threading.RLock()
        # Guarded by _cond. Batch k uses staging slot k % num_slots and output buffer k % num_outputs.
        self._fill_k = 0  # batch being filled; batches below it are sealed (no more frames)
        self._fill_n = 0  # frames already in it
        n_slots = cfg.num_slots
        self._slot_frames = [0] * n_slots  # frames put into the slot's batch ...
        self._slot_copied = [0] * n_slots  # ... and already copied (async copies complete later)
        self._issued = 0  # batches dispatched (their slot may be refilled once their H2D is done)
        self._released = 0  # batches the consumer is done with (their output buffer may be overwritten)
        self._ready: collections.deque[Any] = collections.deque()  # (k, n), then _END or an exception
        self._finished = False
        self._input_error: BaseException | None = None
        self._failed: BaseException | None = None
        self._closed = False
        self._held: int | None = None  # output buffer index the consumer holds
        self._puts = 0
        self._stats = FeederStats()

        self._frame_shape: tuple[int, ...] | None = None
        self._slots: list[torch.Tensor] = []  # host staging, (B, H, W, C) uint8, pinned on CUDA
        self._slots_np: list[np.ndarray] = []
        self._dev_in: list[torch.Tensor] = []  # device uint8 copies of the slots
        self._ring: list[torch.Tensor] = []  # model-ready outputs
        self._h2d_done: list[torch.cuda.Event] = []
        self._read_done: list[torch.cuda.Event] = []
        self._ready_ev: list[torch.cuda.Event] = []
        self._consumed_ev: list[torch.cuda.Event] = []
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._compute_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._copy_queue: queue.SimpleQueue[tuple[np.ndarray, int, int] | None] = queue.SimpleQueue()
        self._copiers = [
            threading.Thread(target=self._copy_loop, name=f"torchopt-feeder-copy-{j}", daemon=True)
            for j in range(cfg.copy_threads if cfg.async_copy else 0)
        ]
        for t in self._copiers:
            t.start()
        if cfg.frame_shape is not None:
            self._set_frame_shape(cfg.frame_shape, where="FeederConfig.frame_shape")

        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="torchopt-feeder-dispatch", daemon=True)
        self._dispatcher.start()
        self._source_thread: threading.Thread | None = None
        if source is not None:
            self._source_thread = threading.Thread(
                target=self._source_loop, args=(source,), name="torchopt-feeder-source", daemon=True
            )
            self._source_thread.start()

    # ----------------------------------------------------------------------------------------- producer side

    def put(self, frame: np.ndarray | torch.Tensor, timeout: float | None = _UNSET) -> None:
        """Copy one (H, W, C) uint8 host frame into the staging ring.

        You may reuse the frame's memory when `put` returns, except with `FeederConfig.async_copy`, where a copy
        thread reads it later (keep it unmodified; the feeder holds a reference). Blocks while the ring is full
        (back-pressure) for up to `timeout` seconds (default `FeederConfig.put_timeout`), then raises
        TimeoutError. Raises FeederClosedError after `close`.
        """
        timeout = self.config.put_timeout if timeout is _UNSET else timeout
        with self._put_lock:
            with self._cond:
                self._raise_if_unusable()  # before the first frame allocates the ring
            index = self._puts
            self._puts += 1
            src = _frame_array(frame, index)
            self._check_frame_shape(src.shape, index)
            s, i = self._acquire(timeout)
            if self.config.async_copy:
                self._commit(s, copied=False)  # the position is taken; a copy thread fills it
                self._copy_queue.put((src, s, i))
            else:
                t0 = time.perf_counter()
                _copy_frame(self._slots[s][i], self._slots_np[s][i], frame if isinstance(frame, torch.Tensor) else src)
                self._stats.copy_s += time.perf_counter() - t0
                self._commit(s, copied=True)

    @contextlib.contextmanager
    def frame_buffer(self, timeout: float | None = _UNSET) -> Iterator[np.ndarray]:
        """Zero-copy `put`: yields the next frame's place in the pinned staging slot, to decode into directly.

        The frame is committed when the block exits normally, dropped if it raises. Needs the frame shape
        (`FeederConfig.frame_shape`, or an earlier `put`).

        Example::

            with feeder.frame_buffer() as buf:  # (H, W, C) uint8 numpy view of pinned memory
                capture.read(buf)               # e.g. OpenCV writes into a given array
        """
        timeout = self.config.put_timeout if timeout is _UNSET else timeout
        with self._put_lock:
            if self._frame_shape is None:
                raise ValueError("frame_buffer() needs the frame shape: set FeederConfig.frame_shape or put() a frame")
            self._puts += 1
            s, i = self._acquire(timeout)
            yield self._slots_np[s][i]
            self._commit(s, copied=True)

    def finish(self, error: BaseException | None = None) -> None:
        """End of input: the last, partial batch is delivered (unless `drop_last`), then iteration stops.

        With `error`, the consumer raises it after the batches before it (how a producer reports a failure).
        Idempotent; a no-op after `close`.
        """
        if error is not None and not isinstance(error, BaseException):
            raise TypeError(f"error must be an exception or None, got {type(error).__name__}")
        with self._put_lock, self._cond:
            if self._finished or self._closed:
                return
            if self._fill_n and not self.config.drop_last:
                self._fill_k += 1  # seal the partial batch: it is dispatched once its copies are done
            self._fill_n = 0
            self._input_error = error
            self._finished = True
            self._cond.notify_all()

    def _check_frame_shape(self, shape: tuple[int, ...], index: int) -> None:
        if self._frame_shape is None:
            self._set_frame_shape(shape, where=f"frame #{index}")
        elif shape != self._frame_shape:
            origin = "FeederConfig.frame_shape" if self.config.frame_shape else "the first frame"
            raise ValueError(
                f"frame #{index} has shape {shape}, but this feeder's frames are {self._frame_shape} (from"
                f" {origin}); all frames of a feeder must have one shape{_chw_hint(shape)}"
            )

    def _set_frame_shape(self, shape: tuple[int, ...], where: str) -> None:
        if self._default_transform:
            # Check frame shape and options against the kernels now, with their messages, rather than in the
            # dispatcher at the first batch: one reference run on a blank CPU frame, once.
            try:
                self._transform(torch.zeros((1, *shape), dtype=torch.uint8))
            except (TypeError, ValueError) as exc:
                raise (TypeError if isinstance(exc, TypeError) else ValueError)(
                    f"{where} of shape {tuple(shape)} cannot be preprocessed with FeederConfig.size="
                    f"{self.config.size}, FeederConfig.preprocess={self.config.preprocess}: {exc}"
                ) from exc
        # Warm-up: the whole host ring, once. Pinning happens here, not in the steady state.
        cfg = self.config
        slots: list[torch.Tensor] = []
        try:
            for _ in range(cfg.num_slots):
                slots.append(_host_buffer((cfg.batch_size, *shape), pin=self._cuda))
        except BaseException:
            for t in slots:  # a failed cudaHostRegister (e.g. memlock limit) must not leak the others
                _free_host_buffer(t, pinned=self._cuda)
            raise
        self._slots = slots
        self._slots_np = [t.numpy() for t in slots]
        self._frame_shape = tuple(shape)

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise FeederClosedError("FrameFeeder is closed")
        if self._failed is not None:
            raise RuntimeError(f"FrameFeeder failed: {self._failed!r}") from self._failed
        if self._finished:
            raise RuntimeError("put() after finish(): the input of this FrameFeeder has ended")

    def _acquire(self, timeout: float | None) -> tuple[int, int]:
        """(slot, row) of the next frame in the staging ring, waiting for the slot when a new batch starts."""
        with self._cond:
            self._raise_if_unusable()
            k, i, s = self._fill_k, self._fill_n, self._fill_k % self.config.num_slots
            if i == 0:
                t0 = time.perf_counter()
                # Slot s last held batch k - num_slots: it is free once that batch was dispatched ...
                last = k - self.config.num_slots
                ok = self._cond.wait_for(
                    lambda: self._closed or self._failed is not None or self._issued > last, timeout
                )
                self._stats.put_wait_s += time.perf_counter() - t0
                self._raise_if_unusable()
                if not ok:
                    raise TimeoutError(
                        f"put() waited {timeout} s for a free staging slot (all {self.config.num_slots} are"
                        f" full): the consumer or the GPU is not keeping up; raise timeout or consume batches"
                    )
        if i == 0 and self._cuda and k >= self.config.num_slots:
            # ... and its upload finished (the DMA engine still reads the pinned slot until then).
            t0 = time.perf_counter()
            self._h2d_done[s].synchronize()
            self._stats.put_wait_s += time.perf_counter() - t0
        return s, i

    def _commit(self, s: int, copied: bool) -> None:
        with self._cond:
            self._raise_if_unusable()
            if self._fill_n == 0:
                self._slot_frames[s] = self._slot_copied[s] = 0
            self._fill_n += 1
            self._slot_frames[s] += 1
            self._slot_copied[s] += copied
            self._stats.frames += 1
            if self._fill_n == self.config.batch_size:
                self._fill_k += 1
                self._fill_n = 0
                self._cond.notify_all()

    def _copy_loop(self) -> None:
        """A copy thread of `async_copy`: whole frames, so that frames are copied in parallel."""
        while (task := self._copy_queue.get()) is not None:
            src, s, i = task
            if self._closed:
                continue  # close() frees the slots once the copy threads are joined
            t0 = time.perf_counter()
            try:
                np.copyto(self._slots_np[s][i], src)  # releases the GIL: the copy threads run in parallel
            except BaseException as exc:
                self._fail(exc)
                continue
            with self._cond:
                self._stats.copy_s += time.perf_counter() - t0
                self._slot_copied[s] += 1
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._failed is None:
                self._failed = exc
                self._ready.append(exc)
            self._cond.notify_all()

    def _source_loop(self, source: Iterable[Any]) -> None:
        try:
            for frame in source:
                self.put(frame, timeout=None)
        except FeederClosedError:
            return
        except BaseException as exc:  # handed to the consumer, not swallowed
            self.finish(error=exc)
        else:
            self.finish()

    # --------------------------------------------------------------------------------------- dispatcher side

    def _dispatch_loop(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self.device)  # the current device is per thread
        n_out = self.config.num_outputs
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._failed is not None:
                        return
                    k = self._issued
                    s = k % self.config.num_slots
                    # Batch k is sealed, all its frames are copied, and it may overwrite output buffer
                    # k % n_out (batch k - n_out was released).
                    if k < self._fill_k and self._slot_copied[s] == self._slot_frames[s] and k < self._released + n_out:
                        n = self._slot_frames[s]
                        break
                    if k == self._fill_k and self._finished:
                        self._ready.append(self._input_error if self._input_error is not None else _END)
                        self._cond.notify_all()
                        return
                    self._cond.wait()
            try:
                self._issue(k, n)
            except BaseException as exc:  # handed to the consumer, not swallowed
                self._fail(exc)
                return
            with self._cond:
                self._issued = k + 1
                self._stats.batches += 1
                self._ready.append((k, n))
                self._cond.notify_all()

    def _issue(self, k: int, n: int) -> None:
        """Queue batch k: H2D on the copy stream, then the transform on the compute stream (CPU: run it)."""
        cfg = self.config
        s, r = k % cfg.num_slots, k % cfg.num_outputs
        src = self._slots[s] if n == cfg.batch_size else self._slots[s][:n]
        if not self._cuda:
            self._transform_into(src, r, n)
            return
        copy, compute = self._copy_stream, self._compute_stream
        if not self._dev_in:  # warm-up, once
            with torch.cuda.stream(compute):
                self._dev_in = [torch.empty_like(t, device=self.device) for t in self._slots]
            for t in self._dev_in:
                t.record_stream(copy)  # written on the copy stream, allocated on the compute stream
            n_s, n_r = cfg.num_slots, cfg.num_outputs
            self._h2d_done = [torch.cuda.Event() for _ in range(n_s)]
            self._read_done = [torch.cuda.Event() for _ in range(n_s)]
            self._ready_ev = [torch.cuda.Event() for _ in range(n_r)]
            self._consumed_ev = [torch.cuda.Event() for _ in range(n_r)]
        dst = self._dev_in[s] if n == cfg.batch_size else self._dev_in[s][:n]
        with torch.cuda.stream(copy):
            if k >= cfg.num_slots:
                copy.wait_event(self._read_done[s])  # the transform of batch k - num_slots read dst
            dst.copy_(src, non_blocking=True)
            self._h2d_done[s].record(copy)
        with torch.cuda.stream(compute):
            compute.wait_event(self._h2d_done[s])
            if k >= cfg.num_outputs:
                compute.wait_event(self._consumed_ev[r])  # the consumer's work on batch k - num_outputs
            self._transform_into(dst, r, n)
            self._read_done[s].record(compute)
            self._ready_ev[r].record(compute)

    def _transform_into(self, x: torch.Tensor, r: int, n: int) -> None:
        if not self._ring:  # warm-up: the first result gives the output shape, dtype and layout
            res = self._transform(x)
            self._check_result(res, n)
            self._ring = [_empty_batch_like(res, self.config.batch_size) for _ in range(self.config.num_outputs)]
            self._ring[r][:n].copy_(res)
            return
        out = self._ring[r] if n == self.config.batch_size else self._ring[r][:n]
        res = self._transform(x, out=out) if self._pass_out else self._transform(x)
        if not (isinstance(res, torch.Tensor) and _same_view(res, out)):
            self._check_result(res, n)
            out.copy_(res)

    def _check_result(self, res: Any, n: int) -> None:
        if not isinstance(res, torch.Tensor):
            raise TypeError(f"transform must return a torch.Tensor, got {type(res).__name__}")
        if res.device != self.device:
            raise ValueError(f"transform returned a tensor on {res.device}; this feeder's device is {self.device}")
        if res.dim() == 0 or res.shape[0] != n:
            raise ValueError(
                f"transform returned shape {tuple(res.shape)} for a batch of {n} frames; its first dim must"
                f" be the batch ({n})"
            )
        if self._ring and (res.shape[1:] != self._ring[0].shape[1:] or res.dtype != self._ring[0].dtype):
            raise ValueError(
                f"transform returned {tuple(res.shape)} {res.dtype}, but its first batch gave"
                f" {tuple(self._ring[0].shape[1:])} {self._ring[0].dtype} per batch item; it must not change"
            )

    # ----------------------------------------------------------------------------------------- consumer side

    def get(self, timeout: float | None = _UNSET) -> torch.Tensor | None:
        """The next model-ready batch, or None at the end of the stream (releases the previous batch).

        Waits up to `timeout` seconds (default `FeederConfig.get_timeout`), then raises TimeoutError. An error
        of the producer or the transform is raised here, after the batches before it.
        """
        timeout = self.config.get_timeout if timeout is _UNSET else timeout
        self._release_held()
        with self._cond:
            t0 = time.perf_counter()
            ok = self._cond.wait_for(lambda: self._closed or bool(self._ready), timeout)
            self._stats.get_wait_s += time.perf_counter() - t0
            if self._closed:
                raise FeederClosedError("FrameFeeder is closed")
            if not ok:
                raise TimeoutError(
                    f"no batch within {timeout} s: the producer is not putting frames (did it call finish()?)"
                )
            item = self._ready[0]
            if item is _END:
                return None
            if isinstance(item, BaseException):
                raise item  # kept in the queue: later calls raise it again
            self._ready.popleft()
            self._stats.delivered += 1
        k, n = item
        r = k % self.config.num_outputs
        buf = self._ring[r]
        if self._cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self._ready_ev[r])
            buf.record_stream(stream)  # the ring may be freed by close() while this stream still reads it
        self._held = r
        return buf if n == self.config.batch_size else buf[:n]

    def _release_held(self) -> None:
        if self._held is None:
            return
        if self._cuda:
            self._consumed_ev[self._held].record(torch.cuda.current_stream(self.device))
        self._held = None
        with self._cond:
            self._released += 1
            self._cond.notify_all()

    def __iter__(self) -> FrameFeeder:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.get()
        if batch is None:
            raise StopIteration
        return batch

    @property
    def stats(self) -> FeederStats:
        with self._cond:
            return dataclasses.replace(self._stats)

    @property
    def frame_shape(self) -> tuple[int, ...] | None:
        """(H, W, C) of the frames, once known."""
        return self._frame_shape

    # ----------------------------------------------------------------------------------------------- release

    def close(self) -> None:
        """Stop the threads, wait for queued GPU work, unpin and free every buffer. Idempotent.

        A producer blocked in `put` gets FeederClosedError. A batch you still hold stays readable as long as
        you keep a reference to it (its memory is freed when you drop it).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        me = threading.current_thread()
        if self._dispatcher is not me:
            self._dispatcher.join()
        if self._source_thread is not None and self._source_thread is not me:
            # A source stuck in user code (a camera read) cannot be interrupted; its next put() raises.
            self._source_thread.join(_SOURCE_JOIN_S)
        with self._put_lock:  # no put() is copying into a slot past this point
            for _ in self._copiers:
                self._copy_queue.put(None)
            for t in self._copiers:
                t.join()  # a copy in progress finishes before its slot is freed
            if self._cuda:
                self._copy_stream.synchronize()  # no DMA may read a slot we unpin
                self._compute_stream.synchronize()
            for t in self._slots:
                _free_host_buffer(t, pinned=self._cuda)
            self._slots, self._slots_np, self._dev_in, self._ring = [], [], [], []
            self._h2d_done, self._read_done, self._ready_ev, self._consumed_ev = [], [], [], []
            self._held = None

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> FrameFeeder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"FrameFeeder(device={self.device}, batch_size={cfg.batch_size}, frame_shape={self._frame_shape},"
            f" num_slots={cfg.num_slots}, num_outputs={cfg.num_outputs}, closed={self._closed})"
        )
