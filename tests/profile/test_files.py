"""torchopt.profile.files: JSON without non-finite numbers, output-directory and output-file errors."""

import json
import math

import pytest

from torchopt.profile.files import check_output_dir, write_json


def test_write_json_replaces_non_finite(tmp_path):
    path = write_json({"a": math.inf, "b": [math.nan, 1.0]}, tmp_path / "x.json")
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.0]}


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"out_dir .* cannot be created"):
        check_output_dir(blocker / "sub")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_dir(blocker)
    with pytest.raises(TypeError, match="out_dir must be a directory path"):
        check_output_dir(3)
