"""The bottom of torchopt: the config base class, the checks every option uses, and the one vocabulary of
dtypes and devices.

Every option of torchopt lives in exactly one dataclass derived from `ConfigBase`. A config validates itself in
``__post_init__`` and round-trips through plain dicts (and so JSON/YAML): ``type(cfg).from_dict(cfg.to_dict())
== cfg``. Unknown keys are an error that names the key and the valid ones. `ConfigBase.merge` is the one way an
entry point combines a config with keyword overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, TypeVar, Union

import torch

C = TypeVar("C", bound="ConfigBase")

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "ConfigBase",
    "StepConfig",
    "check_choice",
    "check_positive",
    "check_range",
    "check_type",
    "closest",
    "dtype_name",
    "first_few",
    "parse_dtype",
    "resolve_device",
]

# The one dtype vocabulary: canonical names (as serialized) and the aliases every option accepts.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "long": "int64",
}


def closest(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def first_few(names: Sequence[str], shown: int = 3) -> str:
    """'a, b, c and 4 more': the first `shown` names of a long list, for a message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of `exc`'s message (at most `limit` characters), its type's name when the message is empty:
    what a one-line error or a report shows of an exception whose text can run to pages."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def error_line(exc: BaseException) -> str:
    """'Type: first line' of an exception (see `first_line`)."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def check_type(name: str, value: Any, types_: type | tuple[type, ...], expected: str | None = None) -> None:
    """Raise TypeError naming `name`, the given value and the expected type."""
    if isinstance(value, bool) and bool not in (types_ if isinstance(types_, tuple) else (types_,)):
        ok = False  # bool is an int subclass; True is never a valid size or count
    else:
        ok = isinstance(value, types_)
    if not ok:
        if expected is None:
            tup = types_ if isinstance(types_, tuple) else (types_,)
            expected = " or ".join(t.__name__ for t in tup)
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError naming `name`, the given value and the valid choices."""
    if value not in choices:
        hint = closest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}{hint}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False, types_=(int,)) -> None:
    """Raise TypeError/ValueError unless `value` is a positive (or non-negative) number."""
    check_type(name, value, types_)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    types_: type | tuple[type, ...] = (int, float),
) -> None:
    """Raise TypeError unless `value` is one of `types_`, ValueError unless it lies in the range.

    The range is ``[low, high]``; `low_open` / `high_open` leave a bound out (``(low, high)`` with both);
    either bound may be None (unbounded).
    """
    check_type(name, value, types_)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a torch dtype in torchopt's vocabulary."""
    for key, dt in DTYPES.items():
        if dt == dtype:
            return key
    raise ValueError(f"dtype {dtype} is not supported; expected one of {list(DTYPES)}")


def parse_dtype(name: str, value: Any, choices: Sequence[str] | None = None) -> str:
    """The canonical dtype name for `value` (a torch.dtype, a name or an alias such as 'fp16').

    `name` is the option being parsed (for the error); `choices` limits the accepted canonical names.
    """
    allowed = list(choices) if choices is not None else list(DTYPES)
    if isinstance(value, torch.dtype):
        key = dtype_name(value)
    else:
        check_type(name, value, (str, torch.dtype), "a torch.dtype or a dtype name")
        key = _DTYPE_ALIASES.get(value, value)
    check_choice(name, key, allowed)
    return key


def resolve_device(name: str, value: Any, *, kinds: Sequence[str] = ("cpu", "cuda")) -> torch.device:
    """The torch.device for an option `name`: None or "auto" (CUDA when available, else CPU), a device
    string, a torch.device or a CUDA index. A CUDA device gets its index; a missing GPU is a ValueError."""
    if value is None or value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    check_type(name, value, (str, torch.device, int), "a device like 'cpu', 'cuda', 'cuda:1' or a CUDA index")
    try:
        device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} {value!r} is not a valid device string ({exc})") from None
    check_choice(f"{name} type", device.type, list(kinds))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {value!r} needs CUDA, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {value!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _to_plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _from_plain(tp: Any, value: Any, where: str) -> Any:
    tp = _strip_optional(tp)
    if value is None:
        return None
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        return value if isinstance(value, tp) else tp.from_dict(value, where=where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = args[0] if args else Any
        items = [_from_plain(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


@functools.cache
def _nested_config_fields(cls: type) -> dict[str, type]:
    """The fields of a config dataclass whose type is another config (Optional ones excluded)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        if isinstance(tp, type) and issubclass(tp, ConfigBase):
            out[f.name] = tp
    return out


class ConfigBase:
    """Base of all torchopt configs: dict round trip with unknown-key checking.

    Subclasses are ``@dataclass``es that validate in ``__post_init__`` and keep every field JSON-friendly
    (numbers, strings, bools, lists, dicts, nested configs). The base is not a dataclass itself (it has no
    fields), so a subclass may be ``frozen=True`` (dataclasses refuse a frozen class over a non-frozen one).
    """

    def __post_init__(self) -> None:
        """Nested configs given as dicts become their config class; errors name `<step or class>.<field>`.

        Subclasses with a `__post_init__` of their own call this first (``super().__post_init__()``).
        """
        prefix = getattr(self, "step", "") or type(self).__name__
        for name, tp in _nested_config_fields(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, tp.from_dict(value, where=f"{prefix}.{name}"))
            else:
                check_type(f"{prefix}.{name}", value, tp)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def merge(cls: type[C], config: C | None, /, *, where: str | None = None, **overrides: Any) -> C:
        """`config` (the defaults when None) with `overrides` applied, validated like `from_dict`.

        Example::

            cfg = LatencyConfig.merge(config, iters=50)   # the entry points' `config=..., **overrides`
        """
        where = where or f"{cls.__name__} options"
        if config is not None:
            check_type("config", config, cls)
            if not overrides:
                return config
        return cls.from_dict({**(config.to_dict() if config else {}), **overrides}, where=where)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None, *, where: str | None = None) -> C:
        """Build from a plain dict; `where` names the location for error messages (e.g. 'steps[1].compile')."""
        where = where or cls.__name__
        if data is None:
            data = {}
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be a mapping of options, got {type(data).__name__} {data!r}")
        valid = cls.field_names()
        for key in data:
            if key not in valid:
                raise ValueError(
                    f"unknown key {key!r} in {where}{closest(str(key), valid)}; valid keys: {', '.join(valid)}"
                )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _from_plain(hints.get(k, Any), v, f"{where}.{k}") for k, v in data.items()}
        return cls(**kwargs)


@dataclasses.dataclass
class StepConfig(ConfigBase):
    """Base of the configs that can be a recipe step (the recipe layer registers each under its YAML key
    `step`). It lives here so that a middle-layer config such as `QuantizeConfig` can be one.

    Two hooks let the engine prepare a run without knowing any step by name: `preflight(ctx)` fails fast
    before any timing or calibration (e.g. a requested backend that is missing), and `calib_batches()` says
    how many calibration batches the step reads (0: none, None: all), so they are checked up front.
    """

    step: ClassVar[str] = ""

    def preflight(self, ctx: Any) -> None:
        """Raise a clear error before the run starts if this step cannot run in `ctx` (default: nothing)."""

    def calib_batches(self) -> int | None:
        return 0
