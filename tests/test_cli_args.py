"""The shared CLI arguments: config options whose default and help come from their dataclass."""

import argparse
import dataclasses

import pytest

from torchopt.batch import MaxBatchConfig, OptimalBatchConfig
from torchopt.batch.cli import register
from torchopt.cli_args import add_config_arguments, config_field_help, format_bytes, parse_bytes
from torchopt.config import ConfigBase


@dataclasses.dataclass
class _Options(ConfigBase):
    """Options of a test.

    rate: items per second; a 5 % margin
        is added.
    low / high: the bounds.
    quiet: no output.
    limit: at most this many (None = no limit).
    """

    rate: float = 2.5
    low: int = 1
    high: int = 9
    quiet: bool = False
    verbose: bool = True
    limit: int | None = None


def test_field_help_reads_entries_continuations_and_shared_entries():
    docs = config_field_help(_Options)
    assert docs["rate"] == "items per second; a 5 % margin is added."
    assert docs["low"] == docs["high"] == "the bounds."
    assert "verbose" not in docs and docs["limit"] == "at most this many (None = no limit)."


def test_options_take_the_fields_defaults_types_and_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Options, ["rate", "high", "quiet", "limit"])
    assert vars(parser.parse_args([])) == {"rate": 2.5, "high": 9, "quiet": False, "limit": None}
    args = parser.parse_args(["--rate", "3", "--high", "4", "--quiet", "--limit", "7"])
    assert (args.rate, args.high, args.quiet, args.limit) == (3.0, 4, True, 7)
    text = parser.format_help()
    assert "items per second; a 5 % margin is added. (default: 2.5)" in " ".join(text.split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--high", "four"])


def test_a_true_bool_becomes_a_no_switch():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MaxBatchConfig, ["progress"])
    assert parser.parse_args([]).progress is True and parser.parse_args(["--no-progress"]).progress is False


def test_find_batch_defaults_are_the_configs():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["find-batch", "resnet50", "--input", "x=1x3x8x8"])
    assert parse_bytes(args.headroom) == MaxBatchConfig().headroom
    assert args.memory_budget == MaxBatchConfig().memory_budget
    assert args.percentile == OptimalBatchConfig().percentile
    assert args.latency_budget_ms == OptimalBatchConfig().latency_budget_ms
    help_text = " ".join(parser._subparsers._group_actions[0].choices["find-batch"].format_help().split())
    assert "the search targets budget - headroom. (default: 256MiB)" in help_text


@pytest.mark.parametrize("nbytes", [0, 1, 1000, 2**10, 3 * 2**20, 256 * 2**20, 5 * 2**30, 2**30 + 1])
def test_format_bytes_reads_back(nbytes):
    assert parse_bytes(format_bytes(nbytes)) == nbytes
