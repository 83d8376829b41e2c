"""Shared plumbing of the batch-size tools: the step callable, batch construction and checks, error notes."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from torchopt.batch.oom import exception_chain, is_out_of_memory
from torchopt.config import check_type, first_line
from torchopt.inputs import InputSpec
from torchopt.profile.timing import infer_device

T = TypeVar("T")
__all__ = [
    "Batch",
    "add_batch_note",
    "as_make_inputs",
    "as_step",
    "batch_device",
    "build_batch",
    "check_batch_limit",
    "oom_text",
    "run_guarded",
]

Batch = tuple[tuple[Any, ...], dict[str, Any]]


def as_step(fn_or_model: Any, where: str) -> Callable[..., Any]:
    """An nn.Module runs as inference (under no_grad); any other callable (e.g. a training step) as is."""
    if isinstance(fn_or_model, torch.nn.Module):
        model = fn_or_model

        def step(*args: Any, **kwargs: Any) -> Any:
            with torch.no_grad():
                return model(*args, **kwargs)

        return step
    if not callable(fn_or_model):
        raise TypeError(
            f"{where}: fn_or_model must be an nn.Module or a callable taking one batch, got"
            f" {type(fn_or_model).__name__} {fn_or_model!r}"
        )
    return fn_or_model


def _spec_tensor(spec: InputSpec, batch: int, which: str, device: torch.device, float_dtype) -> torch.Tensor:
    shape = (batch, *spec.shape_at(which)[1:])
    dtype = spec.torch_dtype
    if dtype.is_floating_point:
        # Drawn on the device: building a batch of thousands of images on the host first would dominate.
        lo, hi = spec.value_range or (-1.0, 1.0)
        return torch.empty(shape, device=device, dtype=float_dtype or dtype).uniform_(lo, hi)
    if dtype == torch.bool:
        return torch.rand(shape, device=device) > 0.5
    lo, hi = spec.value_range or (0, 256 if dtype == torch.uint8 else 100)
    return torch.randint(int(lo), int(hi), shape, device=device, dtype=dtype)


def as_make_inputs(
    make_inputs: Any,
    fn_or_model: Any,
    where: str,
    *,
    which: str = "opt",
    device: torch.device | str | None = None,
    float_dtype: torch.dtype | None = None,
) -> Callable[[int], Any]:
    """`make_inputs(batch)` as given, or one built from InputSpecs (dim 0 is the batch dim of every input).

    With specs, the other dims are taken at profile point `which` (the memory search uses "max": the worst
    case) and floating inputs are drawn in `float_dtype` (default: the spec's dtype) on `device`.
    """
    specs: list[InputSpec] | None = None
    if isinstance(make_inputs, InputSpec):
        specs = [make_inputs]
    elif isinstance(make_inputs, Sequence) and make_inputs and all(isinstance(s, InputSpec) for s in make_inputs):
        specs = list(make_inputs)
    if specs is None:
        if not callable(make_inputs):
            raise TypeError(
                f"{where}: make_inputs must be a callable make_inputs(batch) -> inputs, or InputSpec(s), got"
                f" {type(make_inputs).__name__} {make_inputs!r}"
            )
        return make_inputs
    # Specs are built where a module's parameters live (a plain callable: CPU unless `device` is given).
    dev = torch.device(device) if device is not None else infer_device(fn_or_model, ())

    def from_specs(batch: int) -> tuple[torch.Tensor, ...]:
        return tuple(_spec_tensor(s, batch, which, dev, float_dtype) for s in specs)

    return from_specs


def build_batch(make_inputs: Callable[[int], Any], batch: int, where: str) -> Batch:
    """Call ``make_inputs(batch)`` and check that every tensor it returns has `batch` items along dim 0.

    A tensor is one positional input, a tuple/list are positional inputs, a dict are keyword inputs.
    """
    value = make_inputs(batch)
    if isinstance(value, torch.Tensor):
        args, kwargs = (value,), {}
    elif isinstance(value, (tuple, list)):
        args, kwargs = tuple(value), {}
    elif isinstance(value, Mapping):
        args, kwargs = (), dict(value)
    else:
        raise TypeError(
            f"{where}: make_inputs({batch}) must return a tensor, a tuple/list of inputs or a dict of keyword"
            f" inputs, got {type(value).__name__}"
        )
    named = [(f"argument {i}", v) for i, v in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    batched = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not batched:
        raise ValueError(
            f"{where}: make_inputs({batch}) returned no tensor with a batch dim (dim 0); got"
            f" {[type(v).__name__ for _, v in named]}"
        )
    for name, t in batched:
        if t.shape[0] != batch:
            raise ValueError(
                f"{where}: make_inputs({batch}) returned {name} with {t.shape[0]} items along dim 0 (shape"
                f" {tuple(t.shape)}); make_inputs(batch) must build exactly `batch` items"
            )
    return args, kwargs


def batch_device(fn_or_model: Any, batch: Batch) -> torch.device:
    args, kwargs = batch
    return infer_device(fn_or_model, (args, kwargs))


def add_batch_note(exc: BaseException, batch: int, where: str) -> None:
    """Attach the batch size to an exception that is re-raised unchanged (same type, same traceback)."""
    note = f"{where}: raised by the step at batch size {batch} (not an out-of-memory error, so it was re-raised)"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10: no add_note, but the attribute is what 3.11+ tracebacks print
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def oom_text(exc: BaseException) -> str:
    """The first line of an OOM message (for probe records and reports)."""
    return first_line(exc)


def _detach_tracebacks(exc: BaseException) -> BaseException:
    # A traceback references every frame it passed through, and so every tensor those frames hold.
    for e in exception_chain(exc):
        e.__traceback__ = None
    return exc


def run_guarded(
    call: Callable[[], T], batch: int, where: str, cleanup: Callable[[], None]
) -> tuple[T | None, BaseException | None]:
    """Run ``call()``; an out-of-memory error returns ``(None, error)`` after memory was recovered.

    The recovery (`cleanup`: gc + empty_cache) runs *after* the ``except`` block has been left: inside it the
    live traceback pins the failed step's tensors and nothing would be freed. The returned error has its
    tracebacks cut for the same reason. Any other error is re-raised unchanged, with the batch size noted.
    """
    failure: BaseException | None = None
    try:
        return call(), None
    except Exception as exc:
        if not is_out_of_memory(exc):
            add_batch_note(exc, batch, where)
            raise
        failure = _detach_tracebacks(exc)
    cleanup()
    return None, failure


def check_batch_limit(name: str, value: Any) -> None:
    check_type(name, value, int)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
