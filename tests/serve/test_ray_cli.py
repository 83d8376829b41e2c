"""`python -m torchopt.serve.ray_cli`: bad input is one line and exit 1, before Ray starts.

The test that runs the CLI on a real Ray is tests/serve/ray_cluster/test_ray_cli_run.py: there it runs before the
session's shared Ray starts (tests/serve/ray_cluster/conftest.py); here, collected after that folder, it would start
a second Ray while the shared one still runs.
"""

from torchopt.serve.ray_cli import main


def test_cli_reports_a_missing_artifact_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.torchopt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: FileNotFoundError: saved_path"), err
    assert "missing.torchopt' does not exist" in err


def test_cli_reports_a_batch_size_above_the_profile_in_one_line(artifact, capsys):
    assert main([str(artifact), "--max-batch-size", "64"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_batch_size=64 is above the artifact's profile max batch 32" in err, err
