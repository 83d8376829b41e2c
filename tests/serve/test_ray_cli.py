"""`python -m torchopt.serve.ray_cli`: bad input is one line and exit 1, before Ray starts.

The test that runs the CLI on a real Ray is tests/serve/ray_cluster/test_ray_cli_run.py: there it runs before the
session's shared Ray starts (tests/serve/ray_cluster/conftest.py); here, collected after that folder, it would start
a second Ray while the shared one still runs.
"""

import socket

import pytest

from torchopt.serve.ray_cli import main, one_line


def test_cli_reports_a_missing_artifact_in_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing.torchopt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: FileNotFoundError: saved_path"), err
    assert "missing.torchopt' does not exist" in err


def test_cli_reports_a_batch_size_above_the_profile_in_one_line(artifact, capsys):
    assert main([str(artifact), "--max-batch-size", "64"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_batch_size=64 is above the artifact's profile max batch 32" in err, err


def test_cli_refuses_a_port_in_use_in_one_line_before_ray_starts(artifact, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main([str(artifact), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"error: ValueError: --port {port}: 127.0.0.1:{port} is already in use or cannot be bound;"
        " choose another --port\n"
    ), err


def test_a_ray_task_error_is_reported_by_its_cause():
    """A Ray task's error reads 'ray::ProxyActor.ready() (pid=..., ip=...)' on its first line; the cause says why."""
    exceptions = pytest.importorskip("ray.exceptions", reason="the ray extra is not installed")
    cause = OSError("[Errno 98] Address already in use\nmore detail")
    error = exceptions.RayTaskError("ready", "Traceback ...", cause, proctitle="ray::ProxyActor", pid=1, ip="x")
    assert "ray::ProxyActor()" in str(error).splitlines()[0]  # all the one line showed before
    assert one_line(error) == "OSError: [Errno 98] Address already in use"
    assert (
        one_line(ValueError("bad\nvalue")) == "ValueError: bad"
        and one_line(RuntimeError()) == "RuntimeError: RuntimeError"
    )
