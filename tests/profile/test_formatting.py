"""Markdown cells and tables of the profile results."""

from torchopt.profile.formatting import fmt_bytes, fmt_ms, markdown_table


def test_bytes_pick_the_unit_and_keep_the_sign():
    assert fmt_bytes(None) == "–"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(-3 * 1024**2) == "-3.0 MiB"
    assert fmt_bytes(5 * 1024**4) == "5120.0 GiB"  # GiB is the largest unit


def test_milliseconds_have_three_decimals():
    assert fmt_ms(None) == "–" and fmt_ms(1.23456) == "1.235"


def test_markdown_table():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"
