"""The command-line arguments the `torchopt` subcommands share: the model and its inputs, the output folder,
byte sizes.

It imports nothing of torchopt, so that every CLI module (``torchopt.cli``, ``torchopt.profile.cli``,
``torchopt.batch.cli``) can build on it without importing another CLI.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

__all__ = ["MODEL_HELP", "add_model_arguments", "check_out_dir", "parse_bytes"]

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
