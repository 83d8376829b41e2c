"""Calibration data adapters and the histogram (entropy / percentile) calibration ModelOpt leaves to the user.

`CalibData` accepts what users have:

- a ``torch.utils.data.DataLoader`` or any iterable of batches, where a batch is a tensor (one input), a
  tuple/list (positional inputs; extra trailing items such as labels are dropped when ``forward`` takes fewer
  arguments) or a dict (keyword inputs; keys ``forward`` does not take are dropped);
- a single tensor (one batch);
- a callable ``fn(model)`` that runs the model itself (a ModelOpt ``forward_loop``).

Batches are moved to the model's device, at most ``max_batches`` are used, a tqdm bar shows progress, and the
model runs in eval mode under ``torch.no_grad`` (its training flag is restored afterwards). Generators are read
once into a list so that they can be replayed. The calibration fingerprint is a hash of every input tensor the
model saw (shapes, dtypes, bytes), so a cache keyed by it is reused only for the same data.

Entropy and percentile are not ModelOpt algorithms: activation quantizers get ModelOpt's
``HistogramCalibrator`` (`torchopt.quantize.formats`), `calibrate_histograms` collects the statistics and then
calls ``load_calib_amax("entropy" | "percentile")`` on each of them; weight quantizers keep per-channel max,
as TensorRT's own INT8 calibrators do. Entropy (KL divergence) is known to clip badly on inputs with a few
discrete values and a spike at zero (e.g. raw [0, 1] pixels): normalize inputs, or compare methods first
(`torchopt.quantize.compare`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization
from torchopt.config import check_positive, error_line

__all__ = [
    "CalibData",
    "FirstBatch",
    "bypassed_modules",
    "calibrate_histograms",
    "disable_fused_fast_paths",
    "model_device",
]

Call = tuple[tuple[Any, ...], dict[str, Any]]


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a module without tensors)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _forward_arity(model: torch.nn.Module) -> tuple[int | None, set[str] | None]:
    """(max positional inputs or None for *args, accepted keyword names or None for **kwargs)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None, None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    n_pos = None if any(p.kind == p.VAR_POSITIONAL for p in params) else len(positional)
    names = None if any(p.kind == p.VAR_KEYWORD for p in params) else {p.name for p in params}
    return n_pos, names


def _describe(args: tuple, kwargs: dict) -> str:
    def one(v: Any) -> str:
        return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else repr(v)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _move(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device, dtype, non_blocking=True)
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_move(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, dtype) for k, v in value.items()}
    return value


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _hash_value(h, v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(f"K{k}".encode())
            _hash_value(h, value[k])
    else:
        h.update(repr(value).encode())


@dataclasses.dataclass
class FirstBatch:
    """What running the first calibration batch showed: the modules whose forward ran, and the layers (modules
    with weights and no children) that received one of its input tensors itself, as an image stem or a patch
    embedding does (`KeepRule.reads_input`)."""

    called: set[str]
    input_readers: set[str]


class CalibData:
    """Calibration (or evaluation) batches from a DataLoader, an iterable, a tensor or a callable.

    Args:
        data: see the module docstring.
        max_batches: use at most this many batches (None: all of them).
        num_inputs: how many leading items of a tuple batch are model inputs (None: as many as ``forward``
            takes positionally; the engine passes the number of input specs).
        dtype: cast floating inputs to this dtype (None: keep; the engine passes the cast step's dtype).
        name: the argument name used in error messages.

    Example::

        data = CalibData(loader, max_batches=32)
        loop = data.forward_loop(progress=True)      # a ModelOpt forward_loop(model)
        mtq.quantize(model, cfg, loop)
        print(data.last_fingerprint)
    """

    def __init__(
        self,
        data: Any,
        *,
        max_batches: int | None = None,
        num_inputs: int | None = None,
        dtype: torch.dtype | None = None,
        name: str = "calib_data",
    ):
        self.name = name
        if max_batches is not None:
            check_positive(f"{name} max_batches", max_batches)
        if num_inputs is not None:
            check_positive(f"{name} num_inputs", num_inputs)
        self.max_batches, self.num_inputs, self.dtype = max_batches, num_inputs, dtype
        if data is None:
            raise ValueError(f"{name} is required: pass a DataLoader, a list of batches or a callable fn(model)")
        if isinstance(data, (str, bytes)):
            raise TypeError(f"{name} must be a DataLoader, an iterable of batches or a callable, got a string")
        self.is_callable = callable(data) and not hasattr(data, "__iter__")
        if isinstance(data, torch.Tensor):
            data = [data]  # one batch, not an iterable of rows
        elif not self.is_callable:
            if not hasattr(data, "__iter__"):
                raise TypeError(
                    f"{name} must be a DataLoader, an iterable of batches (tensors, tuples, dicts) or a callable"
                    f" fn(model), got {type(data).__name__}"
                )
            if iter(data) is data:  # a generator or iterator: read once so that it can be replayed
                data = list(itertools.islice(data, max_batches) if max_batches else data)
        else:
            try:
                n_params = len(inspect.signature(data).parameters)
            except (TypeError, ValueError):
                n_params = 1
            if n_params != 1:
                raise TypeError(f"{name} as a callable must take the model as its one argument, takes {n_params}")
        self.data = data
        self.last_fingerprint: str | None = None
        self.batches_seen = 0

    def __len__(self) -> int:
        if self.is_callable or not hasattr(self.data, "__len__"):
            raise TypeError(f"{self.name} has no length")
        n = len(self.data)
        return min(n, self.max_batches) if self.max_batches else n

    def _total(self) -> int | None:
        try:
            return len(self)
        except TypeError:
            return None

    def _as_call(self, batch: Any, index: int, arity: tuple[int | None, set[str] | None]) -> Call:
        n_pos, names = arity
        if isinstance(batch, torch.Tensor):
            return (batch,), {}
        if isinstance(batch, dict):
            kwargs = batch if names is None else {k: v for k, v in batch.items() if k in names}
            if not kwargs:
                raise ValueError(
                    f"{self.name} batch {index} is a dict with keys {sorted(batch)}, none of which the model's"
                    f" forward takes ({sorted(names or [])})"
                )
            return (), dict(kwargs)
        if isinstance(batch, (list, tuple)):
            items = tuple(batch)
            if not items:
                raise ValueError(f"{self.name} batch {index} is an empty {type(batch).__name__}")
            return (items if n_pos is None else items[: max(n_pos, 1)]), {}
        raise TypeError(
            f"{self.name} batch {index} must be a tensor, a tuple/list of inputs or a dict of inputs, got"
            f" {type(batch).__name__}"
        )

    def call_of(self, batch: Any, index: int, model: torch.nn.Module) -> Call:
        """The (args, kwargs) that batch `index` becomes for `model` (not moved); clear errors for bad batches."""
        arity = _forward_arity(model)
        return self._as_call(batch, index, (self.num_inputs, arity[1]) if self.num_inputs is not None else arity)

    def batches(self) -> Iterator[Any]:
        """The raw batches, at most `max_batches` (iterables only)."""
        if self.is_callable:
            raise TypeError(f"{self.name} is a callable: its batches cannot be listed, use forward_loop()")
        return itertools.islice(self.data, self.max_batches)

    def calls(self, model: torch.nn.Module) -> Iterator[Call]:
        """(args, kwargs) per batch, on the model's device. Raises ValueError when there is no batch."""
        if self.is_callable:
            raise TypeError(f"{self.name} is a callable: its batches cannot be listed, use forward_loop()")
        arity, device = _forward_arity(model), model_device(model)
        if self.num_inputs is not None:
            arity = (self.num_inputs, arity[1])
        count = 0
        for i, batch in enumerate(self.data):
            if self.max_batches is not None and i >= self.max_batches:
                break
            args, kwargs = self._as_call(batch, i, arity)
            count += 1
            yield _move(args, device, self.dtype), _move(kwargs, device, self.dtype)
        if count == 0:
            raise ValueError(f"{self.name} is empty: it yielded no batch; calibration needs at least one")

    def fingerprint(self, model: torch.nn.Module) -> str:
        """Hash of every input of every batch that calibration would feed (iterables only; reads the data)."""
        h = hashlib.blake2b(digest_size=16)
        for args, kwargs in self.calls(model):
            _hash_value(h, (args, kwargs))
        return h.hexdigest()

    def check_fits(self, model: torch.nn.Module) -> FirstBatch | None:
        """Run the first batch through `model` (eval, no_grad); a clear ValueError when it does not fit.

        Returns what the run showed (`FirstBatch`), None for a callable: nothing is run here.
        """
        if self.is_callable:
            return None
        args, kwargs = next(iter(self.calls(model)))
        inputs = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        layers = {n for n, m in model.named_modules() if not any(m.children()) and hasattr(m, "weight")}
        seen = FirstBatch(set(), set())

        def record(name: str, call_args: tuple, call_kwargs: dict) -> None:
            seen.called.add(name)
            if name in layers and any(a is t for a in (*call_args, *call_kwargs.values()) for t in inputs):
                seen.input_readers.add(name)

        # Hooks on every module also switch off nn.TransformerEncoderLayer's fused fast path for this call,
        # as `disable_fused_fast_paths` does for quantization, so the record matches the path Q/DQ runs on.
        handles = [
            m.register_forward_pre_hook(lambda _m, a, k, name=name: record(name, a, k), with_kwargs=True)
            for name, m in model.named_modules()
        ]
        with _eval_no_grad(model):
            try:
                self._run(model, 0, args, kwargs)
            finally:
                for h in handles:
                    h.remove()
        return seen

    def _run(self, model: torch.nn.Module, index: int, args: tuple, kwargs: dict) -> Any:
        try:
            return model(*args, **kwargs)
        except Exception as exc:  # a failure on a batch is a data/model mismatch: say which batch and shapes
            raise ValueError(
                f"{self.name} batch {index} with inputs {_describe(args, kwargs)} does not fit"
                f" {type(model).__name__}: {error_line(exc)}"
            ) from exc

    def forward_loop(self, *, progress: bool = True, desc: str = "calibrating") -> Callable[[torch.nn.Module], None]:
        """A ModelOpt ``forward_loop(model)``: runs every batch; sets `last_fingerprint` and `batches_seen`."""
        from tqdm import tqdm  # noqa: PLC0415

        def loop(model: torch.nn.Module) -> None:
            h = hashlib.blake2b(digest_size=16)
            bar = tqdm(total=self._total(), desc=desc, disable=not progress, leave=False)
            seen = 0
            with _eval_no_grad(model), bar:
                if self.is_callable:

                    def record(_module, args, kwargs):
                        nonlocal seen
                        _hash_value(h, (args, kwargs))
                        seen += 1
                        bar.update()

                    handle = model.register_forward_pre_hook(record, with_kwargs=True)
                    try:
                        self.data(model)
                    finally:
                        handle.remove()
                else:
                    for i, (args, kwargs) in enumerate(self.calls(model)):
                        _hash_value(h, (args, kwargs))
                        self._run(model, i, args, kwargs)
                        seen += 1
                        bar.update()
            if seen == 0:
                raise ValueError(f"{self.name} ran no batch through the model; calibration needs at least one")
            self.last_fingerprint, self.batches_seen = h.hexdigest(), seen

        return loop


@contextlib.contextmanager
def _eval_no_grad(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def calibrate_histograms(
    model: torch.nn.Module,
    forward_loop: Callable[[torch.nn.Module], None],
    method: str,
    *,
    percentile: float = 99.99,
    entropy_stride: int = 1,
    progress: bool = True,
) -> None:
    """Entropy / percentile calibration of a model ModelOpt converted with histogram input calibrators.

    Mirrors ModelOpt's ``max_calibrate`` (``enable_stats_collection``, ``weight_only_quantize``, the forward
    loop), then loads each quantizer's amax itself: ``load_calib_amax(method, ...)`` for histogram
    calibrators, ``load_calib_amax()`` for the weights' max calibrators. Quantizers that saw no data keep no
    amax, as after ModelOpt's own max calibration (`bypassed_quantizers` finds them).
    """
    from tqdm import tqdm  # noqa: PLC0415

    mtq = import_modelopt_quantization()
    if method not in ("entropy", "percentile"):
        raise ValueError(f"method must be 'entropy' or 'percentile' for histogram calibration, got {method!r}")
    histogram_cls = mtq.calib.HistogramCalibrator
    mtq.model_calib.enable_stats_collection(model)
    with torch.no_grad():
        mtq.model_calib.weight_only_quantize(model)
    forward_loop(model)
    quantizers = [q for q in model.modules() if isinstance(q, mtq.nn.TensorQuantizer) and q.is_enabled]
    n_hist = sum(isinstance(getattr(q, "_calibrator", None), histogram_cls) for q in quantizers)
    bar = tqdm(total=n_hist, desc=f"{method} amax", disable=not progress, leave=False)
    with bar:
        for q in quantizers:
            # ModelOpt keeps the calibrator private; its own finish_stats_collection reads it the same way.
            cal = getattr(q, "_calibrator", None)
            if getattr(q, "_use_constant_amax", False) or getattr(q, "_constant_amax", None) is not None:
                q.enable_quant()
                continue
            if cal is not None and not getattr(q, "_dynamic", False):
                if isinstance(cal, histogram_cls):
                    if cal.compute_amax("percentile", percentile=100.0) is None:  # cheap emptiness test
                        pass  # never called: left without amax, reported by bypassed_quantizers
                    elif method == "entropy":
                        q.load_calib_amax("entropy", stride=entropy_stride)
                    else:
                        q.load_calib_amax("percentile", percentile=percentile)
                    bar.update()
                elif cal.compute_amax() is not None:
                    q.load_calib_amax()
            q.enable_quant()
            q.disable_calib()


def bypassed_modules(model: torch.nn.Module, called: set[str] | None = None) -> dict[str, str]:
    """Quantized modules whose Q/DQ never runs, with the reason.

    A module is bypassed when its forward did not run on the calibration data (`called`: the module names
    `CalibData.check_fits` saw run) or, without that record, when its input quantizer never saw data (no amax).
    Typical cause: a fused path that uses the weights directly, e.g. ``nn.MultiheadAttention`` calls
    ``F.multi_head_attention_forward`` with ``out_proj.weight``, so ``out_proj``'s quantizers never run.
    """
    tq = import_modelopt_quantization().nn.TensorQuantizer
    out = {}
    for name, module in model.named_modules():
        quantizers = {c: m for c, m in module.named_children() if isinstance(m, tq) and m.is_enabled}
        if not quantizers or isinstance(module, tq):
            continue
        inp = quantizers.get("input_quantizer")
        static = inp is not None and not getattr(inp, "_dynamic", False) and not inp.block_sizes
        if called is not None and name not in called:
            out[name] = "its forward never runs (a fused path uses its weights directly, or the data skips it)"
        elif static and inp.amax is None and getattr(inp, "_calibrator", None) is not None:
            out[name] = "its input quantizer never saw calibration data (its forward did not run)"
    return out


class _NoFastPath:
    """A no-op forward pre-hook. PyTorch's fused ``nn.TransformerEncoderLayer`` fast path (eval, batch_first)
    calls ``torch._transformer_encoder_layer_fwd`` on the raw weights, bypassing every quantizer; it is skipped
    when the layer has hooks, which is the only per-module switch (``torch.backends.mha.set_fastpath_enabled``
    is process-global)."""

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        return None


def disable_fused_fast_paths(model: torch.nn.Module) -> list[str]:
    """Turn off the fused TransformerEncoderLayer fast path on this model's layers so Q/DQ applies; the names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.TransformerEncoderLayer):
            m.register_forward_pre_hook(_NoFastPath())
            names.append(name)
    return names
