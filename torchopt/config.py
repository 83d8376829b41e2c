"""Config base class: every option of torchopt lives in exactly one dataclass derived from `ConfigBase`.

A config validates itself in ``__post_init__`` and round-trips through plain dicts (and so JSON/YAML):
``type(cfg).from_dict(cfg.to_dict()) == cfg``. Unknown keys are an error that names the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, Union

C = TypeVar("C", bound="ConfigBase")

__all__ = ["ConfigBase", "check_choice", "check_positive", "check_type", "closest"]


def closest(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


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


@dataclasses.dataclass
class ConfigBase:
    """Base of all torchopt configs: dict round trip with unknown-key checking.

    Subclasses are ``@dataclass``es that validate in ``__post_init__`` and keep every field JSON-friendly
    (numbers, strings, bools, lists, dicts, nested configs).
    """

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

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
