"""The command-line arguments the `torchopt` subcommands share: the model and its inputs, the output folder,
byte sizes, and one ``--option`` per field of a config dataclass.

It imports nothing of torchopt, so that every CLI module (``torchopt.cli``, ``torchopt.profile.cli``,
``torchopt.batch.cli``) can build on it without importing another CLI. A config option's default and help
come from its dataclass (`add_config_arguments`): the field's default and its line in the class docstring,
so the CLI never repeats them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL_HELP",
    "add_config_arguments",
    "add_model_arguments",
    "check_out_dir",
    "config_field_help",
    "format_bytes",
    "parse_bytes",
]

MODEL_HELP = "torchvision name (random weights), module:callable or file.py:callable"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def add_model_arguments(parser: argparse.ArgumentParser, input_help: str, *, required: bool = True) -> None:
    """The positional MODEL and the repeatable --input SPEC that every model-taking subcommand shares."""
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--input", action="append", metavar="SPEC", required=required, help=input_help)


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """Raise ValueError now, before any long work, when `out` could not be created or written; creates nothing
    (a failed run must not leave an empty folder behind)."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{flag} {str(out)!r} exists and is not a directory")
        existing = out
    else:
        existing = next(p for p in out.absolute().parents if p.exists())
        if not existing.is_dir():
            raise ValueError(f"{flag} {str(out)!r} cannot be created: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(out)!r} cannot be written: {str(existing)!r} is not writable")


def parse_bytes(text: str, name: str = "size") -> int:
    """``"16GiB"``, ``"512MiB"``, ``"2.5GB"`` or a number of bytes → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{name} must be a number of bytes or a size like 16GiB, 512MiB, 2.5GB; got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(nbytes: int) -> str:
    """``268435456`` → ``"256MiB"``: the largest binary unit that divides `nbytes` (`parse_bytes` reads it back)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


_ENTRY = re.compile(r"(\w+(?: / \w+)*): (.*)")


def config_field_help(cls: type) -> dict[str, str]:
    """Each field's entry in the docstring of config class `cls` (``name: text``, continued on indented lines;
    ``a / b: text`` documents two fields at once), as one line without reST backticks."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        entry = _ENTRY.fullmatch(line)
        if entry is not None:
            current = [entry.group(2)]
            for name in entry.group(1).split(" / "):
                entries[name] = current
        elif current is not None and line.startswith(" "):
            current.append(line.strip())
        else:
            current = None
    return {name: " ".join(text).replace("``", "").replace("`", "") for name, text in entries.items()}


def _value_type(hint: Any) -> Any:
    """``int`` for ``int | None`` (the type an option's text is parsed to)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Iterable[str],
    *,
    parsers: Mapping[str, Callable[[str], Any]] | None = None,
    shows: Mapping[str, Callable[[Any], str]] | None = None,
) -> None:
    """One ``--field-name`` per named field of dataclass `cls`, whose default is the field's default and whose
    help is the field's docstring entry; the parsed value lands in ``args.field_name``.

    A bool field that defaults to True becomes ``--no-field-name`` (False when given), one that defaults to
    False ``--field-name``. Other values are parsed by ``parsers[name]`` when given, else by the field's type
    (``int``, ``float``, ``str``); ``shows[name]`` formats the default in the help.

    Example::

        add_config_arguments(p, LatencyConfig, ["warmup", "iters"])   # --warmup N, --iters N
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    docs = config_field_help(cls)
    for name in names:
        field = fields[name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        flag = name.replace("_", "-")
        value_type = _value_type(hints[name])
        if value_type is bool:
            switch = f"--no-{flag}" if default else f"--{flag}"
            action = "store_false" if default else "store_true"
            help_text = f"{'turn off' if default else 'turn on'}: {docs[name]}"
            parser.add_argument(switch, dest=name, action=action, default=default, help=_escaped(help_text))
            continue
        parse = (parsers or {}).get(name, value_type)
        shown = "None" if default is None else (shows or {}).get(name, str)(default)
        help_text = f"{docs[name]} (default: {shown})"
        parser.add_argument(f"--{flag}", dest=name, type=parse, default=default, help=_escaped(help_text))


def _escaped(help_text: str) -> str:
    return help_text.replace("%", "%%")  # argparse %-formats help texts
